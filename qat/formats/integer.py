"""Uniform integer formats: symmetric absmax-scaled ``int`` and fixed-point ``fixed``.

``int(width W, granularity, group_size)``: ``Qmax = 2^(W-1) - 1``; ``scale = absmax / Qmax``
over the scaling unit; ``q = clamp(round_half_even(x / scale), -2^(W-1), Qmax) * scale``
(absmax maps to ``Qmax``, so ``-2^(W-1)`` is only the clamp bound). A unit of zeros stays
zero. Scaling units, with blocks along the last dim of ``quantize``'s view:

- ``tensor``: one scale for the whole tensor;
- ``channel``: one scale per slice along the non-blocking dims, i.e. per row of the
  ``[..., n]`` view (per output channel of a Linear weight, per token of an activation);
- ``group``: one scale per ``group_size`` consecutive elements of a row (ragged last group).

Storage (``bits_per_element``): ``group`` counts a 16-bit (bf16/fp16) scale per group,
``W + 16 / group_size``; ``tensor`` and ``channel`` count ``W`` only, because one scale per
tensor or per row is amortised over thousands of elements (and its size depends on the shape,
which a format does not know).

``fixed(width W, frac_width F)``: two's complement with ``F`` fraction bits,
``q = clamp(round_half_even(x * 2^F), -2^(W-1), 2^(W-1) - 1) * 2^-F``; ``W`` bits.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from qat.formats.base import Format, check_choice, check_int, from_blocks, to_blocks
from qat.formats.registry import register_format

GRANULARITIES = ("tensor", "channel", "group")
CHANNEL = 1 << 62  # scale_block of a per-row scale: longer than any row


def absmax_int(x: Tensor, amax: Tensor, width: int) -> Tensor:
    """Quantise ``x`` with the symmetric scale ``amax / (2^(W-1) - 1)`` (broadcast)."""
    qmax = 2 ** (width - 1) - 1
    scale = amax / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x / scale).clamp(-qmax - 1, qmax) * scale


@register_format("int")
@dataclasses.dataclass(frozen=True)
class Int(Format):
    """Symmetric absmax integer quantisation; ``width`` includes the sign bit."""

    width: int = 8
    granularity: str = "channel"
    group_size: int = 128

    def validate(self) -> None:
        check_int("int", "width", self.width, 2, 24)
        check_choice("int", "granularity", self.granularity, GRANULARITIES)
        check_int("int", "group_size", self.group_size, 1)

    @property
    def bits_per_element(self) -> float:
        if self.granularity == "group":
            return self.width + 16 / self.group_size
        return float(self.width)

    @property
    def scale_block(self) -> int | None:
        # a channel's scale covers its whole row: fixed once, before the first element
        return {"group": self.group_size, "channel": CHANNEL}.get(self.granularity)

    def block_scales(self, xb: Tensor) -> Tensor:
        if self.granularity == "tensor":
            return super().block_scales(xb)
        return xb.abs().amax(dim=-1)

    def round_with_scales(self, xb: Tensor, scales: Tensor) -> Tensor:
        return absmax_int(xb, scales.unsqueeze(-1), self.width)

    def _quantize_lastdim(self, x: Tensor) -> Tensor:
        if self.granularity == "tensor":
            return absmax_int(x, x.abs().amax(), self.width)
        if self.granularity == "channel":
            return absmax_int(x, x.abs().amax(dim=-1, keepdim=True), self.width)
        xb, n = to_blocks(x, self.group_size)
        q = absmax_int(xb, xb.abs().amax(dim=-1, keepdim=True), self.width)
        return from_blocks(q, n)


@register_format("fixed")
@dataclasses.dataclass(frozen=True)
class Fixed(Format):
    """Saturating two's complement fixed point with ``frac_width`` fraction bits."""

    width: int = 8
    frac_width: int = 4

    def validate(self) -> None:
        check_int("fixed", "width", self.width, 2, 24)
        check_int("fixed", "frac_width", self.frac_width, -64, 64)

    @property
    def bits_per_element(self) -> float:
        return float(self.width)

    def _quantize_lastdim(self, x: Tensor) -> Tensor:
        lo, hi = -(2 ** (self.width - 1)), 2 ** (self.width - 1) - 1
        step = 2.0**-self.frac_width
        return torch.round(x / step).clamp(lo, hi) * step
