"""The ``torch.library`` custom op ``qat::lobcq_fake_quantize`` around the LO-BCQ Triton kernel
(``_lobcq_triton``): one opaque op for ``torch.compile``, DDP and FSDP; the backward is the
straight-through estimator (the gradient passes unchanged, nothing is saved); launching reads
only shapes (Python ints), so there is no host sync."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from qat.formats.kernels._lobcq_triton import lobcq_kernel
from qat.formats.lobcq import NUM_ENTRIES, _cached_luts

# Scalars of a program's array tile or codebook accumulator: rows per program are chosen so
# that neither exceeds it (registers). The interpreter (tests) pays per op, not per element:
# there, larger tiles.
TILE_ELEMS = 4096
INTERPRET_TILE_ELEMS = 1 << 16


def _pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


@functools.lru_cache(maxsize=32)
def lobcq_table(codebooks: tuple[tuple[int, ...], ...], device: torch.device) -> Tensor:
    """The reference's lookup values transposed to ``[bins, NCP]`` (a bin's nearest entry in
    every codebook), the ``NCP - N_c`` padding lanes +inf so that they never win."""
    _, lut_values = _cached_luts(codebooks, device)
    nc, nbins = lut_values.shape
    table = torch.full((nbins, _pow2(nc)), math.inf, device=device)
    table[:, :nc] = lut_values.T
    return table


def launch(x: Tensor, dim: int, block_len: int, array_len: int, table: Tensor) -> Tensor:
    """Run the kernel on ``x`` with arrays along ``dim``."""
    if x.numel() == 0:
        return x.clone()  # a custom op may not return its input
    xc = x.contiguous()
    shape = tuple(xc.shape) or (1,)
    d = dim % len(shape)
    n = shape[d]
    outer, inner = math.prod(shape[:d]), math.prod(shape[d + 1 :])
    ncp, lap, nbp = table.shape[1], _pow2(array_len), _pow2(array_len // block_len)
    elems = INTERPRET_TILE_ELEMS if x.device.type == "cpu" else TILE_ELEMS
    tile = max(1, elems // max(nbp * ncp, lap))
    rows, arrays = outer * inner, -(-n // array_len)
    grid = -(-rows // tile) * arrays
    if grid >= 2**31:
        raise ValueError(f"triton kernels take fewer than 2^31 programs, got {grid}")
    y = torch.empty_like(xc)
    lobcq_kernel[(grid,)](
        xc,
        y,
        table,
        n,
        inner,
        rows,
        arrays,
        LB=block_len,
        LA=array_len,
        LAP=lap,
        NBP=nbp,
        NCP=ncp,
        TILE=tile,
        num_warps=4,
        enable_fp_fusion=False,
    )
    return y.view(x.shape)


@torch.library.custom_op("qat::lobcq_fake_quantize", mutates_args=())
def lobcq_fake_quantize(
    x: Tensor, dim: int, block_len: int, array_len: int, codebooks: list[int]
) -> Tensor:
    """LO-BCQ fake quantisation (``qat.formats.lobcq.LOBCQ.quantize``) in one kernel;
    ``codebooks``: the ``N_c x 16`` integer entries, row by row."""
    rows = tuple(
        tuple(codebooks[i : i + NUM_ENTRIES]) for i in range(0, len(codebooks), NUM_ENTRIES)
    )
    return launch(x, dim, block_len, array_len, lobcq_table(rows, x.device))


@lobcq_fake_quantize.register_fake
def _fake(x: Tensor, *args) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _setup_context(ctx, inputs, output) -> None:
    """The STE saves nothing."""


def _backward(ctx, grad: Tensor):
    return grad, None, None, None, None


lobcq_fake_quantize.register_autograd(_backward, setup_context=_setup_context)
