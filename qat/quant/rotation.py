"""Rotations: the ``quant.rotation`` spec and the online block rotation.

``x @ W^T == (x H) @ (W H)^T`` for any orthonormal ``H``, so rotating both operands of a matmul
leaves its float result unchanged while spreading an outlier over its block: the block's
shared scale then wastes fewer bits on it. ``H`` is block-diagonal (one ``size x size``
Hadamard block repeated along the dim, ``qat.quant.transforms.hadamard``), so a rotation never mixes
values across the blocks a format scales separately when ``size`` divides (or equals) the
format's block size.

Two recipe forms, validated by ``check_rotation_spec``:

- ``quant.rotation: {kind: hadamard, size: 64}`` (``size: block`` takes the module's format
  block size): ``Rotation`` applied online to both operands of every quantised linear and to
  Q and K;
- ``{residual: hadamard, heads: hadamard, online: {size: 16}, seed: 0, learned: ...}``:
  rotations fused into the weights (``qat.quant.transforms.fuse``), with online blocks only where a
  rotation cannot be fused (the input of the MLP's down projection, Q and K) and optionally
  learned in QAT (``qat.quant.transforms.learned``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from qat.errors import QatError, check_one_of, did_you_mean
from qat.quant.transforms.hadamard import (
    SUPPORTED_ORDERS_TEXT,
    hadamard_matrix,
    hadamard_order_supported,
    sylvester,
)

ROTATION_KINDS = ("hadamard",)
ROTATION_KEYS = ("kind", "size")  # the online block rotation of every quantised linear
FUSED_KINDS = ("hadamard", "random_hadamard", "random")
FUSED_KEYS = ("residual", "heads", "online", "seed", "learned")
ONLINE_KEYS = ("kind", "size")
LEARNED_KEYS = ("rotation", "smooth", "lr")


def hadamard(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order ``n`` (a power of two): symmetric,
    entries ``+-1/sqrt(n)``, ``H @ H == I``."""
    return (sylvester(n) / math.sqrt(n)).to(dtype)


def _check_keys(spec: Mapping[str, Any], keys: tuple[str, ...], where: str, error: type) -> None:
    for key in spec:
        if key not in keys:
            raise error(
                f"unknown key {where}.{key}{did_you_mean(key, keys, where)}; "
                f"valid keys: {', '.join(keys)}"
            )


def _check_size(size: Any, where: str, error: type, full: bool = False) -> Any:
    """A block size: ``block``, (``full``,) or an order with a Hadamard matrix."""
    words = ("block", "full") if full else ("block",)
    if size in words:
        return size
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        allowed = " or ".join(map(repr, words))
        raise error(f"{where} must be {allowed} or an integer >= 2, got {size!r}")
    if not hadamard_order_supported(size):
        raise error(
            f"{where} {size} has no Hadamard matrix here; orders that work: {SUPPORTED_ORDERS_TEXT}"
        )
    return size


def is_fused(spec: Mapping[str, Any] | None) -> bool:
    """Whether a normalised rotation spec is the fused form (``residual`` / ``heads`` / ...)."""
    return spec is not None and "residual" in spec


def check_rotation_spec(
    spec: Any, where: str, error: type[Exception] = QatError, fused: bool = True
) -> dict[str, Any] | None:
    """The normalised rotation spec (None: off); one ``error`` line naming ``where`` and the
    key otherwise. Two forms: ``{kind, size}``, a block rotation applied online to both
    operands of every quantised linear (and Q, K); or the fused form ``{residual, heads,
    online, seed, learned}`` (``fused=False``: only the first, as in an override).

    >>> check_rotation_spec({"size": 16}, "quant.rotation")
    {'kind': 'hadamard', 'size': 16}
    >>> spec = check_rotation_spec({"residual": "hadamard", "heads": {"size": 16}}, "rotation")
    >>> spec["residual"], spec["heads"], spec["online"]
    ({'kind': 'hadamard', 'size': 'full'}, {'kind': 'hadamard', 'size': 16}, None)"""
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise error(
            f"{where} must be a mapping like {{kind: hadamard, size: 64}} or "
            f"{{residual: hadamard, heads: hadamard}}, or null, got {spec!r}"
        )
    if fused and any(k in FUSED_KEYS for k in spec):
        return _check_fused(spec, where, error)
    _check_keys(spec, ROTATION_KEYS if not fused else ROTATION_KEYS + FUSED_KEYS, where, error)
    kind = spec.get("kind", "hadamard")
    check_one_of(f"{where}.kind", kind, ROTATION_KINDS, error)
    return {"kind": kind, "size": _check_size(spec.get("size", "block"), f"{where}.size", error)}


def has_online_rotation(quant: Any) -> bool:
    """Whether a ``QuantConfig`` rotates operands online anywhere: the block form, a fused
    rotation's ``online`` part, or an override's rotation (what an engine must run itself)."""
    spec = check_rotation_spec(quant.rotation, "quant.rotation")
    if spec is not None and (not is_fused(spec) or spec["online"] is not None):
        return True
    return any(o.get("rotation") is not None for o in quant.overrides.values())


def _check_fused(spec: Mapping[str, Any], where: str, error: type) -> dict[str, Any]:
    mixed = [k for k in spec if k in ROTATION_KEYS]
    if mixed:
        raise error(
            f"{where}.{mixed[0]} belongs to the online block rotation of every linear, which "
            f"does not mix with the fused keys ({', '.join(FUSED_KEYS)}); for online blocks "
            f"beside fused rotations give {where}.online: {{size: N}}"
        )
    _check_keys(spec, FUSED_KEYS, where, error)
    out: dict[str, Any] = {}
    for key in ("residual", "heads"):
        out[key] = _check_part(spec.get(key), f"{where}.{key}", error)
    online = spec.get("online")
    if online is not None:
        if not isinstance(online, Mapping):
            raise error(
                f"{where}.online must be a mapping like {{size: 16}} or null, got {online!r}"
            )
        _check_keys(online, ONLINE_KEYS, f"{where}.online", error)
        check_one_of(f"{where}.online.kind", online.get("kind", "hadamard"), ROTATION_KINDS, error)
        online = {
            "kind": "hadamard",
            "size": _check_size(online.get("size", "block"), f"{where}.online.size", error, True),
        }
    out["online"] = online
    seed = spec.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise error(f"{where}.seed must be an integer >= 0, got {seed!r}")
    out["seed"] = seed
    out["learned"] = _check_learned(spec.get("learned"), f"{where}.learned", error)
    if not any(out[k] for k in ("residual", "heads", "online", "learned")):
        raise error(
            f"{where} rotates nothing: set residual, heads, online or learned (or {where}: null)"
        )
    return out


def _check_part(part: Any, where: str, error: type) -> dict[str, Any] | None:
    """``residual`` / ``heads``: a kind (the whole width) or ``{kind, size}`` (block-diagonal
    blocks of ``size``), normalised to ``{kind, size}``; ``size: full`` is the whole width."""
    if part is None:
        return None
    if isinstance(part, str):
        part = {"kind": part}
    if not isinstance(part, Mapping):
        raise error(
            f"{where} must be one of {', '.join(FUSED_KINDS)}, a mapping like "
            f"{{kind: hadamard, size: 16}}, or null, got {part!r}"
        )
    _check_keys(part, ("kind", "size"), where, error)
    kind = part.get("kind", "hadamard")
    check_one_of(f"{where}.kind" if "size" in part else where, kind, FUSED_KINDS, error)
    size = part.get("size", "full")
    if size != "full":
        if isinstance(size, bool) or not isinstance(size, int) or size < 2:
            raise error(f"{where}.size must be 'full' or an integer >= 2, got {size!r}")
        if kind != "random" and not hadamard_order_supported(size):
            raise error(
                f"{where}.size {size} has no Hadamard matrix here; orders that work: "
                f"{SUPPORTED_ORDERS_TEXT}"
            )
    return {"kind": kind, "size": size}


def _check_learned(spec: Any, where: str, error: type) -> dict[str, Any] | None:
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise error(
            f"{where} must be a mapping like {{rotation: true, smooth: false, lr: 1.0e-3}} "
            f"or null, got {spec!r}"
        )
    _check_keys(spec, LEARNED_KEYS, where, error)
    out: dict[str, Any] = {}
    for key, default in (("rotation", True), ("smooth", False)):
        v = spec.get(key, default)
        if not isinstance(v, bool):
            raise error(f"{where}.{key} must be true or false, got {v!r}")
        out[key] = v
    lr = spec.get("lr", 1e-3)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
        raise error(f"{where}.lr must be a positive number, got {lr!r}")
    out["lr"] = float(lr)
    if not (out["rotation"] or out["smooth"]):
        raise error(f"{where} learns nothing: set rotation or smooth to true (or {where}: null)")
    return out


class Rotation(nn.Module):
    """Multiplies blocks of ``size`` consecutive elements along a dim by ``H`` (orthonormal;
    symmetric for a power-of-two ``size``): one batched matmul, no host sync. ``H`` is a
    non-persistent buffer, so it moves with the model and never enters a state dict. Input
    dtype in, same dtype out."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("matrix", hadamard_matrix(size), persistent=False)

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
    """The rotation size for one module's reduction dim of length ``dim_len``: ``spec['size']``,
    ``dim_len`` itself for ``full`` or, for ``block``, the first of ``formats`` with a block
    length. Refused in one line naming ``module`` when it does not divide ``dim_len``."""
    size = spec["size"]
    if size == "full":
        if not hadamard_order_supported(dim_len):
            raise error(
                f"quant.rotation size 'full': the {what} ({dim_len}) of module {module!r} "
                f"has no Hadamard matrix here; orders that work: {SUPPORTED_ORDERS_TEXT}"
            )
        return dim_len
    if size == "block":
        blocks = [b for b in map(format_block, [f for f in formats if f is not None]) if b]
        if not blocks:
            raise error(
                f"quant.rotation.size 'block': module {module!r} has no block format to "
                "take the size from; give a number"
            )
        size = blocks[0]
        if not hadamard_order_supported(size):
            raise error(
                f"quant.rotation.size 'block' is {size} for module {module!r}, which has no "
                f"Hadamard matrix here; give a number ({SUPPORTED_ORDERS_TEXT})"
            )
    if dim_len % size:
        raise error(
            f"quant.rotation.size {size} does not divide the {what} ({dim_len}) of "
            f"module {module!r}; choose a size that divides it, or override "
            "the rotation for that module (quant.overrides)"
        )
    return size
