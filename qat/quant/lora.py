"""LoRA on quantised linears: the weight quantiser sees the effective weight ``W + BA``.

peft's own ``lora.Linear`` adds ``B(A(x))`` in float beside the quantised base layer, so a
merged model would quantise a different weight than the one trained. ``QuantLoraLinear``
quantises ``W + scale * B @ A`` instead; merging then yields exactly the trained model.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn

from qat.errors import ConfigError
from qat.quant.modules import QuantConv1D, QuantLinear

# peft's LoraConfig fields that change what an adapter computes beyond ``W + scale * B A``;
# QuantLoraLinear's forward quantises exactly that sum, so each is refused rather than ignored.
_UNSUPPORTED = {
    "lora_bias": "a bias on lora_B, which W + BA has no place for",
    "layer_replication": "replicated layers",
    "target_parameters": "adapters on bare parameters (outside any quantised linear)",
    "megatron_config": "Megatron parallel layers",
    "use_qalora": "QA-LoRA (for GPTQ layers)",
}
# The initialisations that only set A and B (B A = 0 or a random start); the others (pissa,
# olora, loftq, eva, corda, ...) rewrite the base weight or need data first.
SUPPORTED_INITS = (True, False, "gaussian")


def check_lora_config(config: LoraConfig, training: bool = True) -> None:
    """Refuse, in one line naming the field, a ``peft.LoraConfig`` that quantised LoRA cannot
    honour: dropout, DoRA and peft's other LoRA variants, a LoRA bias, and the fields above;
    with ``training``, also ``inference_mode`` (frozen adapters: nothing would train).

    >>> from peft import LoraConfig
    >>> check_lora_config(LoraConfig(r=8, lora_dropout=0.0))
    >>> check_lora_config(LoraConfig(r=8, lora_dropout=0.0, lora_bias=True))
    Traceback (most recent call last):
    ...
    qat.errors.ConfigError: peft LoraConfig: lora_bias=True is not supported with quantised \
LoRA (a bias on lora_B, which W + BA has no place for); the quantiser sees W + BA
    """
    import dataclasses

    if training and config.inference_mode:
        raise ConfigError(
            "peft LoraConfig: inference_mode=True freezes the adapters (nothing would train)"
        )
    if config.lora_dropout:
        raise ConfigError(
            f"peft LoraConfig: lora_dropout must be 0 (the quantiser sees W + BA; "
            f"dropout on the adapter's input has no such form), got {config.lora_dropout}"
        )
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        # peft tags its LoRA variants (DoRA, aLoRA, VeLoRA, ...): each has its own forward
        variant = field.metadata.get("is_lora_variant") and bool(value)
        if variant or (field.name in _UNSUPPORTED and value):
            what = _UNSUPPORTED.get(field.name, "a LoRA variant with its own forward")
            raise ConfigError(
                f"peft LoraConfig: {field.name}={value!r} is not supported with quantised "
                f"LoRA ({what}); the quantiser sees W + BA"
            )
    init = config.init_lora_weights
    if not any(init is ok or (isinstance(ok, str) and init == ok) for ok in SUPPORTED_INITS):
        raise ConfigError(
            f"peft LoraConfig: init_lora_weights={init!r} is not supported with quantised "
            f"LoRA (it changes the base weight or needs data first); use True, False or "
            f"'gaussian'"
        )


class QuantLoraLinear(PeftLoraLinear):
    """peft LoRA layer for ``QuantLinear`` / ``QuantConv1D`` base layers."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any
    ) -> None:
        check_lora_config(config, training=False)  # also adapters loaded from a folder
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        # GPT-2's Conv1D stores its weight as [in, out]: peft's delta must be transposed.
        self.fan_in_fan_out = isinstance(self.get_base_layer(), QuantConv1D)
        if not isinstance(self.lora_dropout[adapter_name], nn.Identity) or self.lora_variant:
            raise ConfigError("quantised LoRA takes no dropout and no LoRA variant")

    def effective_weight(self) -> torch.Tensor:
        """``W + sum_a scale_a * B_a A_a`` over the active adapters (what gets quantised)."""
        weight = self.get_base_layer().weight
        for name in self.active_adapters:
            if name in self.lora_A:
                weight = weight + self.get_delta_weight(name)
        return weight

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x)
        if self.merged:
            return self.base_layer(x)
        return self.get_base_layer().forward_with_weight(x, self.effective_weight())


# peft's custom-module hook: LoRA on our quantised layers uses QuantLoraLinear (the one place
# this mapping is written; fresh adapters and saved ones loaded for evaluation both use it).
QUANT_LORA_MODULES: dict[type, type] = {QuantLinear: QuantLoraLinear, QuantConv1D: QuantLoraLinear}


def use_quant_lora(config: LoraConfig) -> LoraConfig:
    """Make ``config`` put ``QuantLoraLinear`` on quantised linears; returns ``config``."""
    config._register_custom_module(QUANT_LORA_MODULES)
    return config


def check_target_modules(linear_names: list[str], targets: list[str] | None) -> None:
    """Every ``lora.target_modules`` entry must name a linear layer the way peft matches a
    list (the full name, or its last dotted parts); peft itself only says "not found" once
    every entry misses, and not at all while one of them matches."""
    if targets is None:
        return
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in linear_names):
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
            raise ConfigError(
                f"lora.target_modules entry {target!r} matches no linear layer "
                f"of the model; linear layer names end in: {', '.join(suffixes)}"
            )


def make_lora_config(
    model: nn.Module,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: list[str] | None,
    modules_to_save: list[str] | None,
) -> LoraConfig:
    """A ``LoraConfig`` for sequence classification (or a causal LM) whose quantised targets use
    ``QuantLoraLinear``. ``target_modules=None`` targets every quantised linear."""
    from transformers.pytorch_utils import Conv1D

    check_target_modules(
        [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))], target_modules
    )
    if target_modules is None:
        target_modules = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, m in model.named_modules()
                if isinstance(m, (QuantLinear, QuantConv1D))
            }
        )
        if not target_modules:
            target_modules = "all-linear"
    # a decoder's LoRA is a CAUSAL_LM one (its PeftModel keeps generate and the LM loss)
    task = "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else "SEQ_CLS"
    config = LoraConfig(
        task_type=task,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
    )
    return use_quant_lora(config)
