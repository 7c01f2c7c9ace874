"""Block rotations: an orthonormal Hadamard transform along a matmul's reduction dim.

``x @ W^T == (x H) @ (W H)^T`` for any orthonormal ``H``, so rotating both operands of a matmul
leaves its float result unchanged while spreading an outlier over its block: the block's
shared scale then wastes fewer bits on it. ``H`` is block-diagonal (one ``size x size``
Sylvester-Hadamard block repeated along the dim), so a rotation never mixes values across the
blocks a format scales separately when ``size`` divides (or equals) the format's block size.

The recipe form is ``quant.rotation: {kind: hadamard, size: 64}`` (``size: block`` takes the
module's format block size); ``check_rotation_spec`` validates it, ``Rotation`` applies it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from qat.errors import QatError, check_one_of, did_you_mean

ROTATION_KINDS = ("hadamard",)
ROTATION_KEYS = ("kind", "size")


def hadamard(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order ``n`` (a power of two): symmetric,
    entries ``+-1/sqrt(n)``, ``H @ H == I``."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester-Hadamard matrix needs a power-of-two order, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype)


def check_rotation_spec(
    spec: Any, where: str, error: type[Exception] = QatError
) -> dict[str, Any] | None:
    """The normalised ``{kind, size}`` of a ``rotation`` mapping (None: off); one ``error`` line
    naming ``where`` and the key otherwise."""
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise error(
            f"{where} must be a mapping like {{kind: hadamard, size: 64}} or null, got {spec!r}"
        )
    for key in spec:
        if key not in ROTATION_KEYS:
            raise error(
                f"unknown key {where}.{key}{did_you_mean(key, ROTATION_KEYS, where)}; "
                "valid keys: "
                f"{', '.join(ROTATION_KEYS)}"
            )
    kind = spec.get("kind", "hadamard")
    check_one_of(f"{where}.kind", kind, ROTATION_KINDS, error)
    size = spec.get("size", "block")
    if size != "block" and (
        isinstance(size, bool) or not isinstance(size, int) or size < 2 or size & (size - 1)
    ):
        raise error(
            f"{where}.size must be a power of two >= 2 or 'block' (the format's block "
            f"size), got {size!r}"
        )
    return {"kind": kind, "size": size}


class Rotation(nn.Module):
    """Multiplies blocks of ``size`` consecutive elements along a dim by ``H`` (orthonormal,
    symmetric): one batched matmul, no host sync. ``H`` is a non-persistent buffer, so it moves
    with the model and never enters a state dict. Input dtype in, same dtype out."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("matrix", hadamard(size), persistent=False)

    def forward(self, x: Tensor, dim: int = -1) -> Tensor:
        moved = x.movedim(dim, -1) if dim not in (-1, x.dim() - 1) else x
        n = moved.shape[-1]
        h = self.matrix if self.matrix.dtype == x.dtype else self.matrix.to(x.dtype)
        out = (moved.reshape(*moved.shape[:-1], n // self.size, self.size) @ h).reshape(moved.shape)
        return out.movedim(-1, dim) if moved is not x else out

    def extra_repr(self) -> str:
        return f"hadamard, size={self.size}"


def format_block(fmt: Any) -> int | None:
    """The block length a format scales by (what ``size: block`` means), if it has one."""
    for attr in ("block_size", "block_len"):
        b = getattr(fmt, attr, None)
        if isinstance(b, int):
            return b
    return None


def resolve_size(
    spec: Mapping[str, Any],
    formats: list[Any],
    dim_len: int,
    module: str,
    what: str,
    error: type[Exception] = QatError,
) -> int:
    """The rotation size for one module's reduction dim of length ``dim_len``: ``spec['size']``
    or, for ``block``, the first of ``formats`` with a block length. Refused in one line
    naming ``module`` when it does not divide ``dim_len``."""
    size = spec["size"]
    if size == "block":
        blocks = [b for b in map(format_block, [f for f in formats if f is not None]) if b]
        if not blocks:
            raise error(
                f"quant.rotation.size 'block': module {module!r} has no block format to "
                "take the size from; give a number"
            )
        size = blocks[0]
        if size & (size - 1):
            raise error(
                f"quant.rotation.size 'block' is {size} for module {module!r}, not a "
                "power of two; give a number"
            )
    if dim_len % size:
        raise error(
            f"quant.rotation.size {size} does not divide the {what} ({dim_len}) of "
            f"module {module!r}; choose a power of two that divides it, or override "
            "the rotation for that module (quant.overrides)"
        )
    return size
