"""What block_log and block_minifloat share: blocks of ``block_size`` elements whose scale is
a power of two, its exponent held in a ``bias_width``-bit two's complement and chosen by
``scale: max | mse`` (``qat.formats.scale``). Each family says how its elements round against
the block's exponent (``_block_values``) and whether the max rule rounds ``log2 max|x|`` up
(``ROUND_UP``: block_log's exponent is the block's top power, block minifloat's the exponent
of its top binade).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from qat.formats.base import (
    Format,
    check_choice,
    check_int,
    from_blocks,
    to_blocks,
    twos_complement_range,
)
from qat.formats.scale import SCALES, block_scale_exponent


class SharedBiasFormat(Format):
    """Base of the formats with fields ``width``, ``block_size``, ``bias_width`` and ``scale``
    whose blocks share one ``bias_width``-bit exponent."""

    ROUND_UP: ClassVar[bool]

    def _validate_blocks(self) -> None:
        """The checks of the shared fields (``width`` and the family's own are its own)."""
        check_int(self.name, "block_size", self.block_size, 1)
        check_int(self.name, "bias_width", self.bias_width, 1, 8)
        check_choice(self.name, "scale", self.scale, SCALES)

    @property
    def bits_per_element(self) -> float:
        return self.width + self.bias_width / self.block_size

    @property
    def independent_block(self) -> int:
        return self.block_size

    def _block_values(self, xb: Tensor, e: Tensor) -> Tensor:
        """Quantised blocks ``xb`` with shared exponents ``e`` (int32 ``[..., nblocks]``)."""
        raise NotImplementedError

    def _quantize_lastdim(self, x: Tensor) -> Tensor:
        xb, n = to_blocks(x, self.block_size)
        e = block_scale_exponent(
            xb,
            *twos_complement_range(self.bias_width),
            ceil=self.ROUND_UP,
            scale=self.scale,
            values=self._block_values,
        )
        return from_blocks(self._block_values(xb, e), n)
