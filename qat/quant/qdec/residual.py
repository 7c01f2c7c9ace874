"""QDEC's residual maths and storage: how many channels (``k_for``), the residual's
quantisation (``quantize_residual``), which channels (``select_channels``), nibble packing, and
``QDECState``, one layer's residual with its gather and compensation ``R_hat[:, S] @ x[S]``.

Pure tensors in, tensors out: nothing here touches a model (``qat.quant.qdec.attach`` does).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from qat.quant.qdec.config import QDECConfig

# Fractions of max|R| tried as the clipping point of the residual's scale; 1.0 (plain max-abs)
# is included, so the search never does worse than max-abs.
SCALE_FRACTIONS = tuple(1.0 - 0.02 * i for i in range(36))  # 1.00, 0.98, ..., 0.30


def k_for(k_chunk: int, d_in: int) -> int:
    """Channels compensated per step: ``round(k_chunk * d_in / 1024)`` (half to even),
    clamped to ``[0, d_in]``."""
    return max(0, min(d_in, round(k_chunk * d_in / 1024)))


def quantize_residual(
    r: Tensor, bits: int, fractions: tuple[float, ...] = SCALE_FRACTIONS
) -> tuple[Tensor, Tensor]:
    """Symmetric ``bits``-bit quantisation of ``r [out, in]`` with one scale per row.

    Codes lie in ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]`` (symmetric: no extra negative code);
    the scale is ``f * max|r_row| / qmax`` with ``f`` from ``fractions`` minimising the row's
    squared error (round half to even). Returns ``(codes int8 [out, in], scale fp32 [out])``;
    an all-zero row gets scale 0.
    """
    r = r.float()
    qmax = 2 ** (bits - 1) - 1
    amax = r.abs().amax(dim=1)
    best_err = torch.full_like(amax, math.inf)
    best_scale = amax / qmax
    for f in fractions:
        s = (amax * f / qmax).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(r / s[:, None]).clamp_(-qmax, qmax)
        err = (q * s[:, None] - r).square_().sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, s, best_scale)
    best_scale = torch.where(amax > 0, best_scale, torch.zeros_like(best_scale))
    safe = best_scale.clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round(r / safe[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    return codes, best_scale


def select_channels(x: Tensor, k: int) -> Tensor:
    """Top-``k`` input channels by |x| for each sequence of ``x [B, T, d]`` (max over the
    ``T`` tokens of the step; with ``T == 1`` that token's own |x|): indices ``[B, k]``."""
    return x.abs().amax(dim=1).topk(k, dim=-1, sorted=False).indices


def pack_nibbles(codes: Tensor) -> Tensor:
    """int8 codes in ``[-8, 7]``, ``[n, m]`` -> uint8 ``[n, ceil(m / 2)]``: column ``2j`` in the
    low nibble, ``2j + 1`` in the high one, each stored as ``code + 8`` (an odd ``m`` is padded
    with code 0)."""
    c = (codes.to(torch.int16) + 8).to(torch.uint8)
    if c.shape[-1] % 2:
        c = torch.cat([c, c.new_full((*c.shape[:-1], 1), 8)], dim=-1)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: Tensor, m: int, dtype: torch.dtype = torch.int8) -> Tensor:
    """Inverse of ``pack_nibbles`` for the first ``m`` columns, as ``dtype``."""
    lo = (packed & 15).to(dtype) - 8
    hi = (packed >> 4).to(dtype) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)[..., :m]


class QDECState:
    """One layer's residual (plain attributes, deliberately not a module or buffer).

    Residuals of at most 4 bits are held two codes per byte (``pack_nibbles``): half the host
    memory, and half the bytes each decode step moves to the GPU; they are unpacked after
    the gather, on the device.
    """

    def __init__(self, codes_t: Tensor, scale: Tensor, k: int, config: QDECConfig) -> None:
        self.scale = scale.float().contiguous()  # fp32 [d_out]
        self.d_out = self.scale.shape[0]
        if codes_t.dtype == torch.int8 and config.residual_bits <= 4:
            codes_t = pack_nibbles(codes_t)
        # int8 [d_in, d_out], or uint8 [d_in, ceil(d_out / 2)] packed; on the CPU until used
        self.codes_t = codes_t.contiguous()
        self.k = k
        self.config = config
        self.handle: Any = None
        self._staging: Tensor | None = None  # pinned rows of codes_t, reused every step
        self._staging_done: Any = None  # CUDA event: the last copy out of the staging buffer

    @property
    def packed(self) -> bool:
        return self.codes_t.dtype == torch.uint8

    def _unpack(self, rows: Tensor, dtype: torch.dtype) -> Tensor:
        return unpack_nibbles(rows, self.d_out, dtype) if self.packed else rows.to(dtype)

    def codes(self) -> Tensor:
        """The residual's codes, int8 ``[d_in, d_out]`` (unpacked)."""
        return self._unpack(self.codes_t, torch.int8)

    def residual(self) -> Tensor:
        """``R_hat [d_out, d_in]`` in fp32 (on the residual's device)."""
        return (self._unpack(self.codes_t, torch.float32) * self.scale).t()

    def _place(self, device: torch.device) -> None:
        """Lazily settle where the residual lives for inputs on ``device``."""
        if self.codes_t.device == device:
            return
        if self.config.residual_device == "same":
            self.codes_t, self.scale = self.codes_t.to(device), self.scale.to(device)
        elif device.type == "cuda" and not self.codes_t.is_pinned():
            self.codes_t, self.scale = self.codes_t.pin_memory(), self.scale.pin_memory()

    def gather(self, idx: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Residual rows ``idx [B, k]`` as ``[B, k, d_out]`` and the scales, on ``idx``'s
        device in ``dtype``.

        With the residual in host memory and ``idx`` on a GPU this is the one host sync of a
        decode step per layer: the top-k indices must reach the host before the selected rows
        can be gathered there (nothing else waits on the device). The gather writes into a
        pinned staging buffer so the copy to the device is truly asynchronous.
        """
        device = idx.device
        if self.codes_t.device == device:
            return self._unpack(self.codes_t[idx], dtype), self.scale.to(dtype)
        flat = idx.reshape(-1).to("cpu")  # host sync (see the docstring)
        n = flat.numel()
        if self._staging is None or self._staging.shape[0] < n:
            self._staging = torch.empty(
                (n, self.codes_t.shape[1]),
                dtype=self.codes_t.dtype,
                pin_memory=device.type == "cuda",
            )
            self._staging_done = None
        if self._staging_done is not None:
            self._staging_done.synchronize()  # the previous copy out of it has finished
        staged = self._staging[:n]
        torch.index_select(self.codes_t, 0, flat, out=staged)
        rows = staged.to(device, non_blocking=True)
        scale = self.scale.to(device, non_blocking=True)
        if device.type == "cuda":
            self._staging_done = torch.cuda.Event()
            self._staging_done.record()
        return self._unpack(rows.view(*idx.shape, -1), dtype), scale.to(dtype)

    def compensation(self, qx: Tensor, prefill: str) -> Tensor | None:
        """``R_hat[:, S] @ x[S]`` for the input ``qx`` (shape of the layer's input, last dim
        ``d_out``), or None when ``k == 0``."""
        if self.k == 0:
            return None
        self._place(qx.device)
        shape = qx.shape
        x3 = qx.reshape(-1, 1, shape[-1]) if qx.dim() <= 2 else qx.reshape(-1, *shape[-2:])
        if x3.shape[1] > 1 and prefill == "token":
            x2 = x3.reshape(-1, shape[-1])
            idx = x2.abs().topk(self.k, dim=-1, sorted=False).indices
            masked = torch.zeros_like(x2).scatter_(1, idx, x2.gather(1, idx))
            r = self.residual().to(qx.device, qx.dtype, non_blocking=True)
            out = masked @ r.t()
        else:
            idx = select_channels(x3, self.k)  # [B, k]
            rows, scale = self.gather(idx, qx.dtype)  # [B, k, d_out]
            xs = x3.gather(2, idx[:, None, :].expand(-1, x3.shape[1], -1))  # [B, T, k]
            out = torch.bmm(xs, rows) * scale
        return out.reshape(*shape[:-1], -1)
