"""Scale choice (``scale: max | mse``) for the power-of-two shared-exponent formats.

``max`` is each format's own rule (the exponent that fits the block's largest magnitude).
``mse`` tries that exponent ``e``, then ``e - 1`` and ``e + 1`` (``MSE_OFFSETS``; each clamped
to the format's exponent range) and keeps the first candidate with the strictly smallest block
error, so ties go to ``e`` and ``mse``'s error is never above ``max``'s. (``e - 2`` was tried:
on Gaussian data no block of any format, MXFP4 included, chose it.)

The block error is an exact integer, so every backend (eager, compiled, Triton, whatever its
reduction order) picks the same exponent: with ``E`` the frexp exponent of the block's max
magnitude (``amax < 2^E``) and ``F = fixed_point_bits(B)``, each element's error
``|q - x|`` (float32) is counted in units of ``2^(E - F)``, rounded half to even, and the
block error is the int64 sum of their squares. Nearest rounding with 0 on the grid gives
``|q - x| <= |x| < 2^E``, so a unit count is at most ``2^F`` and ``B * 2^(2F) <= 2^62``
cannot overflow. Versus exact arithmetic the measure is off by under ``B * 2^(2E - F + 1)``
(under ``2^-25 * B * amax^2`` for ``B = 32``), which decides only near-exact ties.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from qat.formats.base import block_exponent

SCALES = ("max", "mse")
# Candidates besides the max-rule exponent, in the order they are tried (ties keep the first).
MSE_OFFSETS = (-1, 1)


def fixed_point_bits(block_size: int) -> int:
    """``F``: the most fraction bits per element that keep ``B * 2^(2F)`` within 2^62."""
    return (62 - (block_size - 1).bit_length()) // 2  # bit_length: ceil(log2 B)


def block_error(xb: Tensor, q: Tensor, amax: Tensor, frac_bits: int) -> Tensor:
    """int64 ``sum(round(|q - x| * 2^(F - E))^2)`` per block (see the module docstring)."""
    _, exp = torch.frexp(amax)  # amax < 2^exp (0 for an all-zero block, whose error is 0)
    k = (frac_bits - exp).unsqueeze(-1)
    # 2^k in two exact steps: k may pass float32's 2^127 when the block is tiny.
    k1 = k.clamp(-126, 127)
    t = (q - xb).abs() * torch.exp2(k1.float()) * torch.exp2((k - k1).float())
    n = torch.round(t).to(torch.int64)
    return (n * n).sum(dim=-1)


def best_exponent(
    xb: Tensor,
    e: Tensor,
    lo: int,
    hi: int,
    offsets: tuple[int, ...],
    values: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """The ``mse`` exponent per block of ``xb`` ``[..., nblocks, B]``: ``e`` (the max rule,
    int32 ``[..., nblocks]``) or the first of ``clamp(e + o, lo, hi)`` whose ``values(xb, c)``
    (the blocks' quantised values with exponents ``c``) have a strictly smaller block error.
    Sync-free: every candidate is computed and the choice is a ``torch.where``."""
    amax = xb.abs().amax(dim=-1)
    frac = fixed_point_bits(xb.shape[-1])
    best, best_err = e, block_error(xb, values(xb, e), amax, frac)
    for off in offsets:
        c = (e + off).clamp(lo, hi)
        err = block_error(xb, values(xb, c), amax, frac)
        better = err < best_err
        best, best_err = torch.where(better, c, best), torch.where(better, err, best_err)
    return best


def block_scale_exponent(
    xb: Tensor,
    lo: int,
    hi: int,
    *,
    ceil: bool,
    scale: str,
    values: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """The shared exponent of each block of ``xb`` ``[..., nblocks, B]`` (int32): the max rule
    ``clamp(ceil|floor(log2 max|x|), lo, hi)`` (``block_exponent``), or for ``scale="mse"``
    the best-error candidate around it (``best_exponent``; ``values`` as there)."""
    e = block_exponent(xb.abs().amax(dim=-1), lo, hi, ceil=ceil)
    return best_exponent(xb, e, lo, hi, MSE_OFFSETS, values) if scale == "mse" else e
