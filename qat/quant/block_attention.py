"""Quantised attention in linear memory: blocks of query rows, P recomputed in backward.

Eager quantised attention keeps ``softmax(S)`` and ``Q(P)`` (each ``[batch, heads, L, L]``) for
backward. Here the forward walks over blocks of query rows; each block takes its full rows of
scores (``[rows, L]``, freed before the next block), so the softmax and the P quantiser see
exactly the rows that the eager path gives them: every value of ``Q(P)`` and of the output is
the eager path's (same ops on the same rows), for every format. Only ``Q(Q)``, ``Q(K)``,
``Q(V)`` and the mask (the caller's tensor) are saved; the backward recomputes each block's
forward and differentiates it (the quantisers are straight-through, as in the eager path), so
the gradients of a block are the eager path's and only the sums of K's and V's gradients over
blocks differ from the one-matmul sums by rounding.

Query blocks with whole key rows, rather than key blocks with two-pass softmax statistics, keep
the eager path's values bit for bit (a blocked log-sum-exp would round the normaliser
differently, and a P element on a rounding boundary of the 4-bit grid would flip); the
transient memory is ``rows x L`` per head, linear in L.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

# Elements (batch x heads x rows x keys) of one block's score matrix: rows per block are chosen
# so that a block stays near this size (64 MiB in float32), at least MIN_ROWS rows.
BLOCK_ELEMENTS = 1 << 24
MIN_ROWS = 16


def block_rows(batch_heads: int, k_len: int) -> int:
    """Query rows per block for ``batch_heads`` score rows of ``k_len`` keys each."""
    return max(MIN_ROWS, BLOCK_ELEMENTS // max(1, batch_heads * k_len))


def _scores_to_out(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float,
                   quantize_p: Callable[[Tensor], Tensor] | None) -> Tensor:
    """One block of eager quantised attention (the same ops, in the same order, as
    ``qat.quant.attention.qat_attention_forward`` without dropout): ``q`` is a block of
    (quantised) query rows, ``mask`` its rows of the mask."""
    scores = torch.matmul(q, k.transpose(-1, -2))
    if scaling != 1.0:  # OPT scales q itself and passes 1.0: x * 1.0 == x, so skip the pass
        scores = scores * scaling
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if quantize_p is not None:
        probs = quantize_p(probs)
    return torch.matmul(probs, v)


def _mask_rows(mask: Tensor | None, start: int, stop: int) -> Tensor | None:
    """Rows ``start:stop`` of a ``[..., q_len, k_len]`` mask (a broadcast row dim stays)."""
    if mask is None or mask.shape[-2] == 1:
        return mask
    return mask[..., start:stop, :]


class BlockAttention(torch.autograd.Function):
    """``softmax(Q K^T * scaling + mask) -> Q(P) -> Q(P) V`` over blocks of query rows.

    Inputs are the already quantised ``q``, ``k``, ``v`` (``[batch, heads, len, dim]``, K and V
    repeated for GQA); ``quantize_p`` is the P quantiser (None: P stays float). Saves q, k, v
    and the mask only.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float,
                quantize_p: Callable[[Tensor], Tensor] | None, rows: int) -> Tensor:  # noqa: D102
        ctx.save_for_backward(q, k, v, mask)
        ctx.scaling, ctx.quantize_p, ctx.rows = scaling, quantize_p, rows
        dev = q.device.type  # the backward recomputes under the forward's autocast state
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        out = None
        for start in range(0, q.shape[-2], rows):
            stop = min(start + rows, q.shape[-2])
            block = _scores_to_out(q[..., start:stop, :], k, v, _mask_rows(mask, start, stop),
                                   scaling, quantize_p)
            if out is None:  # the blocks' dtype: autocast may have chosen another than q's
                out = block.new_empty(*q.shape[:-1], v.shape[-1])
            out[..., start:stop, :] = block
        return q.new_empty(*q.shape[:-1], v.shape[-1]) if out is None else out  # no query rows

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: D102
        q, k, v, mask = ctx.saved_tensors
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros_like(k)
        grad_v = torch.zeros_like(v)
        kd, vd = k.detach().requires_grad_(), v.detach().requires_grad_()
        for start in range(0, q.shape[-2], ctx.rows):
            stop = min(start + ctx.rows, q.shape[-2])
            qb = q[..., start:stop, :].detach().requires_grad_()
            dev, enabled, dtype = ctx.autocast
            # recompute this block's forward as the forward ran it, then differentiate it
            with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
                out = _scores_to_out(qb, kd, vd, _mask_rows(mask, start, stop), ctx.scaling,
                                     ctx.quantize_p)
                gq, gk, gv = torch.autograd.grad(out, (qb, kd, vd),
                                                 grad_out[..., start:stop, :])
            grad_q[..., start:stop, :] = gq
            grad_k += gk
            grad_v += gv
        return grad_q, grad_k, grad_v, None, None, None, None


def block_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float,
                    quantize_p: Callable[[Tensor], Tensor] | None,
                    rows: int | None = None) -> Tensor:
    """Quantised attention output ``[batch, heads, q_len, dim]`` in memory linear in the
    sequence (see the module docstring); ``rows`` query rows per block (default: ``block_rows``).
    """
    if rows is None:
        rows = block_rows(q.shape[0] * q.shape[1], k.shape[-2])
    return BlockAttention.apply(q, k, v, mask, scaling, quantize_p, rows)
