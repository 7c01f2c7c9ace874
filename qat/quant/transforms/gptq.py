"""GPTQ-style rounding of quantised weights (``quant.gptq``): error feedback along the input
dim, weighted by a Hessian of calibration inputs.

Round-to-nearest rounds each weight on its own. GPTQ (Frantar et al., 2022) rounds the input
columns of a layer one at a time and moves each column's rounding error onto the columns not
yet rounded, in the proportions that minimise the layer's output error on the calibration
inputs ``X``: with ``H = X^T X`` (plus a small damping) and ``U`` the upper Cholesky factor of
``H^-1``, column ``j``'s error ``e = (w_j - q_j) / U[j, j]`` updates ``W[:, j+1:] -= e
U[j, j+1:]``. Block formats fix each block's scale first, from the block's columns as they
stand when the loop reaches the block (``Format.block_scales``), then round its elements on
that grid one column at a time (``Format.round_with_scales``). Columns are processed in
batches (a multiple of the format block) whose updates to later columns are applied at once.

A layer's weight is rounded in the basis its quantiser sees (after a learned transform, which
is the identity before training, and an online rotation), against the Hessian of its inputs as
the quantiser sees them (rotated, activation-quantised). The result is re-quantised until it
is a fixed point of the format (a block whose largest element rounded down can get a smaller
scale), so the stored weights lie on the format's grid and the fake quantiser reproduces them.
GPTQ is greedy and can lose to round-to-nearest (inputs with little correlation between
columns, a block whose scale grows under the error moved onto it): a row where it does keeps
its float weights, which the quantiser rounds to nearest, so no layer's output error on the
calibration inputs is larger than round-to-nearest's.

``gptq_weight`` is the maths (tensors in, tensor out); ``apply_gptq`` collects the Hessians
of every quantised linear over calibration batches in one pass and rounds each layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from qat.errors import QatError, did_you_mean
from qat.formats import Format
from qat.formats.base import to_blocks
from qat.quant.modules import QuantLinear

GPTQ_KEYS = ("samples", "damp", "batch")
SUPPORTED_TEXT = (
    "bfp, the mx formats, int (channel or group), ggml_q4_0, ggml_q8_0 and the codebook formats "
    "without outliers"
)


class GPTQError(QatError):
    """``quant.gptq`` asked of a model, format or source it cannot work with."""


def check_gptq_spec(spec: Any, where: str, error: type[Exception] = QatError) -> dict | None:
    """The normalised ``{samples, damp, batch}`` of ``quant.gptq`` (None: off).

    >>> check_gptq_spec({"samples": 64}, "quant.gptq")
    {'samples': 64, 'damp': 0.01, 'batch': 128}"""
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise error(f"{where} must be a mapping like {{samples: 128}} or null, got {spec!r}")
    for key in spec:
        if key not in GPTQ_KEYS:
            raise error(
                f"unknown key {where}.{key}{did_you_mean(key, GPTQ_KEYS, where)}; "
                f"valid keys: {', '.join(GPTQ_KEYS)}"
            )
    out = {"samples": spec.get("samples", 128), "damp": spec.get("damp", 0.01)}
    out["batch"] = spec.get("batch", 128)
    for key in ("samples", "batch"):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise error(f"{where}.{key} must be an integer >= 1, got {v!r}")
    damp = out["damp"]
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:
        raise error(f"{where}.damp must be a number in (0, 1), got {damp!r}")
    out["damp"] = float(damp)
    return out


def check_gptq_format(fmt: Format | None, where: str, error: type[Exception] = QatError) -> None:
    """A weight format GPTQ can round (a fixed block scale, then one element at a time)."""
    if fmt is not None and fmt.scale_block is None:
        raise error(
            f"quant.gptq: {where} format {fmt.name} cannot round one element at a time on a "
            f"fixed block scale (its scale depends on every element of the tensor or block "
            f"as rounded); GPTQ rounds {SUPPORTED_TEXT}"
        )


def _rows(fmt: Format, w: Tensor, j: int, block: int) -> Tensor:
    """The scales of columns ``j : j + block`` of ``w`` (zero-padded like a ragged block)."""
    xb, _ = to_blocks(w[:, j : j + block], block)
    return fmt.block_scales(xb)  # [rows, 1]


def gptq_weight(w: Tensor, hessian: Tensor, fmt: Format, damp: float = 0.01, batch: int = 128):
    """``w`` ``[out, in]`` rounded onto ``fmt``'s grid (blocks along ``in``) by GPTQ against
    ``hessian`` ``[in, in]`` (``X^T X`` of the layer's inputs): the float32 weight to store.
    Its rows are GPTQ's, on the grid (re-quantising gives them back), except a row whose GPTQ
    rounding has a larger output error on those inputs than round-to-nearest's: that row keeps
    ``w``'s values, which the quantiser rounds to nearest. So ``fmt.quantize`` of the result
    never has a larger output error than ``fmt.quantize(w)``.

    >>> from qat.formats import make_format
    >>> fmt = make_format({"format": "bfp", "width": 4, "block_size": 16})
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(256, 32, generator=g) @ torch.randn(32, 32, generator=g)  # correlated
    >>> w = torch.randn(8, 32, generator=g)
    >>> q = fmt.quantize(gptq_weight(w, x.T @ x, fmt))
    >>> gptq, rtn = (((x @ (v - w).T) ** 2).sum().item() for v in (q, fmt.quantize(w)))
    >>> round(gptq / rtn, 2)
    0.58"""
    q = fixed_point(fmt, _gptq(w, hessian, fmt, damp, batch))
    return _no_worse_rows(w.detach().float(), q, fmt, hessian)


def _no_worse_rows(w: Tensor, q: Tensor, fmt: Format, hessian: Tensor) -> Tensor:
    """Per row, ``q`` where its output error ``(q - w) H (q - w)^T`` is at most
    round-to-nearest's, else ``w``. GPTQ is greedy: on inputs with little correlation between
    columns, or a block whose scale grows under the error moved onto it, it can lose. A row's
    output error is its own (the columns of ``X W^T`` are independent) and every block lies in
    one row, so the mixed weight's error is at most either's."""
    h = hessian.double()

    def err(v: Tensor) -> Tensor:
        d = (v - w).double()
        return ((d @ h) * d).sum(1)

    keep = err(q) <= err(fmt.quantize(w))
    return torch.where(keep.unsqueeze(1), q, w)


def _gptq(w: Tensor, hessian: Tensor, fmt: Format, damp: float, batch: int) -> Tensor:
    block = fmt.scale_block
    if block is None:
        raise GPTQError(f"format {fmt.name} cannot be rounded by GPTQ")
    rows, cols = w.shape
    block = min(block, cols)
    w = w.detach().double().clone()
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    w, u = w.float(), u.float()  # the factorisation in float64, the column loop in float32
    step = max(block, batch // block * block)
    q = torch.zeros_like(w)
    scales = None
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        w1 = w[:, i1:i2].clone()
        err = torch.zeros_like(w1)
        for i in range(i2 - i1):
            j = i1 + i
            if j % block == 0:  # the block's scale, from its columns as they stand now
                scales = _rows(fmt, w1, i, block)
            col = w1[:, i : i + 1].unsqueeze(-1)  # [rows, 1 block, 1 element]
            qj = fmt.round_with_scales(col, scales).reshape(rows)
            q[:, j] = qj
            e = (w1[:, i] - qj) / u[j, j]
            w1[:, i:] -= e.unsqueeze(1) * u[j, i1 + i : i2].unsqueeze(0)
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return q


def fixed_point(fmt: Format, q: Tensor, tries: int = 8) -> Tensor:
    """Re-quantise ``q`` until it stops changing (each change only shrinks a block's scale)."""
    for _ in range(tries):
        again = fmt.quantize(q)
        if torch.equal(again, q):
            return q
        q = again
    raise GPTQError(f"format {fmt.name}: re-quantising GPTQ's weights did not settle")


# --- on a model: Hessians from calibration batches, then every quantised linear --------------


def gptq_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The quantised linears whose weights GPTQ rounds (a weight quantiser, enabled)."""

    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear)
        and m.weight_quantizer is not None
        and getattr(m.weight_quantizer, "enabled", True)
    ]


def collect_hessians(
    model: nn.Module, batches: Iterable[Mapping[str, Tensor]]
) -> dict[str, Tensor]:
    """``X^T X / rows`` of every GPTQ layer's input as its quantiser sees it (rotated,
    activation-quantised), over ``batches`` (float32, on the layer's device). Layers fed the
    same input the same way (q/k/v, gate/up) share one matrix, computed once."""
    return {n: h for names, h in _group_hessians(model, batches) for n in names}


def _input_key(name: str, module: nn.Module, x: Tensor) -> tuple:
    """Siblings (one parent) handed one tensor and quantising it alike see the same input."""
    aq = module.activation_quantizer
    rot = None if module.rotation is None else module.rotation.size
    parent = name.rpartition(".")[0]
    quant = None if aq is None else (aq.fmt, aq.enabled)
    return (parent, x.data_ptr(), tuple(x.shape), quant, rot)


def _group_hessians(
    model: nn.Module, batches: Iterable[Mapping[str, Tensor]]
) -> list[tuple[list[str], Tensor]]:
    """``(layer names, X^T X / rows)`` per group of layers that see one input."""
    layers = gptq_layers(model)
    groups: dict[str, str] = {}  # layer -> the first layer of its group
    sums: dict[str, Tensor] = {}
    count: dict[str, int] = {}
    # the first forward's inputs, held so that no address is reused while they are compared
    seen: dict[tuple, tuple[str, Tensor]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            if name not in groups:
                key = _input_key(name, module, args[0])
                groups[name] = seen.setdefault(key, (name, args[0]))[0]
            if groups[name] != name:
                return  # its group's first layer counts this input
            x = module.quantized_input(args[0]).detach()
            x = x.reshape(-1, x.shape[-1]).float()
            sums[name] = x.T @ x if name not in sums else sums[name] + x.T @ x
            count[name] = count.get(name, 0) + x.shape[0]

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                seen.clear()
                model(**batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    members: dict[str, list[str]] = {}
    for name, first in groups.items():
        members.setdefault(first, []).append(name)
    return [(names, sums[first] / count[first]) for first, names in members.items()]


def apply_gptq(
    model: nn.Module, batches: Iterable[Mapping[str, Tensor]], spec: Mapping[str, Any]
) -> int:
    """Round every quantised linear's weight of ``model`` in place by GPTQ on ``batches``;
    returns how many layers it rounded. Layers sharing an input and a weight format are
    rounded together (their rows stacked: one Cholesky, one pass over the columns)."""
    modules = dict(gptq_layers(model))
    done = 0
    with torch.no_grad():
        for names, hessian in _group_hessians(model, batches):
            parts: dict[tuple, list[str]] = {}
            for n in names:
                wq = modules[n].weight_quantizer
                rot = None if wq.rotation is None else wq.rotation.size
                parts.setdefault((wq.fmt, rot), []).append(n)
            for (fmt, _), part in parts.items():
                ws = [_quantiser_view(modules[n]) for n in part]
                q = gptq_weight(torch.cat(ws), hessian, fmt, spec["damp"], spec["batch"])
                for n, qn in zip(part, q.split([w.shape[0] for w in ws])):
                    _store(modules[n], qn)
                    done += 1
    return done


def _quantiser_view(m: nn.Module) -> Tensor:
    """The weight as the quantiser sees it: after a learned transform and an online rotation."""
    w = m.weight
    if m.weight_transform is not None:
        w = m.weight_transform.weight(w)
    rot = m.weight_quantizer.rotation
    return w if rot is None else rot(w, -1)


def _store(m: nn.Module, q: Tensor) -> None:
    rot = m.weight_quantizer.rotation
    if rot is not None:  # stored unrotated: the quantiser rotates it back
        q = _unrotate(rot, q)
    if m.weight_transform is not None:
        q = _untransform(m, q)
    m.weight.copy_(q.to(m.weight.dtype))


def _unrotate(rot: nn.Module, q: Tensor) -> Tensor:
    """``q`` with the block rotation undone along the last dim (``H`` is orthogonal)."""
    h = rot.matrix.to(torch.float64)
    n = q.shape[-1]
    blocks = q.double().reshape(*q.shape[:-1], n // rot.size, rot.size)
    return (blocks @ h.T).reshape(q.shape).float()


def _untransform(m: nn.Module, q: Tensor) -> Tensor:
    """Learned transforms are the identity until trained: GPTQ runs before training."""
    probe = torch.eye(q.shape[1], dtype=q.dtype, device=q.device)
    if not torch.equal(m.weight_transform.weight(probe), probe):
        raise GPTQError("quant.gptq rounds weights before training, not under trained transforms")
    return q
