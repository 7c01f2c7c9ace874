"""llama.cpp's Q4_0 and Q8_0: blocks of 32 with one fp16 scale, as ggml's reference quantiser
(``quantize_row_q4_0_ref`` / ``quantize_row_q8_0_ref`` in ggml-quants.c) computes them.

``ggml_q8_0``: ``d = amax / 127`` (float32); codes ``q = roundf(x * (1/d))`` (round half away
from zero, in [-127, 127]); the block stores ``fp16(d)``; the value is ``fp16(d) * q``.

``ggml_q4_0``: ``max`` is the block's *signed* element of largest magnitude (the first one on a
tie), ``d = max / -8``; codes ``c = min(15, trunc(x * (1/d) + 8.5))`` in [0, 15]; the value is
``fp16(d) * (c - 8)``. The largest-magnitude element maps to code 0 (``-8 d = max``, exact up to
the fp16 rounding of ``d``); one of the opposite sign and equal magnitude clamps to ``7 d``.

Both compute the codes with the float32 ``d`` and dequantise with the fp16 one, as llama.cpp
does. An all-zero block gets ``d = 0`` (codes 0 and 8 respectively). Where llama.cpp's fp16
conversion would overflow (``|d| > 65504``: a block max beyond ~524k for Q4_0, ~8.3M for Q8_0)
this saturates the stored scale to +-65504 instead of writing inf. Codes (``encode``): Q8_0 the
signed int8 ``q``; Q4_0 the unsigned nibble ``c``; scales: the fp16 ``d`` (a float16 tensor).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor

from qat.formats.base import Format, from_blocks, to_blocks
from qat.formats.floatcast import round_to_float
from qat.formats.registry import register_format

GGML_BLOCK = 32
FP16_MAX = 65504.0


def fp16_scale(d: Tensor) -> Tensor:
    """float32 ``d`` rounded to fp16 (nearest-even, subnormals kept), saturated at +-65504,
    as float32. By arithmetic, not a dtype cast: inductor drops a ``.half().float()`` round
    trip (it does not emulate low-precision casts by default), which would keep float32 ``d``."""
    return round_to_float(d, 10, -14, FP16_MAX)


def roundf(v: Tensor) -> Tensor:
    """C's ``roundf``: nearest, ties away from zero (exact: ``v - trunc(v)`` is exact)."""
    t = torch.trunc(v)
    return t + torch.where((v - t).abs() >= 0.5, torch.sign(v), torch.zeros_like(v))


def _inverse(d: Tensor) -> Tensor:
    """``d ? 1/d : 0``."""
    nonzero = d != 0
    return torch.where(nonzero, 1.0 / torch.where(nonzero, d, torch.ones_like(d)), 0.0)


def _product(x: Tensor, y: Tensor) -> Tensor:
    """float32 ``x * y`` rounded once, computed in float64 and cast back (exact: the product
    of two float32 fits in float64). The cast stops a compiler (inductor, Triton) from fusing
    the product into an FMA with the next add or subtract, which rounds once where C rounds
    twice and can move a code at a tie."""
    return (x.double() * y.double()).float()


@dataclasses.dataclass(frozen=True)
class GGMLFormat(Format):
    """A llama.cpp block type: 32 elements, one fp16 scale; no parameters."""

    ggml_type: ClassVar[str]

    @property
    def block_size(self) -> int:
        return GGML_BLOCK

    @property
    def independent_block(self) -> int:
        return GGML_BLOCK

    @property
    def scale_block(self) -> int:
        return GGML_BLOCK

    def block_scales(self, xb: Tensor) -> Tensor:
        """The float32 ``d`` of each block (the codes use it; the values its fp16 rounding)."""
        raise NotImplementedError

    def _codes_with(self, xb: Tensor, d: Tensor) -> Tensor:
        """float32 codes of ``xb`` with float32 scales ``d`` ``[..., nblocks, 1]``."""
        raise NotImplementedError

    def round_with_scales(self, xb: Tensor, scales: Tensor) -> Tensor:
        d = scales.unsqueeze(-1)
        return self._values(self._codes_with(xb, d), fp16_scale(scales))

    def _codes(self, xb: Tensor) -> tuple[Tensor, Tensor]:
        """(float32 codes, fp16 scale ``[..., nblocks]``) of blocked float32 ``xb``."""
        d = self.block_scales(xb)
        return self._codes_with(xb, d.unsqueeze(-1)), fp16_scale(d)

    def _values(self, codes: Tensor, d16: Tensor) -> Tensor:
        raise NotImplementedError

    def _quantize_lastdim(self, x: Tensor) -> Tensor:
        xb, n = to_blocks(x, GGML_BLOCK)
        codes, d16 = self._codes(xb)
        return from_blocks(self._values(codes, d16), n)

    def _encode_lastdim(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        xb, _ = to_blocks(x, GGML_BLOCK)
        codes, d16 = self._codes(xb)
        return codes.to(torch.int32), d16.to(torch.float16), {}  # exact: d16 is on fp16's grid

    def _decode_lastdim(
        self, codes: Tensor, scales: Tensor, extra: dict[str, Tensor], n: int
    ) -> Tensor:
        return from_blocks(self._values(codes.float(), scales), n)


@register_format("ggml_q8_0")
@dataclasses.dataclass(frozen=True)
class GGMLQ8_0(GGMLFormat):
    """llama.cpp Q8_0: int8 codes, ``d = amax / 127`` (8.5 bits per element)."""

    ggml_type: ClassVar[str] = "Q8_0"

    @property
    def bits_per_element(self) -> float:
        return 8 + 16 / GGML_BLOCK

    def block_scales(self, xb: Tensor) -> Tensor:
        return xb.abs().amax(dim=-1) / 127.0

    def _codes_with(self, xb: Tensor, d: Tensor) -> Tensor:
        # nan_to_num only acts where 1/d overflows (amax < ~2^-121; llama.cpp's int8 cast of
        # +-inf or NaN is undefined there): fp16(d) is 0 and the block is zeros either way.
        # The clamp only acts on an element past the block max (GPTQ's fixed scale).
        codes = roundf(_product(xb, _inverse(d))).nan_to_num(0.0, 127.0, -127.0)
        return codes.clamp(-127.0, 127.0)

    def _values(self, codes: Tensor, d16: Tensor) -> Tensor:
        return codes * d16.float().unsqueeze(-1)


@register_format("ggml_q4_0")
@dataclasses.dataclass(frozen=True)
class GGMLQ4_0(GGMLFormat):
    """llama.cpp Q4_0: 4-bit codes ``c`` standing for ``c - 8``, ``d = max / -8`` (4.5 bits)."""

    ggml_type: ClassVar[str] = "Q4_0"

    @property
    def bits_per_element(self) -> float:
        return 4 + 16 / GGML_BLOCK

    def block_scales(self, xb: Tensor) -> Tensor:
        # argmax returns the first of equal maxima, as the C loop's strict `<` keeps the first.
        signed_max = xb.gather(-1, xb.abs().argmax(dim=-1, keepdim=True))
        return (signed_max / -8.0).squeeze(-1)

    def _codes_with(self, xb: Tensor, d: Tensor) -> Tensor:
        # C adds 8.5 to the float32 product: a second rounding, kept apart (see _product).
        shifted = (_product(xb, _inverse(d)).double() + 8.5).float()
        return torch.trunc(shifted).nan_to_num(8.0).clamp(0.0, 15.0)  # NaN: see Q8_0

    def _values(self, codes: Tensor, d16: Tensor) -> Tensor:
        return (codes - 8.0) * d16.float().unsqueeze(-1)
