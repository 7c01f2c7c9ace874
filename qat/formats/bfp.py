"""Block floating point: one shared exponent per block, sign-magnitude integer mantissas.

Definition (docs/formats.md): ``M = width - 1``;
``e_b = clamp(ceil(log2(max|x|)), -(2^(E-1)-1), 2^(E-1))``;
``q = sign(x) * clamp(round_half_even(|x| * 2^(M - e_b)), 0, 2^M - 1) * 2^(e_b - M)``.
Because ``e_b`` rounds the exponent up, the block max lands in ``(2^(M-1), 2^M]`` and an exact
power of two saturates to ``2^M - 1`` (the paper's definition, kept as is). That is
``scale: max`` (the default); ``scale: mse`` takes ``e_b``, ``e_b - 1`` or ``e_b + 1``
(clamped), whichever gives the block the least squared error (``qat.formats.scale``). Unlike the
reference code, tiny values (|x| <= 1e-8) are quantised like every other element.

Codes (``encode``): ``width``-bit sign-magnitude mantissas, the sign in bit ``M`` (a mantissa
rounded to zero keeps its sign, so a negative zero decodes as ``-0.0`` like ``quantize``);
scales: the shared exponents ``e_b`` (int32).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from qat.formats.base import (
    Format,
    check_choice,
    check_int,
    from_blocks,
    to_blocks,
)
from qat.formats.registry import register_format
from qat.formats.scale import SCALES, block_scale_exponent


def exponent_range(exponent_width: int) -> tuple[int, int]:
    """The shared exponent's range ``[-(2^(E-1) - 1), 2^(E-1)]``."""
    return -(2 ** (exponent_width - 1) - 1), 2 ** (exponent_width - 1)


def block_mantissas(xb: Tensor, e: Tensor, m_bits: int) -> Tensor:
    """Signed integer mantissas (float-valued, so a mantissa rounded to zero keeps its sign)
    of blocks ``xb`` with shared exponents ``e``: ``x ~= mantissa * 2^(e - M)``."""
    # Scale in two exact power-of-two steps so 2^(M - e) cannot overflow float32 for e = -127.
    scaled = xb.abs() * torch.exp2(-e.float()).unsqueeze(-1) * (2.0**m_bits)
    return torch.round(scaled).clamp(0, 2**m_bits - 1) * torch.sign(xb)


def block_values(mant: Tensor, e: Tensor, m_bits: int) -> Tensor:
    """``mantissa * 2^(e - M)`` per block."""
    return mant * torch.exp2((e - m_bits).float()).unsqueeze(-1)


def bfp_mantissas(
    x: Tensor, width: int, exponent_width: int, block_size: int, scale: str = "max"
) -> tuple[Tensor, Tensor, int]:
    """Signed mantissas ``[..., nblocks, B]``, exponents ``[..., nblocks]`` (the max rule, or
    the best-error candidate for ``scale="mse"``, qat.formats.scale) and the row length."""
    m_bits = width - 1
    xb, n = to_blocks(x, block_size)
    e = block_scale_exponent(  # the max rule rounds the exponent up
        xb,
        *exponent_range(exponent_width),
        ceil=True,
        scale=scale,
        values=lambda b, c: block_values(block_mantissas(b, c, m_bits), c, m_bits),
    )
    return block_mantissas(xb, e, m_bits), e, n


@register_format("bfp")
@dataclasses.dataclass(frozen=True)
class BFP(Format):
    """Block floating point. ``width`` counts sign + mantissa bits."""

    width: int = 4
    exponent_width: int = 8
    block_size: int = 16
    scale: str = "max"

    def validate(self) -> None:
        check_int("bfp", "width", self.width, 2, 24)
        check_int("bfp", "exponent_width", self.exponent_width, 1, 8)
        check_int("bfp", "block_size", self.block_size, 1)
        check_choice("bfp", "scale", self.scale, SCALES)

    @property
    def bits_per_element(self) -> float:
        return self.width + self.exponent_width / self.block_size

    @property
    def independent_block(self) -> int:
        return self.block_size

    @property
    def scale_block(self) -> int:
        return self.block_size

    def block_scales(self, xb: Tensor) -> Tensor:
        m_bits = self.width - 1
        return block_scale_exponent(
            xb,
            *exponent_range(self.exponent_width),
            ceil=True,
            scale=self.scale,
            values=lambda b, c: block_values(block_mantissas(b, c, m_bits), c, m_bits),
        )

    def round_with_scales(self, xb: Tensor, scales: Tensor) -> Tensor:
        m_bits = self.width - 1
        return block_values(block_mantissas(xb, scales, m_bits), scales, m_bits)

    def _values(self, mant: Tensor, e: Tensor, n: int) -> Tensor:
        return from_blocks(block_values(mant, e, self.width - 1), n)

    def _mantissas(self, x: Tensor) -> tuple[Tensor, Tensor, int]:
        return bfp_mantissas(x, self.width, self.exponent_width, self.block_size, self.scale)

    def _quantize_lastdim(self, x: Tensor) -> Tensor:
        # Fused: the float mantissas go straight to values, without integer codes.
        return self._values(*self._mantissas(x))

    def _encode_lastdim(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        mant, e, _ = self._mantissas(x)
        sign = torch.signbit(mant).to(torch.int32) << (self.width - 1)
        return mant.abs().to(torch.int32) | sign, e, {}

    def _decode_lastdim(
        self, codes: Tensor, scales: Tensor, extra: dict[str, Tensor], n: int
    ) -> Tensor:
        m_bits = self.width - 1
        mag = (codes & (2**m_bits - 1)).float()
        return self._values(torch.where((codes >> m_bits).bool(), -mag, mag), scales, n)
