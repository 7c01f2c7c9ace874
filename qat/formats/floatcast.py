"""Round float32 values to a small IEEE-like float format (the element cast of MX and minifloat).

A format here is described by its mantissa bits ``M``, its minimum normal exponent ``emin`` and
its largest finite value ``max_value``. Representable magnitudes are ``0``, the subnormals
``k * 2^(emin - M)`` for ``k < 2^M``, and the normals ``2^e * (1 + k / 2^M)`` for ``e >= emin``
up to ``max_value``. Rounding is to nearest, ties to even mantissa (IEEE RNE); values beyond
``max_value`` saturate to it (no inf, no NaN), as OCP MX and block minifloat both require.
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
