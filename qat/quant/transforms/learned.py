"""Learned rotations and smoothing scales for QAT (``quant.rotation.learned``), baked into the
weights afterwards.

On top of a fused rotation (``qat.quant.transforms.fuse``), training may learn

- ``rotation``: an orthogonal ``Q1`` of the residual stream and, per layer, ``Q2`` of the V/O
  head space (shared by the heads). Each is the Cayley transform of a skew-symmetric matrix,
  ``Q = (I - A)^{-1} (I + A)`` with ``A = M - M^T``: orthogonal for every ``M`` (to float
  rounding of one solve), the identity at ``M = 0``, so training starts from the fused model;
- ``smooth``: per layer, positive per-channel scales ``s = exp(t)`` between each norm and the
  linears reading it (the norm's output divided by ``s``, the readers' input columns times
  ``s``), as SmoothQuant / OmniQuant move range between activations and weights.

The stored weights stay those of the fused model; every forward computes each affected
linear's effective weight (``W Q1 diag(s)`` for a reader, ``Q1^T W`` for a writer, ``Q2`` on
V's rows and the output projection's columns) before its quantiser, and the embedding's and
norms' outputs are mapped by hooks, so the float function never changes and the quantised
one learns. ``bake`` writes the effective weights into the model (norm weights ``1 / s``) and
removes the hooks: an ordinary model, equal in float to the trained one, that exports like any
fused model. The parameters live in ``model.qat_learned`` (state-dict keys ``qat_learned.*``,
saved with every checkpoint; ``load_learned`` reads them back).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qat.errors import QatError
from qat.quant.transforms.layout import Layout

ATTR = "qat_learned"  # the model attribute (and state-dict prefix) of the learned parameters


class CayleyRotation(nn.Module):
    """An ``n x n`` orthogonal matrix ``(I - A)^{-1} (I + A)``, ``A = M - M^T``, ``M`` trained
    (zeros: the identity).

    >>> r = CayleyRotation(4)
    >>> with torch.no_grad():
    ...     _ = r.weight.normal_()
    >>> q = r.matrix()
    >>> bool(torch.allclose(q @ q.T, torch.eye(4), atol=1e-5))
    True"""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n, n))

    def matrix(self) -> Tensor:
        a = self.weight - self.weight.T
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        return torch.linalg.solve(eye - a, eye + a)


class LearnedTransforms(nn.Module):
    """The learned parameters of one model and the maps that apply them (see the module
    docstring); attached by ``attach_learned``."""

    def __init__(self, layout: Layout, rotation: bool, smooth: bool) -> None:
        super().__init__()
        n_layers = len(layout.blocks)
        self.r1 = CayleyRotation(layout.hidden) if rotation else None
        self.r2 = (
            nn.ModuleList(CayleyRotation(layout.head_dim) for _ in range(n_layers))
            if rotation
            else None
        )
        self.smooth = (
            nn.Parameter(torch.zeros(n_layers, 2, layout.hidden)) if smooth else None
        )  # log-scales: [layer, (attention, mlp), channel]
        self.head_dim = layout.head_dim
        self._cache = _Cache()

    def clear(self) -> None:
        """Forget this forward's matrices (a hook on the model calls it before each forward,
        so each Cayley solve runs once per forward and its graph is shared by every user)."""
        self._cache.clear()

    def matrix(self, kind: str, i: int = 0) -> Tensor:
        key = (kind, i)
        if key not in self._cache:
            self._cache[key] = (self.r1 if kind == "r1" else self.r2[i]).matrix()
        return self._cache[key]

    def right(self, w: Tensor, maps: tuple[tuple[str, int], ...]) -> Tensor:
        """``w M`` for the maps in order: ``("r1", _)``, ``("r2", layer)`` (per head along the
        last dim), ``("smooth", layer * 2 + group)`` (times ``s``)."""
        for kind, i in maps:
            if kind == "r1" and self.r1 is not None:
                w = w @ self.matrix("r1").to(w.dtype)
            elif kind == "r2" and self.r2 is not None:
                q = self.matrix("r2", i).to(w.dtype)
                w = (w.unflatten(-1, (-1, self.head_dim)) @ q).flatten(-2)
            elif kind == "smooth" and self.smooth is not None:
                w = w * self.smooth[i // 2, i % 2].exp().to(w.dtype)
        return w

    def scale(self, i: int) -> Tensor | None:
        return None if self.smooth is None else self.smooth[i // 2, i % 2].exp()


class _Cache(dict):
    """This forward's matrices (graph tensors): a copy of the model starts without them."""

    def __deepcopy__(self, memo: dict) -> _Cache:
        return _Cache()


class LinearTransform:
    """A linear's effective weight and bias: ``Out^T W In`` and ``b Out`` (hidden attribute of
    the linear, not a submodule: the parameters are registered once, under ``qat_learned``)."""

    def __init__(self, owner: LearnedTransforms, inp: tuple, out: tuple) -> None:
        self.owner, self.inp, self.out = owner, inp, out

    def weight(self, w: Tensor) -> Tensor:
        w = self.owner.right(w, self.inp)
        return self.owner.right(w.T, self.out).T if self.out else w

    def bias(self, b: Tensor | None) -> Tensor | None:
        return b if b is None or not self.out else self.owner.right(b, self.out)


def _plan(layout: Layout) -> list[tuple[nn.Module, tuple, tuple]]:
    """(linear, input maps, output maps) of every linear that reads or writes the stream."""
    plan = []
    for i, b in enumerate(layout.blocks):
        for lin in b.attn_readers:
            out = (("r2", i),) if lin is b.v_proj else ()
            plan.append((lin, (("r1", 0), ("smooth", 2 * i)), out))
        for lin in b.mlp_readers:
            plan.append((lin, (("r1", 0), ("smooth", 2 * i + 1)), ()))
        plan.append((b.o_proj, (("r2", i),), (("r1", 0),)))
        plan.append((b.mlp_writer, (), (("r1", 0),)))
    plan += [(lin, (("r1", 0),), ()) for lin in layout.final_readers]
    return plan


def attach_learned(model: nn.Module, layout: Layout, spec: Mapping[str, Any]) -> None:
    """Give ``model`` (fused, norms folded, quantised) trainable transforms: the identity
    until trained."""
    owner = LearnedTransforms(layout, spec["rotation"], spec["smooth"])
    owner.to(next(model.parameters()).device)
    setattr(model, ATTR, owner)
    model.register_forward_pre_hook(_ClearHook(owner))
    for lin, inp, out in _plan(layout):
        transform = LinearTransform(owner, inp, out)
        if hasattr(lin, "weight_transform"):  # QuantLinear: before its quantiser
            lin.weight_transform = transform
        else:  # a float linear: map its input back and its output on
            lin.register_forward_pre_hook(_PreHook(transform))
            lin.register_forward_hook(_PostHook(transform))
    if owner.r1 is not None:
        for emb in layout.embeddings:
            emb.register_forward_hook(_RightHook(owner, (("r1", 0),)))
    if owner.smooth is not None:
        for i, b in enumerate(layout.blocks):
            b.attn_norm.register_forward_hook(_ScaleHook(owner, 2 * i))
            b.mlp_norm.register_forward_hook(_ScaleHook(owner, 2 * i + 1))


class _ClearHook:
    def __init__(self, owner: LearnedTransforms) -> None:
        self.owner = owner

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.owner.clear()


class _RightHook:
    def __init__(self, owner: LearnedTransforms, maps: tuple) -> None:
        self.owner, self.maps = owner, maps

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return self.owner.right(output, self.maps)


class _ScaleHook:
    def __init__(self, owner: LearnedTransforms, i: int) -> None:
        self.owner, self.i = owner, i

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return output / self.owner.scale(self.i).to(output.dtype)


class _PreHook:
    """A float reader's input ``x In^{-1}``: ``In`` is orthogonal times a diagonal."""

    def __init__(self, transform: LinearTransform) -> None:
        self.t = transform

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        maps = self.t.inp
        owner = self.t.owner
        for kind, i in reversed(maps):  # undo right-multiplications in reverse order
            if kind == "smooth" and owner.smooth is not None:
                x = x * owner.scale(i).to(x.dtype)
            elif kind == "r1" and owner.r1 is not None:
                x = x @ owner.matrix("r1").to(x.dtype).T
            elif kind == "r2" and owner.r2 is not None:
                q = owner.matrix("r2", i).to(x.dtype)
                x = (x.unflatten(-1, (-1, owner.head_dim)) @ q.T).flatten(-2)
        return (x, *args[1:])


class _PostHook:
    def __init__(self, transform: LinearTransform) -> None:
        self.t = transform

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return self.t.owner.right(output, self.t.out) if self.t.out else output


def has_learned(model: nn.Module) -> bool:
    return isinstance(getattr(model, ATTR, None), LearnedTransforms)


def learned_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned transforms' parameters (their own optimiser group), [] when none."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    owner = getattr(base, ATTR, None)
    return list(owner.parameters()) if isinstance(owner, LearnedTransforms) else []


def bake(model: nn.Module, layout: Layout) -> None:
    """Write the learned transforms into the weights and remove them: the model then computes
    the same float function with no hooks and no ``qat_learned`` parameters."""
    owner = getattr(model, ATTR)
    owner.clear()
    with torch.no_grad():
        for lin, inp, out in _plan(layout):
            t = LinearTransform(owner, inp, out)
            w = t.weight(lin.weight.double()).to(lin.weight.dtype)
            lin.weight.data.copy_(w)
            if lin.bias is not None:
                lin.bias.data.copy_(t.bias(lin.bias.double()).to(lin.bias.dtype))
            if hasattr(lin, "weight_transform"):
                lin.weight_transform = None
            _drop_hooks(lin)
        for emb in layout.embeddings:
            emb.weight.data.copy_(
                owner.right(emb.weight.double(), (("r1", 0),)).to(emb.weight.dtype)
            )
            _drop_hooks(emb)
        for i, b in enumerate(layout.blocks):
            for g, norm in enumerate((b.attn_norm, b.mlp_norm)):
                s = owner.scale(2 * i + g)
                if s is not None:
                    norm.weight.data.copy_(
                        (norm.weight.double() / s.double()).to(norm.weight.dtype)
                    )
                _drop_hooks(norm)
    _drop_hooks(model)
    delattr(model, ATTR)


HOOKS = (_ClearHook, _RightHook, _ScaleHook, _PreHook, _PostHook)


def _drop_hooks(module: nn.Module) -> None:
    for hooks in (module._forward_hooks, module._forward_pre_hooks):
        for key in [k for k, h in hooks.items() if isinstance(h, HOOKS)]:
            del hooks[key]


def load_learned(model: nn.Module, folder: str | os.PathLike) -> None:
    """Read the ``qat_learned.*`` tensors of a checkpoint folder (safetensors, sharded or not)
    into ``model``'s learned transforms (``from_pretrained`` drops keys its class lacks)."""
    from safetensors import safe_open

    owner = getattr(model, ATTR)
    want = {f"{ATTR}.{k}": v for k, v in owner.state_dict().items()}
    found: dict[str, Tensor] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key in want:
                    found[key] = f.get_tensor(key)
    missing = sorted(set(want) - set(found))
    if missing:
        raise QatError(
            f"{os.fspath(folder)}: the quant config learns transforms, but the checkpoint holds "
            f"no {missing[0]}; it was not written by a run with quant.rotation.learned"
        )
    owner.load_state_dict({k[len(ATTR) + 1 :]: v for k, v in found.items()})
