"""``quantize_model``: swap linears for quantised ones and quantise attention matmuls."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from qat.quant import attention
from qat.quant.config import QuantConfig, QuantConfigError
from qat.quant.modules import MatmulQuantizer, QuantConv1D, QuantLinear
from qat.quant.ste import FakeQuantizer, SharedInput

CONFIG_ATTR = "qat_config"  # key under which the quant config is kept in model.config


@functools.cache
def _routes_through_attention_interface(cls: type) -> bool:
    """True for modules whose forward dispatches to transformers' attention registry."""
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in src


def is_attention_module(module: nn.Module) -> bool:
    return _routes_through_attention_interface(type(module))


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, QuantConv1D, MatmulQuantizer)) for m in model.modules())


def quantize_model(model: nn.Module, config: QuantConfig | Mapping[str, Any] | None
                   ) -> nn.Module:
    """Insert STE fake-quantisers into ``model`` in place, as ``config`` says; returns it.

    Linear layers (and GPT-2's Conv1D) get weight and input quantisers; attention modules get
    a ``MatmulQuantizer`` and the model switches to the ``"qat"`` attention implementation.
    Excluded modules (``config.exclude``) and everything that is not a linear or an attention
    matmul (embeddings, norms, softmax, residuals) stay float.
    """
    config = QuantConfig.from_dict(config) if not isinstance(config, QuantConfig) else config
    if config is None:
        return model
    if is_quantized(model):
        raise ValueError("model is already quantised; quantize_model must run once")
    used_overrides: set[str] = set()
    replacements: list[tuple[str, nn.Module]] = []
    uses_matmul = False
    names = []
    for name, module in model.named_modules():
        if not name:
            continue
        names.append(name)
        if config.is_excluded(name):
            continue
        pat = config.override_for(name)
        if isinstance(module, (nn.Linear, Conv1D)):
            if pat is not None:
                used_overrides.add(pat)
            wf, af = config.format_for("weight", name), config.format_for("activation", name)
            if wf is None and af is None:
                continue
            wdim = 0 if isinstance(module, Conv1D) else -1
            wq = FakeQuantizer(wf, dim=wdim, backend=config.backend) if wf is not None else None
            aq = FakeQuantizer(af, dim=-1, backend=config.backend) if af is not None else None
            if isinstance(module, Conv1D):
                replacements.append((name, QuantConv1D.from_conv1d(module, wq, aq)))
            else:
                replacements.append((name, QuantLinear.from_linear(module, wq, aq)))
        elif is_attention_module(module):
            if pat is not None:
                used_overrides.add(pat)
            mf = config.format_for("matmul", name)
            if mf is not None:
                module.qat_matmul = MatmulQuantizer(mf, config.v_block_axis, config.backend)
                uses_matmul = True
    unused = [p for p in config.overrides if p not in used_overrides]
    if unused:
        sample = ", ".join(names[:8])
        raise QuantConfigError(
            f"quant.overrides pattern {unused[0]!r} matches no linear or attention module; "
            f"module names look like: {sample}, ...")
    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    share_sibling_inputs([(n, m) for n, m in replacements])
    if uses_matmul:
        if not hasattr(model, "set_attn_implementation"):
            raise QuantConfigError("quant.matmul needs a transformers PreTrainedModel; "
                                   "set quant.matmul: null for other models")
        model.set_attn_implementation(attention.ATTN_IMPLEMENTATION)
    if hasattr(model, "config"):
        setattr(model.config, CONFIG_ATTR, config.to_dict())
    model.qat_quant_config = config
    return model


def share_sibling_inputs(linears: list[tuple[str, nn.Module]]) -> None:
    """Let quantised linears under one parent with equal input formats share one input
    quantisation per forward (q/k/v, gate/up read the same hidden state): see ``SharedInput``.
    Siblings that are handed different tensors simply miss the cache."""
    groups: dict[tuple, list[FakeQuantizer]] = {}
    for name, m in linears:
        aq = m.input_quantizer
        if aq is not None:
            key = (name.rpartition(".")[0], aq.fmt, aq.dim, aq.backend)
            groups.setdefault(key, []).append(aq)
    for members in groups.values():
        if len(members) > 1:
            shared = SharedInput()
            for aq in members:
                aq.shared = shared


def quantization_summary(model: nn.Module) -> dict[str, int]:
    """How many linears and attention modules carry quantisers (for logs and tests)."""
    lin = sum(isinstance(m, (QuantLinear, QuantConv1D)) for m in model.modules())
    att = sum(isinstance(m, MatmulQuantizer) for m in model.modules())
    return {"quantized_linears": lin, "quantized_attention": att}
