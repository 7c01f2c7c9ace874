"""Fine-tuning modes: ``full``, ``lora`` (peft) and ``classifier`` (only the head trains)."""

from __future__ import annotations

from torch import nn

from qat.models import CLASSIFIER_HEADS as HEAD_NAMES
from qat.quant.lora import make_lora_config


def head_names(model: nn.Module) -> list[str]:
    """Names of the classification head modules (newly initialised, kept float)."""
    names = [n for n, _ in model.named_children() if n in HEAD_NAMES]
    if not names:
        raise ValueError(f"{type(model).__name__} has no classification head named "
                         f"{' or '.join(HEAD_NAMES)}")
    return names


def is_causal_lm(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForCausalLM")


def prepare_finetuning(model: nn.Module, mode: str, lora: object | None = None) -> nn.Module:
    """Set ``requires_grad`` (or wrap with peft) for ``mode``; returns the model to train."""
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
            raise ValueError("finetune: lora needs a lora section")
        config = make_lora_config(model, lora.r, lora.alpha, lora.dropout,
                                  lora.target_modules, modules_to_save=heads or None)
        return get_peft_model(model, config)
    raise ValueError(f"finetune must be one of full, lora, classifier; got {mode!r}")


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
