"""Launch plans and kernel constants: plain Python (no torch), so that the GPU build can be
checked by compiling the kernel in a process that imports nothing else of qat."""

import math
from typing import NamedTuple

# Elements per program: a few KiB of registers per warp group, enough to keep loads wide.
_TILE_ELEMS = 4096
# From this many columns on, a tile takes a contiguous run of them (16-byte vector loads).
_WIDE_INNER = 16
# The format families of fake_quantize_kernel (its KIND; qat/formats/kernels/_triton_kernels.py
# holds the same values as triton constants).
KIND_BFP, KIND_MX, KIND_CODEBOOK, KIND_GGML, KIND_NVFP4 = 0, 1, 2, 3, 4
# Its tile layouts (LAYOUT, see ``plan``): whole blocks in a row; one block position times a
# run of contiguous columns; (position, column) pairs of a few columns.
LAYOUT_BLOCKS, LAYOUT_WIDE, LAYOUT_NARROW = 0, 1, 2
# The masks of the attention kernels (qat/quant/attention/flash_kernels.py, MASK_KIND): none,
# boolean (keep where true), additive (float, added to the scores).
MASK_NONE, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2
# Elements per program of the NVFP4 global-amax pass.
ABSMAX_CHUNK = 4096


# Each family's constants, the kernel's six generic slots P0..P5 in this order.


class BfpParams(NamedTuple):
    """BFP: M, 2^M, 2^M - 1, the exponent range, and ``frac``: 0 for ``scale: max``, else
    ``scale: mse`` with that many error fraction bits (``qat.formats.scale.fixed_point_bits``)."""

    m_bits: int
    m_pow: float
    mant_max: float
    e_lo: int
    e_hi: int
    frac: int


class MxParams(NamedTuple):
    """MX: element mantissa bits, emax, smallest step exponent, max, INT8 or not, ``frac``."""

    mantissa_bits: int
    emax: int
    step_min: int
    max_value: float
    is_int: bool
    frac: int


class CodebookParams(NamedTuple):
    """A codebook: number of levels, signed-absmax normalisation, whether 0 is a level."""

    n_levels: int
    signed_absmax: bool
    has_zero: bool
    unused_3: int = 0
    unused_4: int = 0
    unused_5: int = 0


class GgmlParams(NamedTuple):
    """A llama.cpp block type: Q4_0 (else Q8_0)."""

    q4: bool
    unused_1: int = 0
    unused_2: int = 0
    unused_3: int = 0
    unused_4: int = 0
    unused_5: int = 0


def bfp_params(width: int, exponent_width: int, frac: int = 0) -> BfpParams:
    """Kernel constants for BFP (``BfpParams``)."""
    m, half = width - 1, 2 ** (exponent_width - 1)
    return BfpParams(m, float(2**m), float(2**m - 1), -(half - 1), half, frac)


def mx_params(
    mantissa_bits: int, emax: int, emin: int, max_value: float, is_int: bool, frac: int = 0
) -> MxParams:
    """Kernel constants for MX (``MxParams``)."""
    step_min = max(emin - mantissa_bits, -149)
    return MxParams(mantissa_bits, emax, step_min, float(max_value), bool(is_int), frac)


def codebook_params(levels: tuple[float, ...], signed_absmax: bool) -> CodebookParams:
    """Kernel constants for a codebook (``CodebookParams``)."""
    return CodebookParams(len(levels), bool(signed_absmax), 0.0 in levels)


def ggml_params(q4: bool) -> GgmlParams:
    """Kernel constants for a llama.cpp block type (``GgmlParams``)."""
    return GgmlParams(bool(q4))


class Plan(NamedTuple):
    """How a launch tiles ``x`` viewed as [outer, n, inner] (see ``fake_quantize_kernel``)."""

    n: int
    inner: int
    nb: int
    total: int
    n_col_tiles: int
    layout: int
    bp: int
    tile: int
    grid: int
    num_warps: int


def plan(shape: tuple[int, ...], dim: int, block: int) -> Plan:
    """The launch plan for a contiguous tensor of ``shape`` blocked along ``dim`` (Python ints
    only: no tensor is read, so no host sync)."""
    ndim = len(shape)
    if ndim == 0:
        outer, n, inner = 1, 1, 1
    else:
        d = dim % ndim  # same wrap-around as Format.quantize
        n = shape[d]
        outer, inner = math.prod(shape[:d]), math.prod(shape[d + 1 :])
    bp = _next_pow2(block)
    nb = _cdiv(n, block)
    n_col_tiles = 1
    if inner == 1:  # tiles of whole blocks
        layout, tile = LAYOUT_BLOCKS, max(1, _TILE_ELEMS // bp)
        total = outer * nb
    elif inner >= _WIDE_INNER:  # one block position x a run of contiguous columns
        # At least a 16-column run while that keeps the tile within 4 x _TILE_ELEMS.
        caps = max(_WIDE_INNER, _TILE_ELEMS // bp), max(1, 4 * _TILE_ELEMS // bp)
        layout, tile = LAYOUT_WIDE, min(_next_pow2(inner), *caps)
        n_col_tiles = _cdiv(inner, tile)
        total = outer * nb * n_col_tiles
    else:  # a few columns: tiles of (position, column) pairs
        layout, tile = LAYOUT_NARROW, max(1, _TILE_ELEMS // bp)
        total = outer * nb * inner
    if total >= 2**31:
        raise ValueError(f"triton kernels take fewer than 2^31 blocks, got {total}")
    grid = total if layout == LAYOUT_WIDE else _cdiv(total, tile)
    elems = bp * tile
    warps = 4 if elems <= _TILE_ELEMS else 8 if elems <= 4 * _TILE_ELEMS else 16
    return Plan(n, inner, nb, total, n_col_tiles, layout, bp, tile, grid, warps)


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
