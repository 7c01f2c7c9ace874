"""Block logarithmic format: each element is a signed power of two below a shared block top.

Element: sign + ``width - 1`` exponent-code bits. Code 0 is reserved for zero, leaving
``L = 2^(width-1) - 1`` magnitudes per block. Exact rule, per block of ``block_size``:

- ``t = clamp(ceil(log2(max|x|)), -2^(bw-1), 2^(bw-1) - 1)``, ``bw = bias_width`` (the shared
  offset, two's complement; an all-zero block gets the minimum and stays zero).
- Representable magnitudes: ``0`` and ``2^k`` for ``k`` in ``[t - L + 1, t]``.
- ``q = sign(x) * nearest(|x|)``, the nearest representable magnitude in the *linear* domain:
  between ``2^k`` and ``2^(k+1)`` the threshold is ``1.5 * 2^k``; between 0 and the smallest
  power ``s = 2^(t-L+1)`` it is ``s / 2``; values above ``2^t`` (only possible when ``t`` is
  clamped) saturate to ``2^t``. Ties go to the even exponent (and to zero at ``s / 2``), the
  log-format analogue of round-half-even.

Why linear rounding: picking the nearest representable value minimises each element's absolute
error and therefore the MSE that SQNR and the training loss see. Rounding in the log domain
(threshold ``sqrt(2) * 2^k``) sends ``|x|`` in ``(1.414, 1.5) * 2^k`` to ``2^(k+1)``, a larger
error, for no gain in a fake-quantised forward pass. ``scale: mse`` (default ``max``, the rule
above) takes ``t``, ``t - 1`` or ``t + 1`` (clamped), whichever gives the block the least
squared error (``qat.formats.scale``). Storage: ``width + bias_width/block_size``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from qat.formats.base import check_int
from qat.formats.registry import register_format
from qat.formats.shared_bias import SharedBiasFormat


@register_format("block_log")
@dataclasses.dataclass(frozen=True)
class BlockLog(SharedBiasFormat):
    """Block logarithmic; ``width`` counts the sign and the exponent code."""

    ROUND_UP = True  # the block's exponent t is its top power: ceil(log2 max|x|)

    width: int = 4
    block_size: int = 16
    bias_width: int = 8
    scale: str = "max"

    def validate(self) -> None:
        check_int("block_log", "width", self.width, 2, 9)
        self._validate_blocks()

    def _block_values(self, xb: Tensor, t: Tensor) -> Tensor:
        """Quantised blocks ``xb`` with block tops ``t`` (int32 ``[..., nblocks]``)."""
        levels = 2 ** (self.width - 1) - 1
        mag = xb.abs()
        t = t.unsqueeze(-1)
        kmin = t - (levels - 1)
        # |x| = frac * 2^exp, frac in [0.5, 1): the binade is e = exp - 1 and m = 2 * frac.
        # Round up when m > 1.5, or m == 1.5 and e is odd (exp even); zeros give frac 0.
        frac, exp = torch.frexp(mag)
        up = (frac > 0.75) | ((frac == 0.75) & (exp % 2 == 0))
        k = torch.maximum(torch.minimum(exp - 1 + up.to(exp.dtype), t), kmin)
        # Only magnitudes above s/2 (s = 2^kmin, the smallest power) are non-zero; those in
        # (s/2, s) round to s, which the max with kmin above already gives.
        half_s = torch.exp2(kmin.float() - 1)
        q = torch.where(mag > half_s, torch.exp2(k.float()), torch.zeros_like(mag))
        return torch.copysign(q, xb)
