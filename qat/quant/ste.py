"""The straight-through estimator: quantise in the forward pass, identity in the backward."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from qat.formats import Format
from qat.quant.backends import resolve_backend, run_backend


class SharedInput:
    """A one-entry cache shared by sibling quantisers that may be handed the same tensor.

    q, k and v projections (and gate / up) read one hidden state; with equal input formats the
    first quantises it and the others reuse the result. The entry is keyed on the tensor's
    identity and version (an in-place change invalidates it) and on the grad mode; it holds the
    input only weakly and drops the result when the input dies, so it keeps nothing alive that
    the forward pass itself would not. Under ``torch.compile`` it steps aside (the compiler
    deduplicates the identical ops itself), and so it does for inference tensors.
    """

    __slots__ = ("_key", "_out", "__weakref__")

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._out: Tensor | None = None

    def get(self, x: Tensor) -> Tensor | None:
        key = self._key
        # an inference tensor is never put (below), so it never matches key[0]
        if (
            key is None
            or key[0]() is not x
            or key[1] != x._version
            or key[2] != torch.is_grad_enabled()
        ):
            return None
        return self._out

    def put(self, x: Tensor, out: Tensor) -> None:
        if x.is_inference():
            # Inference tensors (torch.inference_mode) track no version, so an in-place change
            # could not be seen: such inputs are quantised by each sibling, never cached.
            return
        this = weakref.ref(self)

        def drop(_ref: weakref.ref) -> None:
            cache = this()
            if cache is not None and cache._key is not None and cache._key[0] is _ref:
                cache._key = cache._out = None

        self._key = (weakref.ref(x, drop), x._version, torch.is_grad_enabled())
        self._out = out


class PreTransform:
    """What a quantiser applies to its input before quantising: ``transform(x, dim)`` (a
    ``qat.quant.rotation.Rotation``), held by reference.

    The transform has one owner, the layer (or ``MatmulQuantizer``) that registers it as its
    submodule: it is moved by ``.to()``, listed by ``print(model)`` and saved once. This holder
    is a plain object, not an ``nn.Module``, so the quantiser that holds it registers nothing.
    """

    def __init__(self, transform: nn.Module) -> None:
        self.transform = transform

    def __call__(self, x: Tensor, dim: int) -> Tensor:
        return self.transform(x, dim)


class FakeQuantizer(nn.Module):
    """A format bound to a blocking dim and a backend, as a module so it shows up in
    ``print(model)``.

    Holds no parameters: every call re-quantises what it is given, so training always sees
    the current weights. ``shared`` (set by ``quantize_model``) lets sibling input quantisers
    with the same format quantise a common input once.

    ``rotation`` (a ``qat.quant.rotation.Rotation`` owned by the layer) rotates the input along
    ``dim`` before it is quantised, inside the shared cache: the quantiser holds it as its
    ``pre`` transform (``PreTransform``), a reference, so the rotation stays the layer's
    submodule alone. ``quantizer.rotation = r`` (or None) sets that reference.
    ``enabled = False`` turns quantisation off but keeps the rotation: the layer rotates both
    operands, so its float product is unchanged either way.
    """

    def __init__(
        self, fmt: Format, dim: int = -1, backend: str = "auto", rotation: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.fmt = fmt
        self.dim = dim
        self.backend = backend
        self.enabled = True
        self.shared: SharedInput | None = None
        self.pre = None if rotation is None else PreTransform(rotation)
        self._impl: dict[str, str] = {}  # device type -> resolved backend

    @property
    def rotation(self) -> nn.Module | None:
        """The rotation applied before quantising (its owner's module), or None."""
        return None if self.pre is None else self.pre.transform

    def __setattr__(self, name: str, value: Any) -> None:
        # The rotation is stored as a PreTransform: nn.Module would register a module value as
        # a submodule, a second owner of the layer's rotation.
        if name == "rotation":
            name, value = "pre", None if value is None else PreTransform(value)
        super().__setattr__(name, value)

    def _backend_for(self, x: Tensor) -> str:
        impl = self._impl.get(x.device.type)
        if impl is None:
            impl = self._impl[x.device.type] = resolve_backend(self.backend, self.fmt, x.device)
        return impl

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return self._rotated(x)
        shared = None if torch.compiler.is_compiling() else self.shared
        if shared is not None:
            hit = shared.get(x)
            if hit is not None:
                return hit
        rx = self._rotated(x)
        out = run_backend(self._backend_for(rx), rx, self.fmt, self.dim)
        if shared is not None:
            shared.put(x, out)
        return out

    def error_pair(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(target, quantised)`` for measuring this quantiser's error on ``x`` (no STE, no
        cache): ``x`` rotated as the layer rotates it, and its quantised value. A rotation is
        orthonormal, so the error (SQNR) is that of the layer's own product."""
        rx = self._rotated(x)
        return rx, self.fmt.quantize(rx, self.dim)

    def _rotated(self, x: Tensor) -> Tensor:
        return x if self.pre is None else self.pre(x, self.dim)

    def extra_repr(self) -> str:
        rot = "" if self.rotation is None else f", rotation={self.rotation.extra_repr()}"
        return f"{self.fmt}, dim={self.dim}, backend={self.backend}{rot}"
