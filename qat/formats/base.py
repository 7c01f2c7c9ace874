"""The contract every number format follows, and the block helpers they share.

A format is a frozen dataclass of its parameters. ``quantize(x, dim)`` fake-quantises
(returns dequantised values in ``x``'s dtype and shape); ``bits_per_element`` is the
storage cost including shared scales. Families with a packed form (BFP, MX, the codebooks)
also give ``encode(x, dim)`` (integer codes + per-block scales, an ``Encoded``) and
``decode(enc)``, with ``decode(encode(x))`` equal to ``quantize(x)`` bit for bit.
Formats know nothing of models or trainers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from qat.errors import QatError, check_one_of


class FormatError(QatError):
    """A format spec is invalid; the message names the parameter and the valid choices."""


@dataclasses.dataclass(frozen=True, eq=False)
class Encoded:
    """What a format stores for a tensor: integer codes and per-block scales.

    Laid out with the blocking dim moved last and cut into blocks: ``codes`` is
    ``[..., nblocks, B]`` (a ragged last block is zero-padded), ``scales`` is
    ``[..., nblocks]``; what a code and a scale mean is the family's (see its ``encode``).
    ``extra`` holds family-specific tensors (OPQ outliers). ``nonfinite`` is ``x``'s NaN and
    +-inf at their positions (float32, same layout as the unpadded row, 0 elsewhere): they pass
    through, as in ``quantize``. ``shape``, ``dim`` and ``dtype`` restore the input's layout.
    """

    codes: Tensor
    scales: Tensor
    nonfinite: Tensor
    shape: tuple[int, ...]
    dim: int
    dtype: torch.dtype
    extra: dict[str, Tensor] = dataclasses.field(default_factory=dict)

    @property
    def length(self) -> int:
        """Elements per row along the blocking dim (before padding)."""
        return self.nonfinite.shape[-1]


@dataclasses.dataclass(frozen=True)
class Format:
    """Base class of all number formats.

    Subclasses implement ``_quantize_lastdim(x)`` on a float32 tensor whose last dim is the
    blocking dim, and ``bits_per_element``. This base moves ``dim`` to the end, upcasts to
    float32, handles non-finite inputs and restores dtype and layout.

    Non-finite inputs: NaN and +-inf are passed through unchanged at their positions and are
    treated as 0 when the block's scale is chosen, so one bad activation does not poison its
    whole block (the trainer's NaN guard is what reports them).
    """

    name: ClassVar[str] = "format"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise FormatError for invalid parameters. Subclasses extend."""

    @property
    def bits_per_element(self) -> float:
        raise NotImplementedError

    @property
    def independent_block(self) -> int | None:
        """``B`` when every block of ``B`` elements is quantised on its own and zero padding
        of a ragged last block changes nothing else (so a row may be cut into ``[-1, B]``);
        None for formats whose scale spans a row or tensor, or that count real elements."""
        return None

    @property
    def prefix_block(self) -> int | None:
        """``B`` when rows along the blocking dim are quantised each on its own and a row's
        first ``k * B`` elements quantise to the row's own values there, with a tail of zeros
        after them quantised to zeros: block attention may then quantise P a few rows at a
        time and skip a causal zero tail in whole multiples of ``B``. The block of formats of
        independent blocks; LO-BCQ's array (not independent blocks: its padding is ignored);
        None for scales spanning rows or tensors."""
        return self.independent_block

    def _quantize_lastdim(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    # --- a fixed scale, then one element at a time (GPTQ; qat.quant.transforms.gptq) -------

    @property
    def scale_block(self) -> int | None:
        """The elements one scale covers along the blocking dim, for a family whose elements
        can be rounded one at a time once their block's scale is fixed (``block_scales``,
        ``round_with_scales``); None for the others."""
        return None

    def block_scales(self, xb: Tensor) -> Tensor:
        """The scales ``quantize`` chooses for float32 blocks ``xb`` ``[..., nblocks, B]``
        (``B = scale_block``): ``[..., nblocks]``, in the family's own terms."""
        raise FormatError(
            f"format {self.name!r} cannot round elements one at a time on a fixed block scale"
        )

    def round_with_scales(self, xb: Tensor, scales: Tensor) -> Tensor:
        """Float32 elements ``xb`` ``[..., nblocks, k]`` (any ``k``: each on its own) rounded
        on the grid that ``scales`` ``[..., nblocks]`` fix, so that
        ``round_with_scales(xb, block_scales(xb))`` is ``quantize``'s output per block."""
        raise FormatError(
            f"format {self.name!r} cannot round elements one at a time on a fixed block scale"
        )

    def _encode_lastdim(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(codes [..., nblocks, B], scales [..., nblocks], extra)`` of finite float32 ``x``."""
        raise FormatError(
            f"format {self.name!r} has no integer encoding (encode/decode); "
            "it can only fake-quantise"
        )

    def _decode_lastdim(
        self, codes: Tensor, scales: Tensor, extra: dict[str, Tensor], n: int
    ) -> Tensor:
        """float32 ``[..., n]`` values of ``_encode_lastdim``'s output for rows of ``n``."""
        raise FormatError(f"format {self.name!r} has no integer encoding (encode/decode)")

    def _check(self, x: Tensor, dim: int) -> int:
        """``dim`` normalised, after checking ``x``'s dtype and that ``dim`` is in range."""
        if not torch.is_floating_point(x):
            raise TypeError(f"{self.name}: expected a floating-point tensor, got {x.dtype}")
        ndim = x.dim()
        if not -max(ndim, 1) <= dim < max(ndim, 1):
            raise IndexError(
                f"{self.name}: dim {dim} is out of range for a {ndim}-D tensor "
                f"(expected -{max(ndim, 1)} <= dim < {max(ndim, 1)})"
            )
        return dim % max(ndim, 1)

    @staticmethod
    def _lastdim(x: Tensor, d: int) -> Tensor:
        """float32 ``x`` with dim ``d`` last (a scalar becomes ``[1]``)."""
        xf = x.float().reshape(1) if x.dim() == 0 else x.float()
        return xf.movedim(d, -1) if x.dim() > 1 and d != x.dim() - 1 else xf

    @staticmethod
    def _restore(
        q: Tensor, xf: Tensor, finite: Tensor, shape: torch.Size, d: int, dtype: torch.dtype
    ) -> Tensor:
        """Saturate finite values at ``dtype``'s max, pass non-finite ``xf`` through, and put
        ``d`` and the shape back."""
        big = torch.finfo(dtype).max
        q = torch.where(finite, q.clamp(-big, big), xf)
        if len(shape) > 1 and d != len(shape) - 1:
            q = q.movedim(-1, d)
        return q.reshape(shape).to(dtype)

    def quantize(self, x: Tensor, dim: int = -1) -> Tensor:
        """Fake-quantise ``x`` with blocks running along ``dim``.

        Sync-free (no data-dependent Python branch), so it runs on a GPU without stalling the
        queue and compiles into one graph. A finite input always gives a finite output in
        ``x.dtype``: values the format would round past the dtype's largest finite value
        saturate to it (docs/formats.md, "Non-finite values and saturation").
        """
        d = self._check(x, dim)
        if x.numel() == 0:
            return x
        xf = self._lastdim(x, d)
        finite = torch.isfinite(xf)
        q = self._quantize_lastdim(torch.where(finite, xf, 0.0).contiguous())
        return self._restore(q, xf, finite, x.shape, d, x.dtype)

    def encode(self, x: Tensor, dim: int = -1) -> Encoded:
        """Integer codes and per-block scales of ``x`` blocked along ``dim`` (see ``Encoded``);
        ``decode(encode(x, dim))`` equals ``quantize(x, dim)`` bit for bit. FormatError for a
        family without an integer encoding."""
        d = self._check(x, dim)
        xf = self._lastdim(x, d)
        finite = torch.isfinite(xf)
        codes, scales, extra = self._encode_lastdim(torch.where(finite, xf, 0.0).contiguous())
        return Encoded(
            codes=codes,
            scales=scales,
            nonfinite=torch.where(finite, 0.0, xf),
            shape=tuple(x.shape),
            dim=d,
            dtype=x.dtype,
            extra=extra,
        )

    def decode(self, enc: Encoded) -> Tensor:
        """The values ``enc`` stands for, in the encoded tensor's dtype and shape."""
        shape = torch.Size(enc.shape)
        if shape.numel() == 0:
            return torch.empty(shape, dtype=enc.dtype, device=enc.codes.device)
        q = self._decode_lastdim(enc.codes, enc.scales, enc.extra, enc.length)
        finite = torch.isfinite(enc.nonfinite)
        return self._restore(q, enc.nonfinite, finite, shape, enc.dim, enc.dtype)

    def spec(self) -> dict[str, Any]:
        """The dict that ``make_format`` turns back into this format."""
        return {"format": self.name, **dataclasses.asdict(self)}

    def __str__(self) -> str:
        # scale=max is every format's rule from before the scale choice existed: leaving it
        # out keeps the labels of earlier runs and benches (spec() still has it).
        params = ", ".join(
            f"{k}={v}"
            for k, v in dataclasses.asdict(self).items()
            if not (k == "scale" and v == "max")
        )
        return f"{self.name}({params})"


# --- block helpers -------------------------------------------------------------------------


def to_blocks(x: Tensor, block_size: int) -> tuple[Tensor, int]:
    """Reshape ``[..., n]`` to ``[..., ceil(n/B), B]``, zero-padding a ragged last block.

    Returns the blocked tensor and the original length ``n`` for ``from_blocks``.
    """
    n = x.shape[-1]
    nblocks = math.ceil(n / block_size)
    pad = nblocks * block_size - n
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], nblocks, block_size), n


def from_blocks(xb: Tensor, n: int) -> Tensor:
    """Inverse of ``to_blocks``: flatten the block dims and trim the padding."""
    x = xb.reshape(*xb.shape[:-2], xb.shape[-2] * xb.shape[-1])
    return x[..., :n]


def ceil_log2(x: Tensor) -> Tensor:
    """Exact ``ceil(log2(x))`` for positive float32 ``x`` (frexp avoids log2 rounding errors)."""
    mantissa, exponent = torch.frexp(x)  # x = m * 2^e with m in [0.5, 1)
    # x is an exact power of two when m == 0.5: then ceil(log2 x) = e - 1.
    return torch.where(mantissa == 0.5, exponent - 1, exponent).to(torch.int32)


def floor_log2(x: Tensor) -> Tensor:
    """Exact ``floor(log2(x))`` for positive float32 ``x``."""
    _, exponent = torch.frexp(x)
    return (exponent - 1).to(torch.int32)


def twos_complement_range(bits: int) -> tuple[int, int]:
    """``(-2^(bits-1), 2^(bits-1) - 1)``: the range of a ``bits``-bit shared exponent."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def block_exponent(amax: Tensor, lo: int, hi: int, *, ceil: bool) -> Tensor:
    """Per-block ``clamp(ceil|floor(log2 amax), lo, hi)`` as int32; all-zero blocks get ``lo``.

    The shared-exponent rule of the block formats: BFP and block log round the exponent up,
    block minifloat down.
    """
    nonzero = amax > 0
    safe = torch.where(nonzero, amax, torch.ones_like(amax))
    e = ceil_log2(safe) if ceil else floor_log2(safe)
    return torch.where(nonzero, e, torch.full_like(e, lo)).clamp(lo, hi)


MAX_SIDE_FILE_BYTES = 1 << 20  # a codebook file is a few KB; anything bigger is not one


def read_json_file(path: str, what: str) -> Any:
    """A format's side file (codebooks) as JSON; FormatError naming ``what`` if unreadable.
    Only a regular file is opened (a FIFO would block the read for ever), of bounded size,
    as UTF-8."""
    import json
    import os
    import stat

    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{what} {path!r} is not a regular file")
        if st.st_size > MAX_SIDE_FILE_BYTES:
            raise FormatError(
                f"{what} {path!r} is {st.st_size} bytes, too large for a "
                f"codebook file (at most {MAX_SIDE_FILE_BYTES})"
            )
        with open(path, "rb") as f:
            return json.loads(f.read(MAX_SIDE_FILE_BYTES + 1).decode("utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{what} {path!r} could not be read: {e}") from None
    except RecursionError:
        raise FormatError(f"{what} {path!r} could not be read: JSON nested too deeply") from None


def check_int(cls_name: str, key: str, value: Any, lo: int, hi: int | None = None) -> None:
    """Raise FormatError unless ``value`` is an int in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"{cls_name}.{key} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise FormatError(f"{cls_name}.{key} must be {rng}, got {value!r}")


def check_choice(cls_name: str, key: str, value: Any, choices: tuple[Any, ...]) -> None:
    check_one_of(f"{cls_name}.{key}", value, choices, FormatError)
