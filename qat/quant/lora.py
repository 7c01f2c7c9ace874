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


class QuantLoraLinear(PeftLoraLinear):
    """peft LoRA layer for ``QuantLinear`` / ``QuantConv1D`` base layers."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any
    ) -> None:
        if config.use_dora:
            raise ConfigError("DoRA is not supported on quantised linears")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        # GPT-2's Conv1D stores its weight as [in, out]: peft's delta must be transposed.
        self.fan_in_fan_out = isinstance(self.get_base_layer(), QuantConv1D)
        if not isinstance(self.lora_dropout[adapter_name], nn.Identity):
            raise ConfigError("lora.dropout must be 0 with quantised LoRA")

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
