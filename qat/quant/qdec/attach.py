"""Putting QDEC on a model and taking it off: which layers it serves, each layer's weight
residual, the forward hook, ``attach_qdec`` / ``detach_qdec`` / ``enable_qdec`` and the
settings that change an attached QDEC in place (``set_k_chunk``, ``set_default_prefill``).

The residual lives in a plain attribute ``_qdec`` (a ``QDECState``), never a parameter or
buffer, so ``model.to()``, ``state_dict()`` and optimisers never see it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from qat.quant.modules import QuantConv1D, QuantLinear
from qat.quant.qdec.config import QDECConfig, QDECError
from qat.quant.qdec.residual import QDECState, k_for, quantize_residual

QuantLayer = QuantLinear | QuantConv1D


def _hook(module: QuantLayer, args: tuple, output: Tensor) -> Tensor:
    state: QDECState = module._qdec
    if torch.is_grad_enabled():
        raise QDECError(
            "QDEC is inference-only: run the model under torch.no_grad() or "
            "torch.inference_mode(), or detach_qdec(model) before training"
        )
    if state.k == 0:
        return output
    prefill = state.config.prefill or getattr(module, "_qdec_prefill", None) or "step"
    delta = state.compensation(module.quantized_input(args[0]), prefill)
    return output if delta is None else output + delta.to(output.dtype)


def qdec_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    """The layers QDEC serves: ``QuantLinear`` / ``QuantConv1D`` modules with an enabled
    weight quantiser."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, (QuantLinear, QuantConv1D))
        and m.weight_quantizer is not None
        and m.weight_quantizer.enabled
    ]


def layer_shape(m: QuantLayer) -> tuple[int, int]:
    """``(d_in, d_out)``: a Conv1D stores its weight as ``[in, out]``, a Linear ``[out, in]``."""
    d0, d1 = m.weight.shape
    return (d0, d1) if isinstance(m, QuantConv1D) else (d1, d0)


def weight_residual(m: QuantLayer) -> Tensor:
    """``W - Q(W)`` as ``[d_out, d_in]`` in fp32, quantised as the layer quantises it."""
    w = m.weight.detach()
    wq = m.weight_quantizer
    # a rotated layer computes with W H (its quantiser rotates): the residual is W H - Q(W H)
    target = w if wq.rotation is None else wq.rotation(w, wq.dim)
    r = target.float() - wq(w).float()
    return r.t() if isinstance(m, QuantConv1D) else r


def layers_to_serve(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    """``qdec_layers``, refusing a model that has QDEC already or no layer to serve."""
    if any(hasattr(m, "_qdec") for m in model.modules()):
        raise QDECError("QDEC is already attached to this model; detach_qdec(model) first")
    layers = qdec_layers(model)
    if not layers:
        raise QDECError(
            "QDEC needs quantised weights, and this model has no linear layer with "
            "a weight quantiser; set quant.weight (e.g. {format: bfp, width: 3})"
        )
    return layers


def install_residual(
    model: nn.Module,
    name: str,
    module: QuantLayer,
    codes_t: Tensor,
    scale: Tensor,
    config: QDECConfig,
) -> None:
    """Give ``module`` the residual ``codes_t`` / ``scale`` and its forward hook."""
    state = QDECState(codes_t, scale, k_for(config.k_chunk, layer_shape(module)[0]), config)
    module.__dict__["_qdec"] = state  # plain attribute: model.to() / state_dict() skip it
    state.handle = module.register_forward_hook(_hook)


def attach_qdec(
    model: nn.Module, config: QDECConfig | Mapping[str, Any] | None = None
) -> nn.Module:
    """Compute, quantise and attach every quantised linear's residual; returns ``model``.

    >>> import torch, qat
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    >>> w4 = {"format": "bfp", "width": 4, "block_size": 16}
    >>> model = qat.quantize_model(model, {"weight": w4})
    >>> model = qat.attach_qdec(model, {"residual_bits": 4})
    >>> model.qdec_config.residual_bits
    4
    >>> with torch.no_grad():  # QDEC is inference-only
    ...     model(torch.randn(2, 32)).shape
    torch.Size([2, 8])"""
    config = QDECConfig.from_dict(config if config is not None else {})
    layers = layers_to_serve(model)
    with torch.no_grad():
        for name, m in layers:
            codes, scale = quantize_residual(weight_residual(m), config.residual_bits)
            install_residual(model, name, m, codes.t().cpu(), scale.cpu(), config)
    model.qdec_config = config
    return model


def detach_qdec(model: nn.Module) -> nn.Module:
    """Remove QDEC from every layer (the residuals are dropped)."""
    for m in model.modules():
        state = m.__dict__.pop("_qdec", None)
        m.__dict__.pop("_qdec_prefill", None)
        if state is not None and state.handle is not None:
            state.handle.remove()
    model.__dict__.pop("qdec_config", None)
    return model


def enable_qdec(model: nn.Module, on: bool) -> None:
    """Switch an attached QDEC's hooks off (the residuals stay) or back on; off, the model
    runs exactly as without QDEC (no hook is called)."""
    for m in model.modules():
        state = m.__dict__.get("_qdec")
        if state is None:
            continue
        if on and state.handle is None:
            state.handle = m.register_forward_hook(_hook)
        elif not on and state.handle is not None:
            state.handle.remove()
            state.handle = None


def set_k_chunk(model: nn.Module, k_chunk: int) -> None:
    """Change ``k_chunk`` of an attached QDEC without recomputing residuals."""
    config = dataclasses.replace(model.qdec_config, k_chunk=k_chunk)
    model.qdec_config = config
    for m in model.modules():
        state = m.__dict__.get("_qdec")
        if state is not None:
            state.k, state.config = k_for(k_chunk, layer_shape(m)[0]), config


def set_default_prefill(model: nn.Module, rule: str | None) -> None:
    """The prefill rule used where the config's ``prefill`` is null (``qat perplexity``:
    ``token``)."""
    for m in model.modules():
        if "_qdec" in m.__dict__:
            m.__dict__["_qdec_prefill"] = rule


def check_quant_for_qdec(quant: Any, qdec: QDECConfig | None) -> None:
    """Before any work: QDEC asked for on a quant config without weight quantisation."""
    if qdec is None:
        return
    weights = quant is not None and (
        quant.weight is not None
        or any((o or {}).get("weight") is not None for o in quant.overrides.values())
    )
    if not weights:
        raise QDECError(
            "qdec needs quantised weights, but quant.weight is null (the model's "
            "weights stay float); set quant.weight, e.g. {format: bfp, width: 3}"
        )
