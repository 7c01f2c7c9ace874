"""The ``torch.library`` custom ops (namespace ``qat``) around the Triton kernels.

One op per format family, so ``torch.compile``, DDP and FSDP see a single opaque op. The
backward is the straight-through estimator: the upstream gradient passes unchanged and the op
saves no tensor. Launching reads only shapes (Python ints): no host sync.
"""

from __future__ import annotations

import math

import torch
import triton
from torch import Tensor

from qat.formats.codebook import level_tensors
from qat.formats.kernels._triton_kernels import fake_quantize_kernel

# Elements per program: a few KiB of registers per warp group, enough to keep loads wide.
_TILE_ELEMS = 4096
# From this many columns on, a tile takes a contiguous run of them (16-byte vector loads).
_WIDE_INNER = 16
KIND_BFP, KIND_MX, KIND_CODEBOOK = 0, 1, 2


def _launch(x: Tensor, dim: int, kind: int, block: int, params: tuple,
            tables: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Run the kernel on ``x`` viewed as [outer, n, inner] with blocks along ``dim``."""
    if x.numel() == 0:
        return x.clone()
    xc = x.contiguous()
    ndim = xc.dim()
    if ndim == 0:
        outer, n, inner = 1, 1, 1
    else:
        d = dim % ndim  # same wrap-around as Format.quantize
        n = xc.shape[d]
        outer, inner = math.prod(xc.shape[:d]), math.prod(xc.shape[d + 1:])
    y = torch.empty_like(xc)
    bp = triton.next_power_of_2(block)
    nb = triton.cdiv(n, block)
    n_col_tiles = 1
    if inner == 1:  # tiles of whole blocks
        layout, tile = 0, max(1, _TILE_ELEMS // bp)
        total = outer * nb
    elif inner >= _WIDE_INNER:  # one block position x a run of contiguous columns
        # At least a 16-column run while that keeps the tile within 4 x _TILE_ELEMS.
        tile = max(_WIDE_INNER, _TILE_ELEMS // bp), max(1, 4 * _TILE_ELEMS // bp)
        layout, tile = 1, min(triton.next_power_of_2(inner), *tile)
        n_col_tiles = triton.cdiv(inner, tile)
        total = outer * nb * n_col_tiles
    else:  # a few columns: tiles of (position, column) pairs
        layout, tile = 2, max(1, _TILE_ELEMS // bp)
        total = outer * nb * inner
    if total >= 2**31:
        raise ValueError(f"triton kernels take fewer than 2^31 blocks, got {total}")
    grid = (triton.cdiv(total, tile) if layout != 1 else total,)
    lv, mids = tables if tables is not None else (xc, xc)  # unused pointers for bfp/mx
    warps = 4 if bp * tile <= _TILE_ELEMS else 8 if bp * tile <= 4 * _TILE_ELEMS else 16
    fake_quantize_kernel[grid](
        xc, y, lv, mids, n, inner, nb, total, n_col_tiles,
        KIND=kind, BLOCK=block, BP=bp, TILE=tile, LAYOUT=layout,
        P0=params[0], P1=params[1], P2=params[2], P3=params[3], P4=params[4],
        num_warps=warps, enable_fp_fusion=False,
    )
    return y.view(x.shape)


def _fake(x: Tensor, *args) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _setup_context(ctx, inputs, output) -> None:
    """The STE saves nothing."""


def _ste_backward(nargs: int):
    def backward(ctx, grad: Tensor):
        return (grad,) + (None,) * (nargs - 1)

    return backward


@torch.library.custom_op("qat::bfp_fake_quantize", mutates_args=())
def bfp_fake_quantize(x: Tensor, dim: int, width: int, exponent_width: int,
                      block_size: int) -> Tensor:
    """BFP fake quantisation (``qat.formats.bfp.BFP.quantize``) in one kernel."""
    m = width - 1
    params = (m, float(2**m), float(2**m - 1), -(2 ** (exponent_width - 1) - 1),
              2 ** (exponent_width - 1))
    return _launch(x, dim, KIND_BFP, block_size, params)


@torch.library.custom_op("qat::mx_fake_quantize", mutates_args=())
def mx_fake_quantize(x: Tensor, dim: int, block_size: int, mantissa_bits: int, emax: int,
                     emin: int, max_value: float, is_int: bool) -> Tensor:
    """OCP MX fake quantisation (``qat.formats.mx``) in one kernel."""
    step_min = max(emin - mantissa_bits, -149)
    params = (mantissa_bits, emax, step_min, float(max_value), bool(is_int))
    return _launch(x, dim, KIND_MX, block_size, params)


@torch.library.custom_op("qat::codebook_fake_quantize", mutates_args=())
def codebook_fake_quantize(x: Tensor, dim: int, block_size: int, levels: list[float],
                           signed_absmax: bool) -> Tensor:
    """4-bit codebook fake quantisation (``qat.formats.codebook``, no outliers) in one kernel."""
    lv = tuple(levels)
    # The reference's own float32 levels and midpoints, cached per device.
    tables = level_tensors(lv, x.device)
    params = (len(lv), bool(signed_absmax), 0.0 in lv, 0, 0)
    return _launch(x, dim, KIND_CODEBOOK, block_size, params, tables)


for _op, _nargs in ((bfp_fake_quantize, 5), (mx_fake_quantize, 8),
                    (codebook_fake_quantize, 5)):
    _op.register_fake(_fake)
    _op.register_autograd(_ste_backward(_nargs), setup_context=_setup_context)
