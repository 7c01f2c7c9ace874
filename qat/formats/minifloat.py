"""Block minifloat: small floats whose exponent bias is shared per block.

Element: sign, ``E = exponent_width`` exponent bits, ``M = width - 1 - E`` mantissa bits;
subnormals; no inf/NaN (every exponent code is a number); out-of-range values saturate.

Exact rule, per block of ``block_size`` along the last dim:

- ``e_b = clamp(floor(log2(max|x|)), -2^(bw-1), 2^(bw-1) - 1)`` with ``bw = bias_width``
  (a two's complement shared exponent; an all-zero block gets the minimum and stays zero).
  ``e_b`` is the exponent of the format's top binade, so the block max lands in
  ``[2^e_b, 2^(e_b+1))``; equivalently the element bias is ``2^E - 1 - e_b``.
- Element exponents run from ``emin_b = e_b - (2^E - 2)`` (field 1) to ``e_b`` (field
  ``2^E - 1``); field 0 holds the subnormals ``k * 2^(emin_b - M)``, ``k < 2^M``.
- ``q = round_to_float(x)`` with that range: round to nearest, ties to even mantissa, saturate
  to the largest value ``2^e_b * (2 - 2^-M)`` (a block max that rounds up to ``2^(e_b+1)``
  saturates, as in OCP MX).

Difference from the reference code (llm-mixed-q): its bias made every block whose max is
below 1 subnormal, so small weights rounded to 0; here the bias tracks the block max, so every
block uses its full dynamic range. Storage: ``width + bias_width / block_size`` bits.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from qat.formats.base import FormatError, check_int
from qat.formats.floatcast import round_to_float
from qat.formats.registry import register_format
from qat.formats.shared_bias import SharedBiasFormat


@register_format("block_minifloat")
@dataclasses.dataclass(frozen=True)
class BlockMinifloat(SharedBiasFormat):
    """Block minifloat; ``width`` counts sign + exponent + mantissa bits."""

    ROUND_UP = False  # e_b is the exponent of the top binade: floor(log2 max|x|)

    width: int = 8
    exponent_width: int = 4
    block_size: int = 16
    bias_width: int = 8
    scale: str = "max"

    def validate(self) -> None:
        check_int("block_minifloat", "width", self.width, 2, 16)
        check_int("block_minifloat", "exponent_width", self.exponent_width, 1, 6)
        self._validate_blocks()
        if self.exponent_width > self.width - 1:
            raise FormatError(
                f"block_minifloat.exponent_width must be in [1, width - 1 = {self.width - 1}] "
                f"(sign + exponent must fit in width), got {self.exponent_width}"
            )

    @property
    def mantissa_bits(self) -> int:
        return self.width - 1 - self.exponent_width

    def _block_values(self, xb: Tensor, e_b: Tensor) -> Tensor:
        """Quantised blocks ``xb`` with top exponents ``e_b``."""
        m = self.mantissa_bits
        # Work in the block's normalised domain (top binade [1, 2)); 2^-e_b for e_b in
        # [-128, 127] is an exact float32 power of two, so the scaling is exact.
        scale = torch.exp2(e_b.float()).unsqueeze(-1)
        emin = -(2**self.exponent_width - 2)
        return round_to_float(xb / scale, m, emin, 2.0 - 2.0**-m) * scale
