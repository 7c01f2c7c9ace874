"""Fine-tuning modes: ``full``, ``lora`` (peft) and ``classifier`` (only the head trains)."""

from __future__ import annotations

import copy
from typing import Any

from peft import LoraConfig
from torch import nn

from qat.errors import ConfigError
from qat.models import is_causal_lm
from qat.quant.config import CLASSIFIER_HEADS
from qat.quant.lora import (
    check_lora_config,
    check_target_modules,
    make_lora_config,
    use_quant_lora,
)
from qat.quant.transforms.learned import learned_parameters


def head_names(model: nn.Module) -> list[str]:
    """Names of the classification head modules (newly initialised, kept float)."""
    names = [n for n, _ in model.named_children() if n in CLASSIFIER_HEADS]
    if not names:
        raise ConfigError(
            f"{type(model).__name__} has no classification head named "
            f"{' or '.join(CLASSIFIER_HEADS)}"
        )
    return names


def prepare_finetuning(model: nn.Module, mode: str, lora: object | None = None) -> nn.Module:
    """Set ``requires_grad`` (or wrap with peft) for ``mode``; returns the model to train."""

    if mode != "full" and learned_parameters(model):
        raise ConfigError(
            f"quant.rotation.learned trains rotations and smoothing scales with the weights; "
            f"finetune {mode} does not train them: use finetune full"
        )
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    # a causal LM has no new head: LoRA trains the adapters only (its lm_head is pretrained)
    heads = head_names(model) if mode == "classifier" or not is_causal_lm(model) else []
    if mode == "classifier":
        for name, p in model.named_parameters():
            p.requires_grad_(name.split(".")[0] in heads)
        return model
    if mode == "lora":
        from peft import get_peft_model

        if lora is None:
            raise ConfigError("finetune: lora needs a lora section")
        if isinstance(lora, LoraConfig):
            config = _from_peft_config(model, lora, heads)
        else:
            config = make_lora_config(
                model,
                lora.r,
                lora.alpha,
                lora.dropout,
                lora.target_modules,
                modules_to_save=heads or None,
            )
        return get_peft_model(model, config)
    raise ConfigError(f"finetune must be one of full, lora, classifier; got {mode!r}")


def _from_peft_config(model: nn.Module, lora: LoraConfig, heads: list[str]) -> LoraConfig:
    """A copy of a user's ``peft.LoraConfig`` (never changed in place) whose adapters on
    quantised linears quantise ``W + BA``; a classifier's new head trains beside them."""
    check_lora_config(lora)
    config = copy.deepcopy(lora)
    targets = config.target_modules
    if isinstance(targets, (list, set, tuple)):
        from transformers.pytorch_utils import Conv1D

        check_target_modules(
            [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))],
            sorted(targets),
        )
    if heads and not config.modules_to_save:
        config.modules_to_save = list(heads)
    if config.task_type is None:
        config.task_type = "CAUSAL_LM" if is_causal_lm(model) else "SEQ_CLS"
    return use_quant_lora(config)


def lora_summary(lora: Any) -> dict[str, Any] | None:
    """The LoRA settings recorded in ``qat_config.json``, as ``LoraArguments`` keys (what
    ``qat_config.json``'s reader takes) for qat's arguments and a peft config alike; the
    adapter's own ``adapter_config.json`` holds the rest of a peft config."""
    import dataclasses

    if lora is None:
        return None
    if isinstance(lora, LoraConfig):
        targets = lora.target_modules
        if isinstance(targets, (set, list, tuple)):
            targets = sorted(targets)
        elif targets is not None:  # "all-linear" or a regular expression: peft's own forms
            targets = [targets]
        return {
            "r": lora.r,
            "alpha": lora.lora_alpha,
            "dropout": lora.lora_dropout,
            "target_modules": targets,
        }
    return dataclasses.asdict(lora) if dataclasses.is_dataclass(lora) else lora


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def learned_group(optimizer: Any, model: nn.Module, quant: Any) -> None:
    """Move the learned transforms' parameters (``qat.quant.transforms.learned``) out of
    ``optimizer``'s groups into one of their own, at ``quant.rotation.learned.lr`` without weight
    decay (before any step, so no optimiser state moves)."""

    params = [p for p in learned_parameters(model) if p.requires_grad]
    spec = (
        None if quant is None or quant.fused_rotation is None else quant.fused_rotation["learned"]
    )
    if not params or spec is None:
        return
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    optimizer.add_param_group({"params": params, "lr": spec["lr"], "weight_decay": 0.0})
