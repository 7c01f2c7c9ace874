"""Round float32 values to a small IEEE-like float format (the element cast of MX and minifloat).

A format here is described by its mantissa bits ``M``, its minimum normal exponent ``emin`` and
its largest finite value ``max_value``. Representable magnitudes are ``0``, the subnormals
``k * 2^(emin - M)`` for ``k < 2^M``, and the normals ``2^e * (1 + k / 2^M)`` for ``e >= emin``
up to ``max_value``. Rounding is to nearest, ties to even mantissa (IEEE RNE); values beyond
``max_value`` saturate to it (no inf, no NaN), as OCP MX and block minifloat both require.

Magnitude codes number the representable magnitudes in ascending order: code ``c`` has
exponent field ``c >> M`` (0: subnormal) and mantissa field ``c & (2^M - 1)``, the IEEE bit
layout without the sign. ``round_to_float`` is the fused form of
``code_values(float_codes(x))`` (with the sign of ``x``), proven equal in the tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Smallest float32 step (2^-149): a grid finer than this cannot change a float32 value.
_F32_MIN_STEP_EXP = -149


def round_to_float(
    x: Tensor, mantissa_bits: int, emin: int | Tensor, max_value: float | Tensor
) -> Tensor:
    """Round float32 ``x`` to the nearest value of the float format, saturating at ``max_value``.

    ``emin`` and ``max_value`` may be tensors broadcastable to ``x`` (block minifloat passes a
    per-block exponent range). Every step is an exact power-of-two scaling, so the only
    rounding is the one ``torch.round`` (half-to-even) performs on the integer mantissa.
    """
    mag = x.abs()
    # floor(log2 |x|) = frexp exponent - 1 (zeros give an arbitrary binade and stay 0); the
    # step is 2^(binade - M), never below the subnormal step 2^(emin - M) nor float32's 2^-149.
    _, exp = torch.frexp(mag)
    if isinstance(emin, Tensor):
        floor_exp = (emin - mantissa_bits).clamp_min(_F32_MIN_STEP_EXP).to(torch.int32)
    else:
        floor_exp = max(emin - mantissa_bits, _F32_MIN_STEP_EXP)
    step = torch.exp2(exp.sub_(1 + mantissa_bits).clamp_(min=floor_exp).float())
    q = torch.round(mag.div_(step)).mul_(step)
    if isinstance(max_value, Tensor):
        q = torch.minimum(q, max_value)
    else:
        q = q.clamp_max_(max_value)
    return q.copysign_(x)


def max_code(mantissa_bits: int, emin: int, max_value: float) -> int:
    """The magnitude code of ``max_value`` (which must lie on the format's grid)."""
    import math

    b = max(math.floor(math.log2(max_value)), emin)
    k = max_value / 2.0 ** (b - mantissa_bits)
    if k != int(k):
        raise ValueError(f"max_value {max_value} is not on the grid of M={mantissa_bits}")
    return (b - emin) * 2**mantissa_bits + int(k)


def float_codes(x: Tensor, mantissa_bits: int, emin: int, top_code: int) -> Tensor:
    """int32 magnitude code of ``|x|`` rounded as ``round_to_float`` rounds it (nearest, ties
    to even), saturating at ``top_code``. Needs ``emin - M >= -149`` (all MX elements)."""
    mag = x.abs()
    _, exp = torch.frexp(mag)
    binade = (exp - 1).clamp_min(emin)  # subnormals share emin's step
    m = torch.round(mag / torch.exp2((binade - mantissa_bits).float())).to(torch.int32)
    # A carry (m == 2^(M+1)) lands on the next binade's first code by itself.
    code = (binade - emin) * 2**mantissa_bits + m
    return torch.where(m > 0, code, 0).clamp_max(top_code)


def code_values(codes: Tensor, mantissa_bits: int, emin: int) -> Tensor:
    """float32 magnitudes of magnitude codes (exact: a small integer times a power of two)."""
    field = codes >> mantissa_bits
    k = codes & (2**mantissa_bits - 1)
    mant = torch.where(field > 0, k + 2**mantissa_bits, k)
    e = field.clamp_min(1) + (emin - 1)
    return mant.float() * torch.exp2((e - mantissa_bits).float())
