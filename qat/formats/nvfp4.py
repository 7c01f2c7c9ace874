"""NVFP4: FP4 E2M1 elements in blocks of 16, an FP8 E4M3 block scale and an fp32 per-tensor
global scale, with the formulas of the ``compressed-tensors`` library (what llm-compressor
writes and vLLM loads; tested bit for bit against its quantize/dequantize).

Over the whole tensor (every element ``quantize`` is given): ``amax_t = max|x|``,
``g = 2688 / max(amax_t, FLT_MIN)`` (448 * 6: the E4M3 max times the E2M1 max), and ``g = 1``
where that overflows to inf. Per block of 16: ``s = e4m3(g * (amax_b / 6))`` (round to nearest
even, saturated at 448; ``s = 0.125`` where it rounds to 0), the effective scale ``S = s / g``
(float32), elements ``e2m1(clamp(x / S, -6, 6))`` (nearest, ties to even) and values ``e * S``.

The global scale spans the tensor, so blocks are not independent (``independent_block`` is
None; the ``compile`` backend runs the reference). As an activation format the global scale is
computed on every call (dynamic); vLLM instead uses a calibrated static input global scale.
Codes (``encode``): 4-bit sign-magnitude E2M1 (sign in bit 3, the OCP magnitude bits below;
a negative zero keeps its sign bit); scales: ``s`` (float32 values of E4M3 numbers); the global
scale ``g`` in ``extra["global_scale"]`` (a float32 scalar).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from qat.formats.base import Format, from_blocks, to_blocks
from qat.formats.floatcast import code_values, float_codes, max_code, round_to_float
from qat.formats.registry import register_format

NVFP4_BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_ZERO_SCALE = 0.125  # compressed-tensors' stand-in for a block scale that rounds to 0
_E2M1 = (1, 0, E2M1_MAX)  # mantissa bits, emin, max


def global_scale(x: Tensor) -> Tensor:
    """float32 scalar ``g = 2688 / max(amax, FLT_MIN)``, 1 where that is not finite."""
    amax = x.abs().amax() if x.numel() else x.new_zeros(())  # a shape test, not a data one
    amax = amax.clamp_min(torch.finfo(torch.float32).tiny)
    g = (E4M3_MAX * E2M1_MAX) / amax
    return torch.where(torch.isfinite(g), g, torch.ones_like(g))


def e4m3(x: Tensor) -> Tensor:
    """float32 ``x`` rounded to FP8 E4M3 (nearest-even, subnormals, saturated at +-448), as
    float32; by arithmetic (a compiler may drop a low-precision cast round trip)."""
    return round_to_float(x, 3, -6, E4M3_MAX)


@register_format("nvfp4")
@dataclasses.dataclass(frozen=True)
class NVFP4(Format):
    """NVIDIA NVFP4 (E2M1 x E4M3 per 16 x fp32 per tensor); no parameters."""

    @property
    def block_size(self) -> int:
        return NVFP4_BLOCK

    @property
    def bits_per_element(self) -> float:
        return 4 + 8 / NVFP4_BLOCK  # the per-tensor fp32 is amortised, as for int's scales

    def _scaled(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """(``x / S`` clamped, block scales ``s``, ``S``, ``g``, row length) of float32 ``x``."""
        g = global_scale(x)
        xb, n = to_blocks(x, NVFP4_BLOCK)
        s = e4m3(g * (xb.abs().amax(dim=-1) / E2M1_MAX))
        s = torch.where(s == 0, E4M3_ZERO_SCALE, s)
        eff = (s / g).unsqueeze(-1)
        return (xb / eff).clamp(-E2M1_MAX, E2M1_MAX), s, eff, g, n

    def _quantize_lastdim(self, x: Tensor) -> Tensor:
        v, _, eff, _, n = self._scaled(x)
        return from_blocks(round_to_float(v, *_E2M1) * eff, n)

    def _encode_lastdim(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        v, s, _, g, _ = self._scaled(x)
        mags = float_codes(v, _E2M1[0], _E2M1[1], max_code(*_E2M1))
        return mags | (torch.signbit(v).to(torch.int32) << 3), s, {"global_scale": g}

    def _decode_lastdim(
        self, codes: Tensor, scales: Tensor, extra: dict[str, Tensor], n: int
    ) -> Tensor:
        mag = code_values(codes & 7, _E2M1[0], _E2M1[1])
        elems = torch.where(codes >= 8, -mag, mag)
        return from_blocks(elems * (scales / extra["global_scale"]).unsqueeze(-1), n)
