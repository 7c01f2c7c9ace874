"""LO-BCQ, block clustered quantisation (Elangovan et al., arXiv 2502.05376; docs/formats.md).

The last dim is cut into block arrays of ``array_len`` (L_A) scalars, each cut into blocks of
``block_len`` (L_b) scalars. Per array:

- one shared 8-bit E8M0 (power-of-two) scale ``2^e``, ``e = ceil(log2(amax / 31))`` clamped to
  [-127, 127], so the array's scaled max lands in (15.5, 31], inside the 6-bit integer range
  [-31, 31] of the codebook entries. (A power of two is exact and needs no per-tensor second
  level scale, which would couple tokens of an activation; the price is up to 1 bit of range.)
- each block picks, among ``num_codebooks`` (N_c) codebooks of 16 integer entries, the one with
  the least squared error, ties to the lowest index (padding of a ragged last block is ignored);
  each scalar maps to its nearest entry, a tie going to the upper entry; ``q = entry * 2^e``.
- an all-zero array stays zero.

Bits per scalar: ``4 + ceil(log2 N_c)/L_b + 8/L_A`` (16, 8, 64: 4.625).

Codebooks: ``codebook_file`` (written by ``qat fit-lobcq``; entries rounded to integers in
[-31, 31] on load), else, for (16, 8, 64) only, a deterministic default fitted on seeded
Gaussian data and stored as a constant (``DEFAULT_CODEBOOKS``). Other (N_c, L_b, L_A) need a
file: like the codebook formats, nothing is fitted behind the user's back at first use.

Why a lookup table: entries are integers, so midpoints are multiples of 0.5 and the nearest
entry depends only on ``floor(2y)``: one gather per codebook instead of a distance matrix.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch import Tensor

from qat.formats.base import (
    Format,
    FormatError,
    ceil_log2,
    check_int,
    floor_log2,
    from_blocks,
    read_json_file,
    to_blocks,
)
from qat.formats.registry import register_format

ENTRY_MAX = 31  # 6-bit signed integer entries, symmetric range [-31, 31]
NUM_ENTRIES = 16  # 4-bit index per scalar
SCALE_BITS = 8  # E8M0
EMIN, EMAX = -127, 127
# Default (N_c, L_b, L_A) = (16, 8, 64) codebooks: fit_lobcq on torch.randn(8192, 64) drawn with
# torch.Generator().manual_seed(0), iters=30, seed=0, warm_iters=60, as the fit was up to
# e1af0a2 (MSE 0.2622 per scalar in the normalised domain; today's fit reaches 0.2579 there, a
# slow test). Stored so the default never depends on a fit at run time.
DEFAULT_CODEBOOKS: tuple[tuple[int, ...], ...] = (
    (-8, -6, -5, -4, -3, -2, -1, 0, 0, 1, 2, 3, 4, 5, 7, 8),
    (-9, -8, -6, -5, -4, -3, -2, -1, 0, 1, 3, 4, 5, 6, 8, 9),
    (-10, -9, -7, -5, -4, -3, -2, -1, 1, 2, 3, 4, 6, 7, 9, 10),
    (-11, -10, -8, -6, -4, -3, -2, 0, 1, 2, 3, 4, 6, 8, 10, 11),
    (-12, -10, -8, -6, -5, -3, -2, -1, 0, 2, 3, 5, 6, 8, 10, 12),
    (-13, -11, -8, -6, -5, -4, -2, -1, 1, 2, 4, 5, 7, 9, 11, 14),
    (-14, -12, -9, -7, -5, -3, -2, 0, 1, 2, 3, 5, 6, 8, 10, 13),
    (-14, -11, -9, -7, -5, -4, -2, -1, 0, 2, 3, 5, 7, 10, 12, 15),
    (-15, -13, -10, -7, -5, -3, -2, 0, 1, 2, 4, 5, 7, 9, 12, 14),
    (-16, -11, -9, -7, -5, -3, -2, 0, 1, 2, 3, 5, 7, 9, 11, 17),
    (-17, -14, -10, -8, -6, -4, -2, -1, 1, 2, 4, 6, 8, 10, 14, 17),
    (-18, -13, -10, -7, -5, -4, -2, 0, 1, 3, 4, 6, 9, 11, 15, 20),
    (-20, -16, -11, -8, -6, -4, -3, -1, 0, 2, 4, 6, 8, 10, 13, 19),
    (-22, -15, -12, -9, -6, -4, -2, -1, 1, 2, 4, 6, 9, 12, 16, 22),
    (-24, -18, -13, -10, -7, -5, -3, -1, 1, 3, 5, 7, 9, 13, 18, 24),
    (-28, -20, -14, -11, -8, -5, -3, -1, 1, 3, 5, 8, 11, 15, 21, 28),
)


def array_exponent(amax: Tensor) -> Tensor:
    """Smallest ``e`` in [-127, 127] with ``amax <= 31 * 2^e`` (float tensor; zero -> -127)."""
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    t = safe / ENTRY_MAX  # 0 for amax below 31 * 2^-150: e is then far below -127
    e = ceil_log2(torch.where(t > 0, t, 1.0)).float()
    e = e + (safe > ENTRY_MAX * torch.exp2(e)).float()  # the division may have rounded down
    return torch.where((amax > 0) & (t > 0), e, torch.full_like(e, EMIN)).clamp(EMIN, EMAX)


def normalize(x: Tensor, block_len: int, array_len: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """``y`` ``[..., nA, L_A/L_b, L_b]`` in [-31, 31], scales and all-zero flags
    ``[..., nA, 1, 1]``, and the row length ``n`` for ``from_blocks``."""
    xa, n = to_blocks(x, array_len)
    amax = xa.abs().amax(dim=-1, keepdim=True)
    scale = torch.exp2(array_exponent(amax))
    y = (xa / scale).clamp(-ENTRY_MAX, ENTRY_MAX)
    shape = (*xa.shape[:-1], array_len // block_len, block_len)
    return y.reshape(shape), scale.unsqueeze(-1), (amax == 0).unsqueeze(-1), n


def bins_of(y: Tensor, res: int = 1) -> Tensor:
    """Lookup bin ``floor(2 res y) + 62 res`` of each scalar (entries are multiples of 1/res):
    bin k covers ``[k/(2 res) - 31, (k+1)/(2 res) - 31)``."""
    return (torch.floor((2 * res) * y) + 2 * ENTRY_MAX * res).clamp(0, nbins(res) - 1).long()


def nbins(res: int = 1) -> int:
    return 4 * ENTRY_MAX * res + 1


def build_luts(codebooks: Tensor, res: int = 1) -> tuple[Tensor, Tensor]:
    """``(index, value)`` tables ``[N_c, nbins]``: the nearest entry for each bin.

    Entries are multiples of ``1/res``, so midpoints are multiples of ``1/(2 res)`` and no bin's
    interior holds one: the bin centre decides. A scalar exactly on a midpoint starts a bin, so
    it takes the upper entry. Equal entries: the first index.
    """
    k = torch.arange(nbins(res), device=codebooks.device, dtype=torch.float64)
    centres = (k + 0.5) / (2 * res) - ENTRY_MAX
    dist = (centres[None, :, None] - codebooks.double()[:, None, :]).abs()
    idx = dist.argmin(dim=-1)
    return idx, codebooks.float().gather(1, idx)


@functools.lru_cache(maxsize=32)
def _cached_luts(
    codebooks: tuple[tuple[int, ...], ...], device: torch.device
) -> tuple[Tensor, Tensor]:
    return build_luts(torch.tensor(codebooks, dtype=torch.float32, device=device))


# Blocks per pass of ``assign``: it bounds the transient candidates ([blocks, L_b, N_c] float32,
# 8 MiB at the defaults) and keeps the ops per pass large enough to be worth a thread each.
ASSIGN_CHUNK = 16384


def assign(
    y: Tensor, lut_values: Tensor, valid: Tensor | None = None, res: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """Best codebook per block of ``y`` ``[..., L_b]``: ``(choice, dequantised y, sq. error)``.

    A block's error is the float32 sum of its scalars' squared errors ``(y - entry)^2``, added
    left to right (the kernels add in the same order, so near-ties resolve alike everywhere);
    the least error wins, ties to the lowest index. ``valid`` (broadcastable to ``y``) masks
    padding out of the error.
    """
    lb = y.shape[-1]
    yb = y.reshape(-1, lb)
    vb = None if valid is None else valid.expand(y.shape).reshape(-1, lb)
    table = lut_values.T.contiguous()  # [nbins, N_c]: a bin's nearest entry in every codebook
    choices, values, errors = [], [], []
    for start in range(0, max(yb.shape[0], 1), ASSIGN_CHUNK):  # one pass even for no blocks
        yc = yb[start : start + ASSIGN_CHUNK]
        # every scalar's nearest entry in every codebook: [blocks, L_b, N_c]
        cand = table.index_select(0, bins_of(yc, res).flatten()).view(*yc.shape, table.shape[1])
        sq = (yc.unsqueeze(-1) - cand).square_()
        if vb is not None:
            sq.mul_(vb[start : start + ASSIGN_CHUNK].unsqueeze(-1))
        err = sq[:, 0]
        for i in range(1, lb):  # left to right
            err = err + sq[:, i]
        choice = err.argmin(dim=-1)  # argmin: the first of equal minima
        pick = choice[:, None, None].expand(-1, lb, 1)
        choices.append(choice)
        values.append(cand.gather(-1, pick).squeeze(-1))
        errors.append(err.gather(-1, choice[:, None]).squeeze(-1))
    shape = y.shape[:-1]
    return (
        torch.cat(choices).reshape(shape),
        torch.cat(values).reshape(y.shape),
        torch.cat(errors).reshape(shape),
    )


def round_codebooks(codebooks: Tensor, res: int = 1) -> Tensor:
    """Entries as 6-bit integers (multiples of ``1/res``): round half even, clamp to +-31."""
    return (torch.round(codebooks.double() * res) / res).clamp(-ENTRY_MAX, ENTRY_MAX).float()


def load_codebooks(path: str) -> tuple[Tensor, dict]:
    """``(codebooks [N_c, 16], metadata)``; entries rounded to integers in [-31, 31]."""
    doc = read_json_file(path, "lobcq codebook_file")
    rows = doc.get("codebooks") if isinstance(doc, dict) else None
    if (
        not isinstance(rows, list)
        or not rows
        or not all(isinstance(r, list) and len(r) == NUM_ENTRIES for r in rows)
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for r in rows for v in r)
    ):
        raise FormatError(
            f"lobcq codebook_file {path!r}: 'codebooks' must be a list of lists "
            f"of {NUM_ENTRIES} finite numbers (write it with `qat fit-lobcq`)"
        )
    meta = {k: v for k, v in doc.items() if k != "codebooks"}
    return round_codebooks(torch.tensor(rows, dtype=torch.float64)), meta


@register_format("lobcq")
@dataclasses.dataclass(frozen=True)
class LOBCQ(Format):
    """Locally optimal block clustered quantisation with frozen codebooks."""

    block_len: int = 8
    array_len: int = 64
    num_codebooks: int = 16
    codebook_file: str | None = None

    def validate(self) -> None:
        check_int("lobcq", "block_len", self.block_len, 1)
        check_int("lobcq", "array_len", self.array_len, 1)
        check_int("lobcq", "num_codebooks", self.num_codebooks, 1, 256)
        if self.array_len % self.block_len:
            raise FormatError(
                f"lobcq.array_len ({self.array_len}) must be a multiple of "
                f"block_len ({self.block_len})"
            )
        if self.codebook_file is None:
            if (self.num_codebooks, self.block_len, self.array_len) != (16, 8, 64):
                # Like the codebook formats: no silent fit at first use, the user fits once.
                raise FormatError(
                    f"lobcq: no stored codebooks for num_codebooks={self.num_codebooks}, "
                    f"block_len={self.block_len}, array_len={self.array_len} (the default is "
                    "16, 8, 64); fit them once with `qat fit-lobcq --gaussian 131072 "
                    f"--num-codebooks {self.num_codebooks} --block-len {self.block_len} "
                    f"--array-len {self.array_len} --out FILE` and set codebook_file: FILE"
                )
        else:
            if not isinstance(self.codebook_file, str):
                raise FormatError(
                    f"lobcq.codebook_file must be a path string or null, got {self.codebook_file!r}"
                )
            cbs, meta = load_codebooks(self.codebook_file)
            for key in ("num_codebooks", "block_len", "array_len"):
                if key in meta and meta[key] != getattr(self, key):
                    raise FormatError(
                        f"lobcq: codebook_file {self.codebook_file!r} holds {key}="
                        f"{meta[key]} but the format has {key}={getattr(self, key)}; set "
                        f"{key}: {meta[key]} or refit the file"
                    )
            table = tuple(tuple(int(v) for v in row) for row in cbs.tolist())
            object.__setattr__(self, "_codebooks", table)

    @property
    def codebooks(self) -> tuple[tuple[int, ...], ...]:
        """``N_c`` rows of 16 integer entries (from the file, or the Gaussian default)."""
        return getattr(self, "_codebooks", DEFAULT_CODEBOOKS)

    @property
    def prefix_block(self) -> int:
        """Arrays are quantised on their own and an all-zero array stays zero."""
        return self.array_len

    @property
    def bits_per_element(self) -> float:
        selector = math.ceil(math.log2(self.num_codebooks)) if self.num_codebooks > 1 else 0
        return 4 + selector / self.block_len + SCALE_BITS / self.array_len

    def _assigned(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
        """``(y, scale, zero, choice, q)`` of ``normalize`` and ``assign`` on float32 ``x``
        (padding of a ragged last block out of the choice), and the row length ``n``."""
        y, scale, zero, n = normalize(x, self.block_len, self.array_len)
        _, lut_values = _cached_luts(self.codebooks, x.device)
        total = y.shape[-3] * self.array_len
        valid = None
        if total != n:  # ragged: padding must not sway the codebook choice
            valid = (torch.arange(total, device=x.device) < n).float().reshape(y.shape[-3:])
        choice, q, _ = assign(y, lut_values, valid)
        return y, scale, zero, choice, q, n

    def _quantize_lastdim(self, x: Tensor) -> Tensor:
        _, scale, zero, _, q, n = self._assigned(x)
        q = torch.where(zero, torch.zeros_like(q), q * scale)
        return from_blocks(q.reshape(*q.shape[:-2], self.array_len), n)

    def _encode_lastdim(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Codes ``[..., arrays, L_A]``: each scalar's entry index (0..15) in its block's
        codebook; scales ``[..., arrays]``: the array exponents ``e`` (int32); extra
        ``selectors`` ``[..., arrays, L_A / L_b]`` (each block's codebook) and ``zero``
        ``[..., arrays]`` (all-zero arrays, which decode to 0 whatever the codebooks)."""
        y, scale, zero, choice, _, _ = self._assigned(x)
        lut_idx, _ = _cached_luts(self.codebooks, x.device)
        codes = lut_idx[choice.unsqueeze(-1), bins_of(y)].to(torch.uint8)
        e = floor_log2(scale[..., 0, 0])  # scale is 2^e exactly
        extra = {"selectors": choice.to(torch.uint8), "zero": zero[..., 0, 0]}
        return codes.reshape(*codes.shape[:-2], self.array_len), e, extra

    def _decode_lastdim(
        self, codes: Tensor, scales: Tensor, extra: dict[str, Tensor], n: int
    ) -> Tensor:
        books = torch.tensor(self.codebooks, dtype=torch.float32, device=codes.device)
        sel = extra["selectors"].long().repeat_interleave(self.block_len, dim=-1)
        q = books[sel, codes.long()] * torch.exp2(scales.float()).unsqueeze(-1)
        q = torch.where(extra["zero"].unsqueeze(-1), torch.zeros_like(q), q)
        return from_blocks(q, n)
