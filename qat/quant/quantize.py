"""``quantize_model``: swap linears for quantised ones and quantise attention matmuls."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from qat.errors import UsageError
from qat.quant.attention import interface as attention_impl
from qat.quant.config import QuantConfig, QuantConfigError
from qat.quant.modules import MatmulQuantizer, QuantConv1D, QuantLinear
from qat.quant.rotation import Rotation, resolve_size
from qat.quant.ste import FakeQuantizer, SharedInput
from qat.quant.transforms.fuse import fuse_rotation
from qat.quant.transforms.layout import model_layout
from qat.quant.transforms.learned import attach_learned

CONFIG_ATTR = "qat_quant"  # config.json key of the quant config (the recipe's `quant` section)


def attention_classes(model: nn.Module) -> tuple[set[type], set[str]]:
    """The attention module classes ``model`` declares, as classes and as class names.

    Read from transformers' own registry of them, ``_can_record_outputs`` (the modules whose
    outputs ``output_attentions`` records: its ``attentions`` / ``cross_attentions`` entries, a
    class, a class name, an ``OutputRecorder`` or a list of these), on every PreTrainedModel
    in ``model`` (the task head and its base model). Whether those modules really call the
    attention interface is transformers' check, in ``set_attn_implementation``.
    """
    classes: set[type] = set()
    names: set[str] = set()
    for m in model.modules():
        for key, entry in (getattr(type(m), "_can_record_outputs", None) or {}).items():
            if not key.endswith("attentions"):
                continue
            for item in entry if isinstance(entry, (list, tuple)) else [entry]:
                target = getattr(item, "target_class", None) or getattr(item, "class_name", None)
                item = target or item
                if isinstance(item, type):
                    classes.add(item)
                elif isinstance(item, str):
                    names.add(item)
    return classes, names


def attention_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every attention module of ``model`` (see ``attention_classes``)."""
    classes, names = attention_classes(model)
    for name, m in model.named_modules():
        if name and (isinstance(m, tuple(classes)) or type(m).__name__ in names):
            yield name, m


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, QuantConv1D, MatmulQuantizer)) for m in model.modules())


def quantize_model(model: nn.Module, config: QuantConfig | Mapping[str, Any] | None) -> nn.Module:
    """Insert STE fake-quantisers into ``model`` in place, as ``config`` says; returns it.

    >>> import torch, transformers, qat
    >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                                   num_hidden_layers=1, num_attention_heads=2)
    >>> model = transformers.LlamaForCausalLM(config)
    >>> w4 = {"format": "bfp", "width": 4, "block_size": 16}
    >>> model = qat.quantize_model(model, {"weight": w4, "activation": w4, "matmul": w4})
    >>> qat.quantization_summary(model)  # q, k, v, o, gate, up, down (heads stay float)
    {'quantized_linears': 7, 'quantized_attention': 1}
    >>> model(torch.tensor([[1, 2, 3]])).logits.shape
    torch.Size([1, 3, 64])

    Linear layers (and GPT-2's Conv1D) get weight and input quantisers; attention modules get
    a ``MatmulQuantizer`` and the model switches to the ``"qat"`` attention implementation.
    Excluded modules (``config.exclude``) and everything that is not a linear or an attention
    matmul (embeddings, norms, softmax, residuals) stay float.
    """
    config = QuantConfig.from_dict(config) if not isinstance(config, QuantConfig) else config
    if config is None:
        return model
    if is_quantized(model):
        raise UsageError("model is already quantised; quantize_model must run once")
    online = _fuse(model, config.fused_rotation)
    names = [name for name, _ in model.named_modules() if name]
    replacements, used_overrides, uses_matmul = _quantise_modules(model, config, online)
    _check_matmul_has_attention(model, config, names)
    _check_overrides_used(config, used_overrides, names)
    _swap_modules(model, replacements)
    share_sibling_inputs(replacements)
    _attach_learned(model, config.fused_rotation)
    if uses_matmul:
        _use_qat_attention(model)
    if hasattr(model, "config"):
        setattr(model.config, CONFIG_ATTR, config.to_dict())
    model.qat_quant = config  # the QuantConfig itself (config.json holds its dict)
    return model


def _quantise_modules(
    model: nn.Module, config: QuantConfig, online: dict[str, dict[str, Any]]
) -> tuple[list[tuple[str, nn.Module]], set[str], bool]:
    """One pass over ``model``'s modules in order, so that the first bad module is the one
    reported: the quantised replacement of each linear (swapped in later), the override
    patterns that reached a linear or attention module, and whether any attention module got
    a matmul quantiser (attached here)."""
    attention = dict(attention_modules(model))
    replacements: list[tuple[str, nn.Module]] = []
    used: set[str] = set()
    uses_matmul = False
    for name, module in list(model.named_modules()):  # a list: qat_matmul is added on the way
        if not name or config.is_excluded(name):
            continue
        if isinstance(module, (nn.Linear, Conv1D)):
            _note_override(config, name, used)
            new = _quantised_linear(name, module, config, online.get(name))
            replacements += [] if new is None else [(name, new)]
        elif name in attention:
            _note_override(config, name, used)
            uses_matmul |= _attach_matmul(name, module, model, config, online.get(name))
    return replacements, used, uses_matmul


def _note_override(config: QuantConfig, name: str, used: set[str]) -> None:
    """Record which override pattern (if any) reaches the quantisable module ``name``."""
    pat = config.override_for(name)
    if pat is not None:
        used.add(pat)


def _quantised_linear(
    name: str, module: nn.Module, config: QuantConfig, online: dict[str, Any] | None
) -> nn.Module | None:
    """``module`` (an ``nn.Linear`` or GPT-2's ``Conv1D``) as a quantised layer with the
    weight and input formats ``config`` gives ``name``, rotated where ``config`` (or the fused
    rotation's ``online`` part) says; None where both operands stay float."""
    formats = config.formats_for(name)
    wf, af = formats.weight, formats.activation
    if wf is None and af is None:
        return None
    conv = isinstance(module, Conv1D)
    wdim = 0 if conv else -1
    wq = FakeQuantizer(wf, dim=wdim, backend=config.backend) if wf is not None else None
    aq = FakeQuantizer(af, dim=-1, backend=config.backend) if af is not None else None
    new = (
        QuantConv1D.from_conv1d(module, wq, aq) if conv else QuantLinear.from_linear(module, wq, aq)
    )
    spec = config.rotation_for(name) or online
    if spec is not None:
        features = module.weight.shape[wdim]
        size = resolve_size(spec, [wf, af], features, name, "input features", QuantConfigError)
        new.set_rotation(Rotation(size).to(module.weight.device))
    return new


def _attach_matmul(
    name: str,
    module: nn.Module,
    model: nn.Module,
    config: QuantConfig,
    online: dict[str, Any] | None,
) -> bool:
    """Give the attention module ``name`` a ``MatmulQuantizer`` (``module.qat_matmul``) where
    ``config`` quantises its matmuls, with Q and K rotated where it says; whether it did."""
    fmt = config.formats_for(name).matmul
    if fmt is None:
        return False
    spec = config.rotation_for(name) or online
    rotation = None
    if spec is not None:
        head_dim = _head_dim(module, model)
        size = resolve_size(spec, [fmt], head_dim, name, "head_dim of Q and K", QuantConfigError)
        rotation = Rotation(size).to(_device_of(module))
    module.qat_matmul = MatmulQuantizer(fmt, config.v_block_axis, config.backend, rotation)
    return True


def _check_matmul_has_attention(model: nn.Module, config: QuantConfig, names: list[str]) -> None:
    """A matmul format on a model without attention modules is a recipe error, not a no-op."""
    if not any(config.formats_for(n).matmul is not None for n in names):
        return
    if next(attention_modules(model), None) is None:
        raise QuantConfigError(
            f"quant.matmul is set but {type(model).__name__} declares no "
            "attention modules (transformers' _can_record_outputs); set "
            "quant.matmul: null"
        )


def _check_overrides_used(config: QuantConfig, used: set[str], names: list[str]) -> None:
    """Every override pattern reaches a linear or attention module (a typo matches nothing)."""
    unused = [p for p in config.overrides if p not in used]
    if unused:
        sample = ", ".join(names[:8])
        raise QuantConfigError(
            f"quant.overrides pattern {unused[0]!r} matches no linear or attention module; "
            f"module names look like: {sample}, ..."
        )


def _swap_modules(model: nn.Module, replacements: list[tuple[str, nn.Module]]) -> None:
    """Put each ``(name, new)`` in place of the module called ``name``."""
    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)


def _use_qat_attention(model: nn.Module) -> None:
    """Switch ``model`` to the ``"qat"`` attention implementation (what runs the matmul
    quantisers), refusing models whose attention would bypass it."""
    if not hasattr(model, "set_attn_implementation"):
        raise QuantConfigError(
            "quant.matmul needs a transformers PreTrainedModel; "
            "set quant.matmul: null for other models"
        )
    impl = attention_impl.ATTN_IMPLEMENTATION
    try:
        model.set_attn_implementation(impl)
    except ValueError as e:
        raise QuantConfigError(
            f"quant.matmul: {type(model).__name__} cannot run the qat "
            f"attention ({str(e).splitlines()[0]}); set quant.matmul: "
            "null"
        ) from None
    # transformers only warns when a model's attention bypasses its interface.
    if getattr(model.config, "_attn_implementation", None) != impl:
        raise QuantConfigError(
            f"quant.matmul: {type(model).__name__}'s attention does not "
            "go through transformers' attention interface; set "
            "quant.matmul: null"
        )


def _fuse(model: nn.Module, spec: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Fuse ``spec``'s rotations into ``model`` (``qat.quant.transforms.fuse``); returns the online
    block rotation of each module that keeps one (the MLP's down projection, the attention's Q and
    K: where a rotation cannot be fused)."""
    if spec is None:
        return {}

    layout = fuse_rotation(model, spec)
    if spec["online"] is None:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    targets = [m for b in layout.blocks for m in (b.mlp_writer, b.attention)]
    return {names[id(m)]: spec["online"] for m in targets}


def _attach_learned(model: nn.Module, spec: dict[str, Any] | None) -> None:
    """Trainable transforms on the quantised, fused model (``qat.quant.transforms.learned``)."""
    if spec is None or spec["learned"] is None or next(model.parameters()).is_meta:
        return

    attach_learned(model, model_layout(model), spec["learned"])


def _head_dim(attention: nn.Module, model: nn.Module) -> int:
    """Q's and K's last dim in ``attention`` (the attribute names transformers' models use)."""
    for attr in ("head_dim", "attention_head_size"):
        d = getattr(attention, attr, None)
        if isinstance(d, int):
            return d
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    d = getattr(cfg, "head_dim", None)
    return d if isinstance(d, int) else cfg.hidden_size // cfg.num_attention_heads


def _device_of(module: nn.Module):
    p = next(module.parameters(), None)
    return p.device if p is not None else "cpu"


def check_quantizable(
    config: Any, quant: QuantConfig | Mapping[str, Any] | None, causal_lm: bool
) -> None:
    """Quantise a weightless skeleton of the model ``config`` describes (meta device), so that
    errors only a module can show (a rotation size that does not divide a layer, an override
    that matches nothing, matmul quantisation of a model without attention) are reported
    before any weight loads. Skeletons transformers cannot build are left to the real call."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if quant is None:
        return
    cls = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
    try:
        with torch.device("meta"):
            skeleton = cls.from_config(config)
    except Exception:  # noqa: BLE001 - only a pre-check: loading reports its own errors
        return
    quantize_model(skeleton, quant)


def share_sibling_inputs(linears: list[tuple[str, nn.Module]]) -> None:
    """Let quantised linears under one parent with equal input formats share one input
    quantisation per forward (q/k/v, gate/up read the same hidden state): see ``SharedInput``.
    Siblings that are handed different tensors simply miss the cache."""
    groups: dict[tuple, list[FakeQuantizer]] = {}
    for name, m in linears:
        aq = m.activation_quantizer
        if aq is not None:
            rot = None if aq.rotation is None else aq.rotation.size
            key = (name.rpartition(".")[0], aq.fmt, aq.dim, aq.backend, rot)
            groups.setdefault(key, []).append(aq)
    for members in groups.values():
        if len(members) > 1:
            shared = SharedInput()
            for aq in members:
                aq.shared = shared


def quantization_summary(model: nn.Module) -> dict[str, int]:
    """How many linears and attention modules carry quantisers (for logs and tests).

    >>> import torch, qat
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    >>> qat.quantization_summary(model)
    {'quantized_linears': 0, 'quantized_attention': 0}
    >>> model = qat.quantize_model(model, {"weight": {"format": "int", "width": 8}})
    >>> qat.quantization_summary(model)
    {'quantized_linears': 2, 'quantized_attention': 0}"""
    lin = sum(isinstance(m, (QuantLinear, QuantConv1D)) for m in model.modules())
    att = sum(isinstance(m, MatmulQuantizer) for m in model.modules())
    return {"quantized_linears": lin, "quantized_attention": att}
