"""Quantised attention in linear memory: blocks of query rows, P recomputed in backward.

Eager quantised attention keeps ``softmax(S)`` and ``Q(P)`` (each ``[batch, heads, L, L]``) for
backward. Here the forward walks over blocks of query rows; each block takes its full rows of
scores (``[rows, L]``, freed before the next block), so the softmax and the P quantiser see
exactly the rows that the eager path gives them: every value of ``Q(P)`` is the eager path's
(same ops on the same rows), for every format. Only ``Q(Q)``, ``Q(K)``, ``Q(V)`` and the mask
(the caller's tensor) are saved; the backward recomputes each block's ``Q(P)`` and
differentiates it (the quantisers are straight-through, as in the eager path; ``Q(P) V`` is not
recomputed, its two gradient matmuls are run directly), so the gradients of a block are the
eager path's and the sums of K's and V's gradients over blocks differ from the one-matmul sums
by rounding.

Query blocks with whole key rows, rather than key blocks with two-pass softmax statistics, keep
the eager path's values bit for bit (a blocked log-sum-exp would round the normaliser
differently, and a P element on a rounding boundary of the 4-bit grid would flip); the
transient memory is ``rows x L`` per head, linear in L.

Masked key tails (causal masks): where every key from some index on is masked for all rows of
a query block (and each of its rows sees at least one key), that tail's P is exactly 0 and so
is its quantised value, so the block computes only the keys before it, rounded up to a whole
block of the P format (its quantiser then sees the same blocks). A causal mask so skips about
half the work, as float SDPA does. ``Q(P)`` stays the eager path's bit for bit (at least
``MIN_KEYS`` keys per block keep the CPU softmax's summation order); the sums over keys
(``Q(P) V``, and ``dS K``, ``dS^T Q`` in backward) have fewer (zero) terms, which BLAS may group
differently, so outputs and gradients equal the eager path's up to rounding (float32: bit for
bit at the tests' lengths; 7e-8 of its largest value in Q's gradient at 2048 tokens). The extent
is read from the mask once per forward, on the host: only for CPU tensors, where that costs no
sync (elsewhere every block keeps its whole row).

On float32 CPU tensors ``block_attention`` hands the same work (same rows, same key tails) to
the fused C++ kernel of ``qat.quant.cpu_attention`` where it applies; ``BlockAttention`` is
the implementation for every other case and the kernel's reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from qat.quant import cpu_attention

# Elements (batch x heads x rows x keys) of one block's score matrix: rows per block are chosen
# so that a block stays near this size (64 MiB in float32), at least MIN_ROWS rows.
BLOCK_ELEMENTS = 1 << 24
MIN_ROWS = 16
# Devices whose tensors the block path may read on the host (to skip masked key tails): a read
# there is free; on an accelerator it would stall the queue once per forward.
HOST_READ_DEVICES = frozenset({"cpu"})
# Fewest keys a block computes: the CPU softmax sums a row shorter than its vector width (16
# float32 lanes with AVX-512) in another order, so a shorter row could change P's bits.
MIN_KEYS = 64


def block_rows(batch_heads: int, k_len: int) -> int:
    """Query rows per block for ``batch_heads`` score rows of ``k_len`` keys each."""
    return max(MIN_ROWS, BLOCK_ELEMENTS // max(1, batch_heads * k_len))


def p_block_size(quantize_p: Callable[[Tensor], Tensor] | None) -> int | None:
    """Keys per independently quantised block of P (1: P stays float), or None where P's
    quantiser may couple a row's blocks or is not known (then no key tail is skipped)."""
    if quantize_p is None:
        return 1
    fmt = getattr(quantize_p, "fmt", None)  # a qat FakeQuantizer; any other callable: unknown
    if (
        fmt is None
        or getattr(quantize_p, "rotation", None) is not None
        or getattr(quantize_p, "dim", None) != -1
    ):
        return None
    if not getattr(quantize_p, "enabled", True):
        return 1
    return fmt.prefix_block


def key_stops(
    mask: Tensor | None, q_len: int, k_len: int, rows: int, block: int | None
) -> list[int] | None:
    """For each block of ``rows`` query rows, the keys it computes: one past the last key that
    any of its rows sees, rounded up to a multiple of ``block``, at least ``MIN_KEYS`` and at
    most ``k_len``; ``k_len`` for a block with a row that sees no key (its softmax is uniform
    over all keys). None when every block computes all keys: no mask, unknown P blocks, a mask
    on a device that is not read on the host, or under torch.compile (the read would break the
    graph)."""
    if (
        mask is None
        or block is None
        or mask.device.type not in HOST_READ_DEVICES
        or mask.shape[-1] != k_len
        or q_len == 0
        or torch.compiler.is_compiling()
    ):
        return None
    # a key is masked where the mask is False or holds the dtype's minimum (or -inf): its
    # score is then the minimum and exp() of it minus the row's max is exactly 0
    keep = mask if mask.dtype == torch.bool else ~(mask <= torch.finfo(mask.dtype).min)
    keep = keep.reshape(-1, *keep.shape[-2:])
    seen = keep.any(0)  # [q_len or 1, k_len]: keys seen by a row in any batch/head
    # one past the last seen key per row; a row of no seen key gives k_len (argmax of 0s is 0)
    ends = k_len - seen.flip(-1).to(torch.uint8).argmax(-1)
    ends = torch.where(keep.any(-1).all(0), ends, k_len)
    ends = ends.expand(q_len)
    pad = -q_len % rows
    ends = torch.nn.functional.pad(ends, (0, pad)).reshape(-1, rows).amax(-1)
    ends = ends.clamp(min=MIN_KEYS)
    stops = ((ends + block - 1) // block * block).clamp(max=k_len)
    return stops.tolist()


def _scores_to_probs(
    q: Tensor,
    k: Tensor,
    mask: Tensor | None,
    scaling: float,
    quantize_p: Callable[[Tensor], Tensor] | None,
) -> Tensor:
    """``Q(P)`` of one block of (quantised) query rows ``q`` against keys ``k`` (the same ops,
    in the same order, as ``qat.quant.attention.qat_attention_forward`` without dropout);
    ``mask`` is the block's rows and keys of the mask."""
    # in place where the values allow: the matmul's backward does not need its output, and a
    # fresh rows x L buffer per op costs page faults on the CPU
    scores = torch.matmul(q, k.transpose(-1, -2))
    if scaling != 1.0:  # OPT scales q itself and passes 1.0: x * 1.0 == x, so skip the pass
        scores = scores.mul_(scaling)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
        elif mask.dtype == scores.dtype:
            scores = scores.add_(mask)
        else:  # autocast: bf16 scores + a float32 mask give float32 scores
            scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs if quantize_p is None else quantize_p(probs)


def _block_mask(mask: Tensor | None, start: int, stop: int, k_stop: int) -> Tensor | None:
    """Rows ``start:stop`` and keys ``:k_stop`` of a ``[..., q_len, k_len]`` mask (a broadcast
    row dim stays)."""
    if mask is None:
        return None
    if mask.shape[-2] != 1:
        mask = mask[..., start:stop, :]
    return mask if k_stop == mask.shape[-1] else mask[..., :k_stop]


class BlockAttention(torch.autograd.Function):
    """``softmax(Q K^T * scaling + mask) -> Q(P) -> Q(P) V`` over blocks of query rows.

    Inputs are the already quantised ``q``, ``k``, ``v`` (``[batch, heads, len, dim]``, K and V
    repeated for GQA); ``quantize_p`` is the P quantiser (None: P stays float). Saves q, k, v
    and the mask only, and each block's key count (``key_stops``).
    """

    @staticmethod
    def forward(
        ctx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        scaling: float,
        quantize_p: Callable[[Tensor], Tensor] | None,
        rows: int,
    ) -> Tensor:  # noqa: D102
        ctx.save_for_backward(q, k, v, mask)
        ctx.scaling, ctx.quantize_p, ctx.rows = scaling, quantize_p, rows
        dev = q.device.type  # the backward recomputes under the forward's autocast state
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        q_len, k_len = q.shape[-2], k.shape[-2]
        stops = key_stops(mask, q_len, k_len, rows, p_block_size(quantize_p))
        ctx.stops = stops
        out = None
        for i, start in enumerate(range(0, q_len, rows)):
            stop = min(start + rows, q_len)
            ks = k_len if stops is None else stops[i]
            probs = _scores_to_probs(
                q[..., start:stop, :],
                k[..., :ks, :],
                _block_mask(mask, start, stop, ks),
                scaling,
                quantize_p,
            )
            block = torch.matmul(probs, v[..., :ks, :])
            if out is None:  # the blocks' dtype: autocast may have chosen another than q's
                out = block.new_empty(*q.shape[:-1], v.shape[-1])
            out[..., start:stop, :] = block
        return q.new_empty(*q.shape[:-1], v.shape[-1]) if out is None else out  # no query rows

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: D102
        q, k, v, mask = ctx.saved_tensors
        q_len, k_len = q.shape[-2], k.shape[-2]
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros_like(k)
        grad_v = torch.zeros_like(v)
        dev, enabled, dtype = ctx.autocast
        for i, start in enumerate(range(0, q_len, ctx.rows)):
            stop = min(start + ctx.rows, q_len)
            ks = k_len if ctx.stops is None else ctx.stops[i]
            qb = q[..., start:stop, :].detach().requires_grad_()
            kb = k[..., :ks, :].detach().requires_grad_()
            vb = v[..., :ks, :].detach()
            go = grad_out[..., start:stop, :]
            # recompute this block's Q(P) as the forward ran it and differentiate it; P @ V is
            # not recomputed: its gradients are the two matmuls autograd would run
            with torch.autocast(dev, dtype=dtype, enabled=enabled):
                with torch.enable_grad():
                    probs = _scores_to_probs(
                        qb, kb, _block_mask(mask, start, stop, ks), ctx.scaling, ctx.quantize_p
                    )
                d_probs = torch.matmul(go, vb.transpose(-1, -2))
                gv = torch.matmul(probs.detach().transpose(-1, -2), go)
                gq, gk = torch.autograd.grad(probs, (qb, kb), d_probs.to(probs.dtype))
            grad_q[..., start:stop, :] = gq
            grad_k[..., :ks, :] += gk
            grad_v[..., :ks, :] += gv
        return grad_q, grad_k, grad_v, None, None, None, None


def block_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    scaling: float,
    quantize_p: Callable[[Tensor], Tensor] | None,
    rows: int | None = None,
) -> Tensor:
    """Quantised attention output ``[batch, heads, q_len, dim]`` in memory linear in the
    sequence (see the module docstring); ``rows`` query rows per block (default: ``block_rows``).
    """
    if rows is None:
        rows = block_rows(q.shape[0] * q.shape[1], k.shape[-2])
    if cpu_attention.applies(q, k, v, mask, quantize_p):
        # the fused CPU kernel: a head and a few dozen rows per task (in cache)
        rows = min(rows, cpu_attention.CPU_ROWS)
        stops = key_stops(mask, q.shape[-2], k.shape[-2], rows, p_block_size(quantize_p))
        return cpu_attention.cpu_block_attention(q, k, v, mask, scaling, quantize_p, rows, stops)
    return BlockAttention.apply(q, k, v, mask, scaling, quantize_p, rows)
