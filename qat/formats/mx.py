"""OCP Microscaling (MX) v1.0 formats: a shared E8M0 power-of-two scale per block of 32.

Per block: ``X = 2^(clamp(floor(log2(max|x|)) - emax_elem, -127, 127))`` (E8M0's finite range;
code 255 is NaN and never produced); each element is ``x / X`` rounded to nearest-even in the
element format, subnormals included, and saturated to the element's largest finite value;
the result is ``X * element``. A block of zeros gives zeros (its scale is irrelevant). That is
``scale: max`` (the default); ``scale: mse`` takes the exponent, one less or one more
(clamped), whichever gives the block the least squared error (``qat.formats.scale``).

Elements (OCP table 2; docs/formats.md):

========== ===== ======== ========= ========
format     bits  emax     max       emin
========== ===== ======== ========= ========
FP8 E4M3   8     8        448       -6
FP8 E5M2   8     15       57344     -14
FP6 E2M3   6     2        7.5       0
FP6 E3M2   6     4        28        -2
FP4 E2M1   4     2        6         0
INT8       8     0        127/64    (step 2^-6)
========== ===== ======== ========= ========

MXINT8 saturates symmetrically to +-127/64 (as the Microsoft ``microxcaling`` reference does),
so the two's complement code -128 is never produced. Matches torchao's
``MXTensor.to_mx(..., ScaleCalculationMode.FLOOR)`` bit for bit on normal-range data (tested);
torchao additionally clamps the float32 scale to 2^-126, which only matters for blocks whose
max is below 2^(emax_elem - 126) (2^-124 for FP4, 2^-111 for E5M2).

Codes (``encode``): ``elem_bits``-bit sign-magnitude element codes, the sign in the top bit and
the magnitude code below it (for the FP elements the OCP bit pattern: exponent field, then
mantissa; for INT8 ``|k|``); a negative zero keeps its sign bit. Scales: the shared exponents
(int32, the E8M0 code minus 127).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor

from qat.formats.base import Format, check_choice, check_int, floor_log2, from_blocks, to_blocks
from qat.formats.floatcast import code_values, float_codes, max_code, round_to_float
from qat.formats.registry import register_format
from qat.formats.scale import MSE_OFFSETS, SCALES, best_exponent

E8M0_MIN, E8M0_MAX = -127, 127


def mx_scale_exponent(amax: Tensor, emax_elem: int) -> Tensor:
    """Per-block shared exponent ``clamp(floor(log2 amax) - emax_elem, -127, 127)`` (int32)."""
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    return (floor_log2(safe) - emax_elem).clamp(E8M0_MIN, E8M0_MAX)


@dataclasses.dataclass(frozen=True)
class MXFormat(Format):
    """Shared machinery; subclasses set the element format as class constants."""

    block_size: int = 32
    scale: str = "max"

    elem_bits: ClassVar[int]
    mantissa_bits: ClassVar[int]
    emax: ClassVar[int]
    emin: ClassVar[int]
    max_value: ClassVar[float]

    def validate(self) -> None:
        check_int(self.name, "block_size", self.block_size, 1)
        check_choice(self.name, "scale", self.scale, SCALES)

    @property
    def bits_per_element(self) -> float:
        return self.elem_bits + 8 / self.block_size

    @property
    def independent_block(self) -> int:
        return self.block_size

    def _round_elements(self, v: Tensor) -> Tensor:
        """The fused element cast: ``element_values`` of ``element_codes``, signed."""
        return round_to_float(v, self.mantissa_bits, self.emin, self.max_value)

    def element_codes(self, v: Tensor) -> Tensor:
        """int32 magnitude codes of scaled elements ``v`` (rounded, saturated)."""
        return float_codes(
            v,
            self.mantissa_bits,
            self.emin,
            max_code(self.mantissa_bits, self.emin, self.max_value),
        )

    def element_values(self, codes: Tensor | None = None) -> Tensor:
        """float32 magnitudes of magnitude ``codes``; all of them, ascending, if None."""
        if codes is None:
            top = max_code(self.mantissa_bits, self.emin, self.max_value)
            codes = torch.arange(top + 1, dtype=torch.int32)
        return code_values(codes, self.mantissa_bits, self.emin)

    @property
    def scale_block(self) -> int:
        return self.block_size

    def block_scales(self, xb: Tensor) -> Tensor:
        e = mx_scale_exponent(xb.abs().amax(dim=-1), self.emax)
        if self.scale == "mse":
            # Above 127 - emax a block's top element value would pass float32's range.
            e = best_exponent(
                xb, e, E8M0_MIN, E8M0_MAX - self.emax, MSE_OFFSETS, self._block_values
            )
        return e

    def round_with_scales(self, xb: Tensor, scales: Tensor) -> Tensor:
        return self._block_values(xb, scales)

    def _blocks(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        """Scaled elements ``x / 2^e`` in blocks, ``e`` (int32), ``2^e`` and the row length."""
        xb, n = to_blocks(x, self.block_size)
        e = self.block_scales(xb)
        # 2^e for e in [-127, 127] is exact in float32 (2^-127 is a subnormal power of two),
        # and x / 2^e cannot overflow because e >= floor(log2 amax) - emax - 1.
        scale = torch.exp2(e.float()).unsqueeze(-1)
        return xb / scale, e, scale, n

    def _block_values(self, xb: Tensor, e: Tensor) -> Tensor:
        """Quantised blocks ``xb`` with shared exponents ``e``."""
        scale = torch.exp2(e.float()).unsqueeze(-1)
        return self._round_elements(xb / scale) * scale

    def _quantize_lastdim(self, x: Tensor) -> Tensor:
        v, _, scale, n = self._blocks(x)
        return from_blocks(self._round_elements(v) * scale, n)

    def _encode_lastdim(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        v, e, _, _ = self._blocks(x)
        sign = torch.signbit(v).to(torch.int32) << (self.elem_bits - 1)
        return self.element_codes(v) | sign, e, {}

    def _decode_lastdim(
        self, codes: Tensor, scales: Tensor, extra: dict[str, Tensor], n: int
    ) -> Tensor:
        half = 1 << (self.elem_bits - 1)
        mag = self.element_values(codes & (half - 1))
        elems = torch.where(codes >= half, -mag, mag)
        return from_blocks(elems * torch.exp2(scales.float()).unsqueeze(-1), n)


@register_format("mxfp8_e4m3")
@dataclasses.dataclass(frozen=True)
class MXFP8E4M3(MXFormat):
    """MX with FP8 E4M3 elements (bias 7, no inf, max 448)."""

    elem_bits: ClassVar[int] = 8
    mantissa_bits: ClassVar[int] = 3
    emax: ClassVar[int] = 8
    emin: ClassVar[int] = -6
    max_value: ClassVar[float] = 448.0


@register_format("mxfp8_e5m2")
@dataclasses.dataclass(frozen=True)
class MXFP8E5M2(MXFormat):
    """MX with FP8 E5M2 elements (bias 15, IEEE-like, max 57344; inf/NaN never produced)."""

    elem_bits: ClassVar[int] = 8
    mantissa_bits: ClassVar[int] = 2
    emax: ClassVar[int] = 15
    emin: ClassVar[int] = -14
    max_value: ClassVar[float] = 57344.0


@register_format("mxfp6_e2m3")
@dataclasses.dataclass(frozen=True)
class MXFP6E2M3(MXFormat):
    """MX with FP6 E2M3 elements (bias 1, max 7.5)."""

    elem_bits: ClassVar[int] = 6
    mantissa_bits: ClassVar[int] = 3
    emax: ClassVar[int] = 2
    emin: ClassVar[int] = 0
    max_value: ClassVar[float] = 7.5


@register_format("mxfp6_e3m2")
@dataclasses.dataclass(frozen=True)
class MXFP6E3M2(MXFormat):
    """MX with FP6 E3M2 elements (bias 3, max 28)."""

    elem_bits: ClassVar[int] = 6
    mantissa_bits: ClassVar[int] = 2
    emax: ClassVar[int] = 4
    emin: ClassVar[int] = -2
    max_value: ClassVar[float] = 28.0


@register_format("mxfp4")
@dataclasses.dataclass(frozen=True)
class MXFP4(MXFormat):
    """MX with FP4 E2M1 elements: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives."""

    elem_bits: ClassVar[int] = 4
    mantissa_bits: ClassVar[int] = 1
    emax: ClassVar[int] = 2
    emin: ClassVar[int] = 0
    max_value: ClassVar[float] = 6.0


@register_format("mxint8")
@dataclasses.dataclass(frozen=True)
class MXINT8(MXFormat):
    """MX with INT8 elements: ``k / 64`` for integer ``k`` in [-127, 127] (emax 0)."""

    elem_bits: ClassVar[int] = 8
    mantissa_bits: ClassVar[int] = 6
    emax: ClassVar[int] = 0
    emin: ClassVar[int] = 0
    max_value: ClassVar[float] = 127 / 64

    def _round_elements(self, v: Tensor) -> Tensor:
        # A fixed grid of step 2^-6: round half to even on k, clamp symmetrically.
        return torch.round(v * 64.0).clamp(-127, 127) / 64.0

    def element_codes(self, v: Tensor) -> Tensor:
        return torch.round(v.abs() * 64.0).clamp_max(127).to(torch.int32)

    def element_values(self, codes: Tensor | None = None) -> Tensor:
        if codes is None:
            codes = torch.arange(128, dtype=torch.int32)
        return codes.float() / 64.0
