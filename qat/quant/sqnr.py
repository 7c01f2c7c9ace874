"""Quantisation error as signal-to-quantisation-noise ratio (SQNR), pure tensor maths.

``SQNR = 10 log10(sum x^2 / sum (x - Q(x))^2)`` in dB, summed in float64. Each additional
mantissa bit of a block format adds about 6 dB. An exact quantisation (zero noise) is +inf dB;
an all-zero tensor quantised exactly is also +inf (nothing was lost). Used by the per-layer
profile (``qat profile``), the training dashboards (``qat.training.quant_metrics``) and
``bench/formats.py``.

Everything here stays on the tensors' device (no host sync) until the caller converts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def error_sums(x: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum x^2, sum (x - q)^2)`` as float64 0-dim tensors: the two halves of an SQNR,
    kept apart so several tensors can be pooled before the ratio is taken."""
    x64 = x.detach().double()
    return x64.square().sum(), (x64 - q.detach().double()).square().sum()


def sqnr_from_sums(signal: Tensor, noise: Tensor) -> Tensor:
    """SQNR (dB) from pooled sums; +inf where the noise is zero."""
    return torch.where(
        noise > 0, 10 * torch.log10(signal / noise), torch.full_like(noise, math.inf)
    )


def sqnr_db(x: Tensor, q: Tensor) -> Tensor:
    """SQNR (dB) of ``q`` as an approximation of ``x`` (same shape), a float64 0-dim tensor."""
    return sqnr_from_sums(*error_sums(x, q))


def sqnr_db_value(signal: float, noise: float) -> float:
    """The same ratio for sums already on the host (Python floats)."""
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)
