"""Launch plans and kernel constants: plain Python (no torch), so that the GPU build can be
checked by compiling the kernel in a process that imports nothing else of qat."""

import math
from typing import NamedTuple

# Elements per program: a few KiB of registers per warp group, enough to keep loads wide.
_TILE_ELEMS = 4096
# From this many columns on, a tile takes a contiguous run of them (16-byte vector loads).
_WIDE_INNER = 16
KIND_BFP, KIND_MX, KIND_CODEBOOK, KIND_GGML, KIND_NVFP4 = 0, 1, 2, 3, 4
# Elements per program of the NVFP4 global-amax pass.
ABSMAX_CHUNK = 4096


def bfp_params(width: int, exponent_width: int, frac: int = 0) -> tuple:
    """Kernel constants P0..P5 for BFP: M, 2^M, 2^M - 1, exponent range, and P5 = ``frac``:
    0 for ``scale: max``, else ``scale: mse`` with that many error fraction bits
    (``qat.formats.scale.fixed_point_bits``)."""
    m = width - 1
    return (
        m,
        float(2**m),
        float(2**m - 1),
        -(2 ** (exponent_width - 1) - 1),
        2 ** (exponent_width - 1),
        frac,
    )


def mx_params(
    mantissa_bits: int, emax: int, emin: int, max_value: float, is_int: bool, frac: int = 0
) -> tuple:
    """Kernel constants for MX: element mantissa bits, emax, smallest step exponent, max,
    INT8 or not, and ``frac`` as for BFP."""
    step_min = max(emin - mantissa_bits, -149)
    return mantissa_bits, emax, step_min, float(max_value), bool(is_int), frac


def codebook_params(levels: tuple[float, ...], signed_absmax: bool) -> tuple:
    """Kernel constants for a codebook: number of levels, normalisation, whether 0 is a level."""
    return len(levels), bool(signed_absmax), 0.0 in levels, 0, 0, 0


def ggml_params(q4: bool) -> tuple:
    """Kernel constants for a llama.cpp block type: P0 = Q4_0 (else Q8_0)."""
    return bool(q4), 0, 0, 0, 0, 0


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
        layout, tile = 0, max(1, _TILE_ELEMS // bp)
        total = outer * nb
    elif inner >= _WIDE_INNER:  # one block position x a run of contiguous columns
        # At least a 16-column run while that keeps the tile within 4 x _TILE_ELEMS.
        caps = max(_WIDE_INNER, _TILE_ELEMS // bp), max(1, 4 * _TILE_ELEMS // bp)
        layout, tile = 1, min(_next_pow2(inner), *caps)
        n_col_tiles = _cdiv(inner, tile)
        total = outer * nb * n_col_tiles
    else:  # a few columns: tiles of (position, column) pairs
        layout, tile = 2, max(1, _TILE_ELEMS // bp)
        total = outer * nb * inner
    if total >= 2**31:
        raise ValueError(f"triton kernels take fewer than 2^31 blocks, got {total}")
    grid = total if layout == 1 else _cdiv(total, tile)
    elems = bp * tile
    warps = 4 if elems <= _TILE_ELEMS else 8 if elems <= 4 * _TILE_ELEMS else 16
    return Plan(n, inner, nb, total, n_col_tiles, layout, bp, tile, grid, warps)


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
