"""Quantised attention in linear memory: blocks of query rows, P recomputed in backward.

Eager quantised attention keeps ``softmax(S)`` and ``Q(P)`` (each ``[batch, heads, L, L]``) for
backward. Here the forward walks over blocks of query rows; each block takes its full rows of
scores (``[rows, L]``, freed before the next block), so the softmax and the P quantiser see
exactly the rows that the eager path gives them: every value of ``Q(P)`` is the eager path's
(same ops on the same rows), for every format. Only ``Q(Q)``, ``Q(K)``, ``Q(V)`` and the mask
(the caller's tensor) are saved; the backward recomputes each block's ``Q(P)`` and
differentiates it (the quantisers are straight-through, as in the eager path; ``Q(P) V`` is not
recomputed, its gradient matmuls are run directly).

Query blocks with whole key rows, rather than key blocks with two-pass softmax statistics, keep
the eager path's values bit for bit (a blocked log-sum-exp would round the normaliser
differently, and a P element on a rounding boundary of the 4-bit grid would flip); the
transient memory is ``rows x L`` per head, linear in L.

Masked key tails (causal masks): where every key from some index on is masked for all rows of
a tile (``TILE_ROWS`` query rows; and each of its rows sees at least one key), that tail's P is
exactly 0 and so is its quantised value, so the tile computes only the keys before it, rounded
up to a whole block of the P format (its quantiser then sees the same blocks). A causal mask so
skips about half the work, as float SDPA does. ``Q(P)`` stays the eager path's bit for bit (at
least ``MIN_KEYS`` keys per tile keep the CPU softmax's summation order). The extent is read
from the mask once per forward, on the host: only for CPU tensors, where that costs no sync
(elsewhere every tile keeps its whole row).

Tiles (on a CPU): every sum over keys or over query rows runs tile by tile, in the same
shapes in every implementation. A BLAS groups a dot product by the GEMM's shape: MKL sums 208
to 368 terms otherwise than more, even when the extra terms are zeros, and a GEMM of a few rows
otherwise than one of many. A 1-ulp attention output moves a 4-bit activation across a
rounding step, and a W4A4 model then scores visibly otherwise (SmolLM2 on 2 x 2048 WikiText-2
tokens: 79.90 with sums over all keys, 83.25 over each tile's). So ``Q(P) V`` is taken over
each tile's keys whether the eager path (``tiled_values``), this module or the C++ kernel takes
it; every GEMM has ``TILE_ROWS`` rows or more (the last tile and the last block reach back into
the ones before, ``spans``); and the backward takes each tile's ``dS K``, ``dS^T Q`` and
``Q(P)^T dO`` and adds them up tile by tile, as the kernel does. The forward values of the
eager path, this module and the kernel are then one set of numbers (tested on real sizes), and
this module's gradients are the kernel's bit for bit (the eager path's one autograd matmul
over all rows differs from both by rounding). Elsewhere (no kernel to agree with) one matmul
per block takes each sum.

On float32 CPU tensors ``block_attention`` hands the same work (same tiles, same key tails) to
the fused C++ kernel of ``qat.quant.attention.cpu`` where it applies and its first-use check
(``kernel_agrees``) saw the same numbers as ``BlockAttention``, the implementation for every
other case and the kernel's reference.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch import Tensor

from qat.formats.bfp import BFP
from qat.quant.attention import cpu as cpu_attention
from qat.quant.ste import FakeQuantizer

logger = logging.getLogger(__name__)

# Elements (batch x heads x rows x keys) of one block's score matrix: rows per block are chosen
# so that a block stays near this size (64 MiB in float32), in whole tiles.
BLOCK_ELEMENTS = 1 << 24
# Query rows per tile: the rows that share a key stop, and the unit of every sum over keys or
# rows (see the module docstring); also the C++ kernel's task (its score rows stay in L2).
TILE_ROWS = 64
# Devices whose tensors the block path may read on the host (to skip masked key tails): a read
# there is free; on an accelerator it would stall the queue once per forward.
HOST_READ_DEVICES = frozenset({"cpu"})
# Fewest keys a tile computes: the CPU softmax sums a row shorter than its vector width (16
# float32 lanes with AVX-512) in another order, so a shorter row could change P's bits.
MIN_KEYS = 64


def block_rows(batch_heads: int, k_len: int) -> int:
    """Query rows per block for ``batch_heads`` score rows of ``k_len`` keys each: as many
    whole tiles as keep a block near ``BLOCK_ELEMENTS``, at least one."""
    rows = BLOCK_ELEMENTS // max(1, batch_heads * k_len)
    return max(1, rows // TILE_ROWS) * TILE_ROWS


def spans(q_len: int, rows: int) -> list[tuple[int, int, int]]:
    """``(first, start, stop)`` of each block of ``rows`` query rows: it owns rows
    ``start:stop`` and computes rows ``first:stop``, where the last block reaches back into
    the one before it so that every block's GEMMs have ``rows`` rows (a BLAS may sum a product
    of a few rows in another order than of many; all rows when ``q_len < rows``)."""
    out = []
    for start in range(0, q_len, rows):
        stop = min(start + rows, q_len)
        out.append((max(0, stop - rows), start, stop))
    return out


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
    """For each block of ``rows`` query rows (``spans``: the rows it computes), the keys it
    computes: one past the last key that any of those rows sees, rounded up to a multiple of
    ``block``, at least ``MIN_KEYS`` and at most ``k_len``; ``k_len`` for a block with a row
    that sees no key (its softmax is uniform over all keys). None when every block computes
    all keys: no mask, unknown P blocks, a mask on a device that is not read on the host, or
    under torch.compile (the read would break the graph)."""
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
    whole = (q_len - 1) // rows * rows  # the rows of the blocks before the last
    last = ends[max(0, q_len - rows) :].amax()[None]
    ends = torch.cat([ends[:whole].reshape(-1, rows).amax(-1), last]).clamp(min=MIN_KEYS)
    stops = ((ends + block - 1) // block * block).clamp(max=k_len)
    return stops.tolist()


def tile_stops(
    mask: Tensor | None, q_len: int, k_len: int, quantize_p: Callable[[Tensor], Tensor] | None
) -> list[int] | None:
    """``key_stops`` of each tile (``TILE_ROWS`` query rows), or None: every tile takes all
    keys."""
    return key_stops(mask, q_len, k_len, TILE_ROWS, p_block_size(quantize_p))


def tiled_values(probs: Tensor, v: Tensor, stops: list[int] | None) -> Tensor:
    """``probs @ v`` (``probs`` ``[..., q_len, keys]``, 0 past each tile's stop) on a CPU tile
    by tile, as the block path and its kernel take it (``spans`` of ``TILE_ROWS``, each over
    its ``stops`` keys, None: all); elsewhere one matmul."""
    q_len = probs.shape[-2]
    if probs.device.type not in HOST_READ_DEVICES or q_len <= TILE_ROWS:
        return torch.matmul(probs, v[..., : probs.shape[-1], :])
    keys = [probs.shape[-1]] * len(spans(q_len, TILE_ROWS)) if stops is None else stops
    return _TiledValues.apply(probs, v, keys)


class _TiledValues(torch.autograd.Function):
    """``tiled_values``' product; the backward writes each tile's share of dP and dV in place
    (autograd of the tiles' slices would zero-fill a full-size copy of P and of V per tile)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, probs: Tensor, v: Tensor, keys: list[int]) -> Tensor:  # noqa: D102
        ctx.save_for_backward(probs, v)
        ctx.keys = keys
        out = None
        for (first, start, stop), ks in zip(spans(probs.shape[-2], TILE_ROWS), keys):
            tile = torch.matmul(probs[..., first:stop, :ks], v[..., :ks, :])
            if out is None:  # the product's dtype (autocast's choice)
                out = tile.new_empty(*probs.shape[:-1], v.shape[-1])
            out[..., start:stop, :] = tile[..., start - first :, :]
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out: Tensor):  # noqa: D102
        probs, v = ctx.saved_tensors
        d_probs = torch.zeros_like(probs) if ctx.needs_input_grad[0] else None
        d_v = torch.zeros_like(v) if ctx.needs_input_grad[1] else None
        for (_, start, stop), ks in zip(spans(probs.shape[-2], TILE_ROWS), ctx.keys):
            go = grad_out[..., start:stop, :]
            if d_probs is not None:
                d_probs[..., start:stop, :ks] = torch.matmul(go, v[..., :ks, :].transpose(-1, -2))
            if d_v is not None:
                d_v[..., :ks, :] += torch.matmul(probs[..., start:stop, :ks].transpose(-1, -2), go)
        return d_probs, d_v, None


def _probs_of_scores(
    scores: Tensor,
    mask: Tensor | None,
    scaling: float,
    quantize_p: Callable[[Tensor], Tensor] | None,
    dtype: torch.dtype,
    in_place: bool,
) -> Tensor:
    """``Q(softmax(scores * scaling + mask))`` in ``dtype`` (q's: the same ops, in the same
    order, as ``qat.quant.attention.interface.qat_attention_forward`` without dropout);
    ``in_place``: the scores may be overwritten (not while autograd needs them)."""
    if scaling != 1.0:  # OPT scales q itself and passes 1.0: x * 1.0 == x, so skip the pass
        scores = scores.mul_(scaling) if in_place else scores * scaling
    if mask is not None:
        if mask.dtype == torch.bool:
            lowest = torch.finfo(scores.dtype).min
            if in_place:
                scores = scores.masked_fill_(~mask, lowest)
            else:
                scores = scores.masked_fill(~mask, lowest)
        elif mask.dtype == scores.dtype:
            scores = scores.add_(mask) if in_place else scores + mask
        else:  # autocast: bf16 scores + a float32 mask give float32 scores
            scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    return probs if quantize_p is None else quantize_p(probs)


def _block_mask(mask: Tensor | None, first: int, stop: int, k_stop: int) -> Tensor | None:
    """Rows ``first:stop`` and keys ``:k_stop`` of a ``[..., q_len, k_len]`` mask (a broadcast
    row dim stays)."""
    if mask is None:
        return None
    if mask.shape[-2] != 1:
        mask = mask[..., first:stop, :]
    return mask if k_stop == mask.shape[-1] else mask[..., :k_stop]


def _block_tiles(
    q_len: int, k_len: int, rows: int, stops: list[int] | None
) -> list[tuple[tuple[int, int, int], int, list[tuple[tuple[int, int, int], int]]]]:
    """Each block of ``rows`` query rows (``spans``: rows it computes and owns), the keys it
    computes (the most any of its tiles takes) and its tiles (``spans`` of ``TILE_ROWS``,
    each with its key stop; all keys where ``stops`` is None). ``rows`` is whole tiles, so a
    block's tiles are the ones that start inside it, and their rows lie within its rows."""
    tiles = spans(q_len, TILE_ROWS)
    keys = [k_len] * len(tiles) if stops is None else stops
    out = []
    for first, start, stop in spans(q_len, rows):
        mine = [(t, ks) for t, ks in zip(tiles, keys) if start <= t[1] < stop]
        out.append(((first, start, stop), max(ks for _, ks in mine), mine))
    return out


class BlockAttention(torch.autograd.Function):
    """``softmax(Q K^T * scaling + mask) -> Q(P) -> Q(P) V`` over blocks of query rows.

    Inputs are the already quantised ``q``, ``k``, ``v`` (``[batch, heads, len, dim]``, K and V
    repeated for GQA); ``quantize_p`` is the P quantiser (None: P stays float); ``rows`` query
    rows per block, whole tiles. Saves q, k, v and the mask only, and each tile's key count
    (``tile_stops``). On a CPU the sums over keys and rows run tile by tile (see the module
    docstring); elsewhere one matmul per block takes each.
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
        if rows % TILE_ROWS:
            raise ValueError(f"rows per block must be whole tiles of {TILE_ROWS}, got {rows}")
        ctx.save_for_backward(q, k, v, mask)
        ctx.scaling, ctx.quantize_p, ctx.rows = scaling, quantize_p, rows
        dev = q.device.type  # the backward recomputes under the forward's autocast state
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        q_len, k_len = q.shape[-2], k.shape[-2]
        ctx.stops = tile_stops(mask, q_len, k_len, quantize_p)
        tiled = dev in HOST_READ_DEVICES
        out = None
        for (first, start, stop), ks, tiles in _block_tiles(q_len, k_len, rows, ctx.stops):
            # in place: the scores are this block's own buffer, and autograd is not recording
            scores = torch.matmul(q[..., first:stop, :], k[..., :ks, :].transpose(-1, -2))
            mask_b = _block_mask(mask, first, stop, ks)
            probs = _probs_of_scores(scores, mask_b, scaling, quantize_p, q.dtype, in_place=True)
            if not tiled:
                block = torch.matmul(probs, v[..., :ks, :])
                if out is None:  # the blocks' dtype: autocast may have chosen another than q's
                    out = block.new_empty(*q.shape[:-1], v.shape[-1])
                out[..., start:stop, :] = block[..., start - first :, :]
                continue
            for (t0, t_start, t1), kt in tiles:
                p_t = probs[..., t0 - first : t1 - first, :kt]
                tile = torch.matmul(p_t, v[..., :kt, :])
                if out is None:
                    out = tile.new_empty(*q.shape[:-1], v.shape[-1])
                out[..., t_start:t1, :] = tile[..., t_start - t0 :, :]
        return q.new_empty(*q.shape[:-1], v.shape[-1]) if out is None else out  # no query rows

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: D102
        q, k, v, mask = ctx.saved_tensors
        q_len, k_len = q.shape[-2], k.shape[-2]
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros_like(k)
        grad_v = torch.zeros_like(v)
        dev, enabled, dtype = ctx.autocast
        tiled = dev in HOST_READ_DEVICES
        for (first, start, stop), ks, tiles in _block_tiles(q_len, k_len, ctx.rows, ctx.stops):
            qb, kb, vb = q[..., first:stop, :], k[..., :ks, :], v[..., :ks, :]
            go = grad_out[..., first:stop, :]
            # recompute this block's Q(P) as the forward ran it and differentiate it to the
            # scores; P @ V is not recomputed
            with torch.autocast(dev, dtype=dtype, enabled=enabled):
                scores = torch.matmul(qb, kb.transpose(-1, -2)).requires_grad_()
                with torch.enable_grad():
                    mask_b = _block_mask(mask, first, stop, ks)
                    probs = _probs_of_scores(
                        scores, mask_b, ctx.scaling, ctx.quantize_p, q.dtype, in_place=False
                    )
                d_probs = torch.matmul(go, vb.transpose(-1, -2)).to(probs.dtype)
                (d_scores,) = torch.autograd.grad(probs, scores, d_probs)
                probs = probs.detach()
                if not tiled:
                    tiles = [((first, start, stop), ks)]  # the block as one piece
                for (t0, t_start, t1), kt in tiles:
                    # each piece's sums; rows before t_start belong to the piece before: their
                    # dS and Q(P) rows are zeroed, so every sum over rows has the same terms as
                    # the kernel's GEMMs (a copy of Q(P): the quantiser's output is the caller's)
                    a, b, own = t0 - first, t1 - first, t_start - t0
                    ds_t, p_t = d_scores[..., a:b, :kt], probs[..., a:b, :kt]
                    grad_q[..., t_start:t1, :] = torch.matmul(ds_t, k[..., :kt, :])[..., own:, :]
                    if own:
                        ds_t, p_t = ds_t.clone(), p_t.clone()
                        ds_t[..., :own, :] = 0
                        p_t[..., :own, :] = 0
                    grad_k[..., :kt, :] += torch.matmul(ds_t.transpose(-1, -2), q[..., t0:t1, :])
                    grad_v[..., :kt, :] += torch.matmul(
                        p_t.transpose(-1, -2), grad_out[..., t0:t1, :]
                    )
        return grad_q, grad_k, grad_v, None, None, None, None


@functools.cache
def kernel_agrees() -> bool:
    """Whether the C++ kernel gives this module's numbers, forward and backward, on a seeded
    random case (checked once per process, at its first use, whatever the caller's grad,
    inference or autocast mode): a torch upgrade may change the ATen internals it relies on.
    False, with one warning, on any difference (or error)."""
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
            diff = _kernel_difference()
    except Exception as e:  # noqa: BLE001 - any failure of the check: the PyTorch path
        diff = (
            f"an error ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
        )
    if diff is None:
        return True
    logger.warning(
        "qat: the CPU attention kernel gives %s where the PyTorch block path does not (torch "
        "%s): the PyTorch path runs instead",
        diff,
        torch.__version__,
    )
    return False


def _kernel_difference() -> str | None:
    """What differs between the kernel and ``BlockAttention`` on the self-check's case."""
    g = torch.Generator().manual_seed(0)
    # 160 tokens: tiles of 64, 128 and all keys, in blocks of two tiles (the last block and the
    # last tile reaching back), a left-padded row and a row that sees no key; BFP P in blocks
    # of 16 (vector code) and of 5, and float P
    n = 160
    q, k, v, grad = (torch.randn(2, 1, n, 64, generator=g) for _ in range(4))
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    mask[1, :, :, :7] = False
    mask[1, :, 3] = False
    formats = (BFP(width=4, exponent_width=8, block_size=16), BFP(3, 3, block_size=5))
    for quantize_p in (*(FakeQuantizer(f, backend="reference") for f in formats), None):
        results = []
        for kernel in (True, False):
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            if kernel:
                stops = tile_stops(mask, n, n, quantize_p)
                out = cpu_attention.cpu_block_attention(
                    qq, kk, vv, mask, 0.125, quantize_p, TILE_ROWS, stops
                )
            else:
                out = BlockAttention.apply(qq, kk, vv, mask, 0.125, quantize_p, 2 * TILE_ROWS)
            out.backward(grad)
            results.append((out.detach(), qq.grad, kk.grad, vv.grad))
        for name, a, b in zip(("output", "dQ", "dK", "dV"), *results):
            if not torch.equal(a, b):
                return f"another {name} (by up to {float((a - b).abs().max()):.3g})"
    return None


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
    sequence (see the module docstring); ``rows`` query rows per block (default:
    ``block_rows``; the kernel takes tiles of ``TILE_ROWS``)."""
    if rows is None:
        rows = block_rows(q.shape[0] * q.shape[1], k.shape[-2])
    if (
        q.shape[-2] >= TILE_ROWS
        and cpu_attention.applies(q, k, v, mask, quantize_p)
        and kernel_agrees()
    ):
        # the fused CPU kernel: one head and one tile per task (in cache), the same numbers
        stops = tile_stops(mask, q.shape[-2], k.shape[-2], quantize_p)
        return cpu_attention.cpu_block_attention(
            q, k, v, mask, scaling, quantize_p, TILE_ROWS, stops
        )
    return BlockAttention.apply(q, k, v, mask, scaling, quantize_p, rows)
