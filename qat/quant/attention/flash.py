"""Quantised attention in fused Triton kernels (CUDA): no ``L x L`` tensor, forward or backward.

The same maths as ``qat.quant.attention.block`` (``softmax(Q K^T * scaling + mask)`` in float32,
rounded to the inputs' dtype, P quantised along the keys, ``Q(P) V``), flash-attention style
(``qat.quant.attention.flash_kernels``): pass 1 over key tiles gives each query row's max and
normaliser, pass 2 recomputes every P tile exactly normalised, quantises it in registers with the P
format and accumulates ``Q(P) V``. Saved for backward: Q, K, V (quantised), the mask, the row max
and normaliser. The backward recomputes P tiles; the quantisers are straight-through, so
``dP = dO V^T``, ``dS = P * (dP - rowsum(dP * P))`` (not ``rowsum(dO * O)``: O is made of
``Q(P)``), ``dQ = dS K * scaling``, ``dK = dS^T Q * scaling``, ``dV = Q(P)^T dO``.

P formats: BFP (either scale rule) with a power-of-two block of at most ``MAX_P_BLOCK`` keys,
or P unquantised; ``flash_applies`` says False for anything else, and the caller runs the block
path. The kernels repeat the reference's dtype roundings, but P itself is a few ulps off torch's
softmax (the normaliser summed online, the GPU's ``exp``, tiled sums), so a P element on a
rounding boundary of the P grid may land on the neighbouring grid point (tests/
test_attention_kernel.py measures how rarely). Key tiles whose mask entries are all masked are
skipped (causal masks: about half the tiles) where that changes no value.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qat.formats.bfp import BFP
from qat.formats.kernels._plan import MASK_ADDITIVE, MASK_BOOL, MASK_NONE, bfp_params
from qat.formats.scale import fixed_point_bits
from qat.quant.attention.block import p_block_size
from qat.quant.ste import FakeQuantizer

# Key tiles hold whole P blocks: a P block must divide the key tile (powers of two do).
MAX_P_BLOCK = 128
TILE = 64  # query rows and keys per tile on a GPU (keys: at least the P block)
# Devices whose tensors the kernels take (tests add "cpu" under TRITON_INTERPRET=1).
DEVICES = ("cuda",)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _p_format(quantize_p: FakeQuantizer | None) -> BFP | None:
    """The P format the kernel quantises with (None: P stays float)."""
    if quantize_p is None or not getattr(quantize_p, "enabled", True):
        return None
    return quantize_p.fmt


def _p_supported(quantize_p: FakeQuantizer | None) -> bool:
    if quantize_p is None or not getattr(quantize_p, "enabled", True):
        return True
    # p_block_size: None where the quantiser rotates, runs along another dim or is not qat's
    b = p_block_size(quantize_p)
    return b is not None and type(quantize_p.fmt) is BFP and b <= MAX_P_BLOCK and b & (b - 1) == 0


def flash_applies(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, quantize_p: FakeQuantizer | None
) -> bool:
    """Whether the kernels compute this attention (shapes, dtypes, device and the P format;
    reads no tensor data, so no host sync)."""
    if q.device.type not in DEVICES or not _p_supported(quantize_p):
        return False
    # Imported here: qat.formats.kernels imports triton, which CPU-only runs never need.
    from qat.formats.kernels import triton_available

    if not triton_available():
        return False
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    dev = q.device.type  # autocast would run the reference's matmuls in another dtype
    if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) != q.dtype:
        return False
    if q.dim() != 4 or k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3]:
        return False
    if mask is not None:
        if mask.dim() != 4 or not (mask.dtype == torch.bool or mask.dtype in _DTYPES):
            return False
        try:
            torch.broadcast_shapes(mask.shape, (*q.shape[:-1], k.shape[-2]))
        except RuntimeError:
            return False
    return True


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _p_constants(fmt: BFP | None) -> dict:
    """The kernels' P format constants: ``QUANT_P``, ``PB`` (block) and ``P0..P5`` (BFP's
    slots, ``_plan.BfpParams``)."""
    if fmt is None:
        return {"QUANT_P": False, "PB": 1, **{f"P{i}": 0 for i in range(6)}}
    frac = fixed_point_bits(fmt.block_size) if fmt.scale == "mse" else 0
    p = bfp_params(fmt.width, fmt.exponent_width, frac)
    return {
        "QUANT_P": True,
        "PB": fmt.block_size,
        "P0": p.m_bits,
        "P1": p.m_pow,
        "P2": p.mant_max,
        "P3": p.e_lo,
        "P4": p.e_hi,
        "P5": p.frac,
    }


def _mask_args(q: Tensor, k_len: int, mask: Tensor | None) -> tuple[Tensor, tuple, dict]:
    """The mask pointer (q itself when none), its 4 strides broadcast to ``[b, h, q, k]``
    (0 on broadcast dims: no copy) and the mask constants."""
    fill = torch.finfo(q.dtype).min
    if mask is None:
        consts = {"MASK_KIND": MASK_NONE, "ROUND_ADD": False, "FILL": fill, "MASK_MIN": fill}
        return q, (0, 0, 0, 0), consts
    full = mask.expand(*q.shape[:-1], k_len)
    if mask.dtype == torch.bool:
        full = full.view(torch.uint8)  # same bytes; a plain integer pointer in the kernel
        consts = {"MASK_KIND": MASK_BOOL, "ROUND_ADD": False, "FILL": fill, "MASK_MIN": fill}
    else:  # scores + mask: promoted to the wider dtype, rounded to q's only if they match
        mmin = torch.finfo(mask.dtype).min
        consts = {
            "MASK_KIND": MASK_ADDITIVE,
            "ROUND_ADD": mask.dtype == q.dtype,
            "FILL": mmin,
            "MASK_MIN": mmin,
        }
    return full, tuple(full.stride()), consts


def _launch_args(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float, tiles: tuple[int, int]
) -> tuple[Tensor, tuple, dict]:
    """The mask pointer, the kernels' scalar arguments after it and their shared constants."""
    _, h, lq, d = q.shape
    lk, dv = k.shape[-2], v.shape[-1]
    mptr, strides, mconsts = _mask_args(q, lk, mask)
    consts = {
        "BM": tiles[0],
        "BN": tiles[1],
        "DP": max(16, _next_pow2(d)),
        "DVP": max(16, _next_pow2(dv)),
        "SCALE": scaling != 1.0,
        # the interpreter's half-precision dot is wrong: it multiplies in float32
        "WIDEN": q.device.type != "cuda",
        # no multiply fused into an add: BFP's rounding trick needs the two roundings
        "enable_fp_fusion": False,
        **mconsts,
    }
    return mptr, (h, lq, lk, d, dv, *strides, scaling), consts


class FlashQuantAttention(torch.autograd.Function):
    """``softmax(Q K^T * scaling + mask) -> Q(P) -> Q(P) V`` in Triton kernels (module doc)."""

    @staticmethod
    def forward(
        ctx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        scaling: float,
        p_fmt: BFP | None,
        tiles: tuple[int, int],
    ) -> Tensor:  # noqa: D102
        from qat.quant.attention.flash_kernels import flash_forward_kernel

        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        b, h, lq, _ = q.shape
        # no keys: the reference's P @ V is a sum of nothing, zeros
        out = (q.new_empty if k.shape[-2] else q.new_zeros)(b, h, lq, v.shape[-1])
        m = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
        norm = torch.empty_like(m)
        mptr, args, consts = _launch_args(q, k, v, mask, scaling, tiles)
        if out.numel() and k.shape[-2]:
            flash_forward_kernel[(b * h * -(-lq // tiles[0]),)](
                q, k, v, out, mptr, m, norm, *args, **consts, **_p_constants(p_fmt)
            )
        ctx.save_for_backward(q, k, v, mask, m, norm)
        ctx.scaling, ctx.p_fmt, ctx.tiles = scaling, p_fmt, tiles
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: D102
        from qat.quant.attention.flash_kernels import (
            flash_backward_dkv_kernel,
            flash_backward_dq_kernel,
        )

        q, k, v, mask, m, norm = ctx.saved_tensors
        do = grad_out.to(q.dtype).contiguous()
        b, h, lq, _ = q.shape
        lk, (bm, bn) = k.shape[-2], ctx.tiles
        dq, dk, dvv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        delta = torch.empty_like(m)
        mptr, args, consts = _launch_args(q, k, v, mask, ctx.scaling, ctx.tiles)
        if q.numel() and k.numel():  # every element of dq, dk, dv is written
            flash_backward_dq_kernel[(b * h * -(-lq // bm),)](
                q, k, v, do, mptr, m, norm, delta, dq, *args, **consts
            )
            flash_backward_dkv_kernel[(b * h * -(-lk // bn),)](
                q,
                k,
                v,
                do,
                mptr,
                m,
                norm,
                delta,
                dk,
                dvv,
                *args,
                **consts,
                **_p_constants(ctx.p_fmt),
            )
        else:
            for t in (dq, dk, dvv):
                t.zero_()
        return dq, dk, dvv, None, None, None, None


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    scaling: float,
    quantize_p: FakeQuantizer | None,
    tile: int = TILE,
) -> Tensor:
    """Quantised attention ``[batch, heads, q_len, dv]`` in Triton kernels (module doc).

    Takes what ``qat.quant.attention.block.block_attention`` takes (quantised q, k, v with K and
    V repeated for GQA; the P quantiser, a ``FakeQuantizer`` or None); call it where
    ``flash_applies`` says True. ``tile`` (a power of two, at least 16) sets the query rows
    and keys per tile; a key tile grows to a larger P block.
    """
    fmt = _p_format(quantize_p)
    keys = tile if fmt is None else max(tile, fmt.block_size)
    return FlashQuantAttention.apply(q, k, v, mask, scaling, fmt, (tile, keys))
