"""4-bit codebook formats: NF4, AF4, BOF4, BOF4-S (docs/formats.md), optionally with OPQ.

Per block of ``block_size`` elements: ``s_b = max|w|`` (``absmax``) or the signed value of the
largest-magnitude element (``signed_absmax``: that element maps to exactly +1; on a tie in
``|w|`` the first one wins); ``x = w / s_b``; ``q = s_b * level``, the level nearest to ``x``.
Ties (``x`` equal to the float32 midpoint of two levels) go to the upper level, as in the
optimiser. An all-zero block stays zero. Storage: 4 bits per element plus a 16-bit scale per
block (``4 + 16/B``), plus the expected outlier storage with ``outliers: opq`` (see ``opq.py``).

Tables: NF4 (block independent); AF4 is the block-64 table, used as is at any block size; BOF4 /
BOF4-S are built in for ``(mse, 64)`` and BOF4-S also ``(mse, 32)``, ``(mse, 128)``. Any other
``(metric, block_size)`` needs ``codebook_file:`` from ``qat codebook`` (fitting takes seconds,
too slow to do silently inside a forward pass, and a file keeps runs reproducible).
The table is resolved when the format is built, so a bad file fails at recipe load time.

Codes (``encode``): 4-bit level indices (int32); scales: ``s_b`` in float32 (0 for an all-zero
block, whose elements decode to 0 whatever their index); with OPQ, ``extra`` holds
``outlier_mask`` (bool, blocked like the codes) and ``outlier_values`` (the kept bf16-rounded
values in float32, zero elsewhere).
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
    check_choice,
    check_int,
    from_blocks,
    read_json_file,
    to_blocks,
)
from qat.formats.opq import opq_bits, split_outliers
from qat.formats.registry import register_format

NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
AF4_LEVELS = (
    -1.0,
    -0.69441008,
    -0.51243739,
    -0.3736951,
    -0.25607552,
    -0.14982478,
    -0.04934812,
    0.0,
    0.04273164,
    0.12934483,
    0.21961274,
    0.31675666,
    0.42563882,
    0.55496234,
    0.72424863,
    1.0,
)
# (kind, metric, block_size) -> published levels (Blumenberg et al., arXiv 2505.06653).
BOF4_TABLES: dict[tuple[str, str, int], tuple[float, ...]] = {
    ("bof4", "mse", 64): (
        -1.0,
        -0.7535245418548584,
        -0.579203724861145,
        -0.4385998845100403,
        -0.3167679905891418,
        -0.2059924453496933,
        -0.1015387624502182,
        0.0,
        0.0887245312333107,
        0.1793769598007202,
        0.2741499841213226,
        0.3758211433887482,
        0.4884937703609467,
        0.6187058687210083,
        0.7790452241897583,
        1.0,
    ),
    ("bof4s", "mse", 64): (
        -0.8568463921546936,
        -0.6692874431610107,
        -0.5235266089439392,
        -0.4004882574081421,
        -0.2910638153553009,
        -0.1900092959403992,
        -0.0938529595732689,
        0.0,
        0.0887671709060669,
        0.1794802695512772,
        0.2743096053600311,
        0.3760197460651398,
        0.4886530041694641,
        0.6188603639602661,
        0.7791395783424377,
        1.0,
    ),
    ("bof4s", "mse", 32): (
        -0.8732797503471375,
        -0.6907446384429932,
        -0.5437039136886597,
        -0.4173701703548431,
        -0.3038933575153351,
        -0.1986017823219299,
        -0.0981557220220566,
        0.0,
        0.0925938412547112,
        0.187048003077507,
        0.2855197489261627,
        0.3907126188278198,
        0.506283164024353,
        0.6379748582839966,
        0.7956376671791077,
        1.0,
    ),
    ("bof4s", "mse", 128): (
        -0.83739173412323,
        -0.6462452411651611,
        -0.5028634667396545,
        -0.3836247622966766,
        -0.2783779501914978,
        -0.1815713942050934,
        -0.0896477326750755,
        0.0,
        0.0850915610790253,
        0.1720834821462631,
        0.2632072865962982,
        0.3613293170928955,
        0.4707452654838562,
        0.5988966822624207,
        0.761027991771698,
        1.0,
    ),
}
NORMALIZATIONS = ("absmax", "signed_absmax")
OUTLIERS = ("none", "opq")
SCALE_BITS = 16


def _level_tensors(levels: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    lv = torch.tensor(levels, dtype=torch.float32, device=device)
    return lv, (lv[1:] + lv[:-1]) / 2


_cached_level_tensors = functools.lru_cache(maxsize=64)(_level_tensors)


def level_tensors(levels: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """float32 levels and the 15 float32 midpoints between neighbours, cached per device.
    Under torch.compile the tensors are built in the graph (constants to the compiler); the
    cache is for eager calls, and dynamo would only warn that it skips it."""
    if torch.compiler.is_compiling():
        return _level_tensors(levels, device)
    return _cached_level_tensors(levels, device)


def encode_blocks(
    xb: Tensor, levels: tuple[float, ...], normalization: str
) -> tuple[Tensor, Tensor]:
    """Level indices (int32) of ``[..., nblocks, B]`` float32 blocks and their scales
    ``[..., nblocks, 1]`` (``s_b``; 0 for an all-zero block)."""
    _, mids = level_tensors(levels, xb.device)
    if normalization == "absmax":
        s = xb.abs().amax(dim=-1, keepdim=True)
    else:
        s = xb.gather(-1, xb.abs().argmax(dim=-1, keepdim=True))
    safe = torch.where(s == 0, torch.ones_like(s), s)
    code = torch.bucketize(xb / safe, mids, right=True, out_int32=True)  # a tie goes up
    return code, s


def decode_blocks(code: Tensor, s: Tensor, levels: tuple[float, ...]) -> Tensor:
    """Values of level indices ``code`` with block scales ``s`` (``[..., nblocks, 1]``)."""
    lv, _ = level_tensors(levels, code.device)
    zero = s == 0
    q = lv[code] * torch.where(zero, torch.ones_like(s), s)
    # A zero block has x = 0, exact when 0 is a level (all built-in tables); else force it.
    return q if 0.0 in levels else torch.where(zero, torch.zeros_like(q), q)


def quantize_blocks(xb: Tensor, levels: tuple[float, ...], normalization: str) -> Tensor:
    """Codebook-quantise ``[..., nblocks, B]`` float32 blocks (zeros in, zeros out)."""
    return decode_blocks(*encode_blocks(xb, levels, normalization), levels)


def load_codebook_file(path: str) -> dict:
    """Read a ``qat codebook`` JSON file; FormatError if missing or malformed."""
    doc = read_json_file(path, "codebook_file")
    levels = doc.get("levels") if isinstance(doc, dict) else None
    if (
        not isinstance(levels, list)
        or len(levels) != 16
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in levels)
        or any(b <= a for a, b in zip(levels, levels[1:]))
    ):
        raise FormatError(
            f"codebook_file {path!r}: 'levels' must be 16 finite, strictly "
            f"increasing numbers (write it with `qat codebook`)"
        )
    return doc


@dataclasses.dataclass(frozen=True)
class CodebookFormat(Format):
    """Shared parameters and quantiser; subclasses supply ``table()``."""

    block_size: int = 64
    normalization: str = "absmax"
    outliers: str = "none"
    outlier_quantile: float = 0.95

    def table(self) -> tuple[float, ...]:
        raise NotImplementedError

    def validate(self) -> None:
        check_int(self.name, "block_size", self.block_size, 1)
        check_choice(self.name, "normalization", self.normalization, NORMALIZATIONS)
        check_choice(self.name, "outliers", self.outliers, OUTLIERS)
        q = self.outlier_quantile
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q < 1:
            raise FormatError(f"{self.name}.outlier_quantile must be a number in (0, 1), got {q!r}")
        # Resolve the table once; frozen dataclass, so bypass __setattr__ (not a field).
        object.__setattr__(self, "_levels", tuple(float(v) for v in self.table()))

    @property
    def levels(self) -> tuple[float, ...]:
        return self._levels  # type: ignore[attr-defined]

    @property
    def bits_per_element(self) -> float:
        extra = opq_bits(self.block_size, self.outlier_quantile) if self.outliers == "opq" else 0
        return 4 + SCALE_BITS / self.block_size + extra

    @property
    def independent_block(self) -> int | None:
        # OPQ's outlier threshold counts a ragged block's real elements: not padding-neutral.
        return self.block_size if self.outliers == "none" else None

    @property
    def scale_block(self) -> int | None:
        return self.block_size if self.outliers == "none" else None

    def block_scales(self, xb: Tensor) -> Tensor:
        if self.outliers != "none":
            return super().block_scales(xb)
        return encode_blocks(xb, self.levels, self.normalization)[1].squeeze(-1)

    def round_with_scales(self, xb: Tensor, scales: Tensor) -> Tensor:
        s = scales.unsqueeze(-1)
        _, mids = level_tensors(self.levels, xb.device)
        safe = torch.where(s == 0, torch.ones_like(s), s)
        code = torch.bucketize(xb / safe, mids, right=True, out_int32=True)
        return decode_blocks(code, s, self.levels)

    def _quantize_lastdim(self, x: Tensor) -> Tensor:
        return self._decode_lastdim(*self._encode_lastdim(x), x.shape[-1])

    def _encode_lastdim(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        xb, n = to_blocks(x, self.block_size)
        extra: dict[str, Tensor] = {}
        if self.outliers == "opq":
            xb, mask, kept = split_outliers(xb, n, self.outlier_quantile)
            extra = {
                "outlier_mask": mask,
                "outlier_values": torch.where(mask, kept, torch.zeros_like(kept)),
            }
        code, s = encode_blocks(xb, self.levels, self.normalization)
        return code, s.squeeze(-1), extra

    def _decode_lastdim(
        self, codes: Tensor, scales: Tensor, extra: dict[str, Tensor], n: int
    ) -> Tensor:
        q = decode_blocks(codes, scales.unsqueeze(-1), self.levels)
        if "outlier_mask" in extra:
            q = torch.where(extra["outlier_mask"], extra["outlier_values"], q)
        return from_blocks(q, n)


@register_format("nf4")
@dataclasses.dataclass(frozen=True)
class NF4(CodebookFormat):
    """NormalFloat4 (QLoRA): quantiles of a Gaussian, absmax-normalised."""

    def table(self) -> tuple[float, ...]:
        return NF4_LEVELS


@register_format("af4")
@dataclasses.dataclass(frozen=True)
class AF4(CodebookFormat):
    """AbnormalFloat4: levels fitted to the absmax-normalised block-64 distribution."""

    def table(self) -> tuple[float, ...]:
        return AF4_LEVELS


@dataclasses.dataclass(frozen=True)
class _BOF4Base(CodebookFormat):
    """Block-wise optimal float: Lloyd-optimal levels for the error on ``w`` (not on ``x``)."""

    metric: str = "mse"
    codebook_file: str | None = None

    def table(self) -> tuple[float, ...]:
        check_choice(self.name, "metric", self.metric, ("mse", "mae"))
        if self.codebook_file is not None:
            return self._file_table()
        key = (self.name, self.metric, self.block_size)
        if key not in BOF4_TABLES:
            builtin = ", ".join(f"{m}/{b}" for k, m, b in BOF4_TABLES if k == self.name)
            out = f"{self.name}_{self.metric}_{self.block_size}.json"
            raise FormatError(
                f"{self.name}: no built-in levels for metric={self.metric}, "
                f"block_size={self.block_size} (built in, metric/block_size: {builtin}). Fit "
                f"them with `qat codebook --kind {self.name} --metric {self.metric} "
                f"--block-size {self.block_size} --out {out}` and set codebook_file: {out}"
            )
        return BOF4_TABLES[key]

    def _file_table(self) -> tuple[float, ...]:
        if not isinstance(self.codebook_file, str):
            raise FormatError(
                f"{self.name}.codebook_file must be a path string or null, "
                f"got {self.codebook_file!r}"
            )
        doc = load_codebook_file(self.codebook_file)
        for key in ("kind", "metric", "block_size", "normalization"):
            want = self.name if key == "kind" else getattr(self, key)
            if key in doc and doc[key] != want:
                raise FormatError(
                    f"{self.name}: codebook_file {self.codebook_file!r} was fitted for "
                    f"{key}={doc[key]!r} but the format has {key}={want!r}; set "
                    f"{'format' if key == 'kind' else key}: {doc[key]} or refit the file"
                )
        return tuple(doc["levels"])


@register_format("bof4")
@dataclasses.dataclass(frozen=True)
class BOF4(_BOF4Base):
    """BOF4: absmax normalisation, -1, 0 and +1 pinned."""


@register_format("bof4s")
@dataclasses.dataclass(frozen=True)
class BOF4S(_BOF4Base):
    """BOF4-S: signed absmax, the block's largest-magnitude element maps to exactly +1."""

    normalization: str = "signed_absmax"
