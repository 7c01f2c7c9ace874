"""What a QAT trainer trains, read once: the quant config, fine-tuning mode, LoRA,
distillation, the non-finite policy and QDEC.

As in TRL, the settings live in the config: when ``args`` is a ``QATConfig`` (or
``QATSFTConfig``), its ``quant``, ``finetune``, ``lora``, ``distill``, ``on_nonfinite`` and
``qdec`` are the trainer's. The trainer's keywords (``quant_config=``, ``finetune=``, ...) stay
for plain ``TrainingArguments``; a key set both ways with different values is one
``UsageError`` naming it. A field of ``args`` left at its default counts as not set (a
dataclass cannot tell a default from the same value written out). TRL's ``peft_config=``
and a model already wrapped by ``peft.get_peft_model`` both become qat's quantised LoRA
(``finetune: lora``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from peft import LoraConfig, PeftModel

from qat.errors import UsageError, check_one_of
from qat.quant.config import QuantConfig
from qat.quant.lora import check_lora_config
from qat.quant.qdec.attach import check_quant_for_qdec
from qat.quant.qdec.config import QDECConfig
from qat.runs.recipe.arguments import FINETUNE_MODES, QATArguments
from qat.runs.recipe.sections import build_distill, build_lora
from qat.training.nonfinite import check_policy

# setting -> the trainer keyword that also sets it
KEYWORDS = {
    "quant": "quant_config",
    "finetune": "finetune",
    "lora": "lora",
    "distill": "distill",
    "on_nonfinite": "on_nonfinite",
    "qdec": "qdec",
}
DEFAULTS = {"finetune": "full", "on_nonfinite": "stop"}


@dataclasses.dataclass
class TrainerSettings:
    """The resolved settings (``lora``: ``LoraArguments``, a ``peft.LoraConfig`` or None)."""

    quant: QuantConfig | None = None
    finetune: str = "full"
    lora: Any = None
    distill: Any = None  # DistillArguments | None
    on_nonfinite: str = "stop"
    qdec: QDECConfig | None = None


def _normalise(key: str, value: Any) -> Any:
    """A keyword's value in the form ``QATConfig.__post_init__`` gives the same key."""
    if key == "quant":
        return QuantConfig.from_dict(value)
    if key == "finetune":
        check_one_of("finetune", value, FINETUNE_MODES, UsageError)
        return value
    if key == "lora":
        if isinstance(value, LoraConfig):
            check_lora_config(value)
            return value
        return build_lora(value)
    if key == "distill":
        return build_distill(value)
    if key == "on_nonfinite":
        return check_policy(value)
    return QDECConfig.from_dict(value)


def _comparable(value: Any) -> Any:
    return value.to_dict() if isinstance(value, (QuantConfig, QDECConfig)) else value


def _from_args(args: Any) -> dict[str, Any]:
    """The settings a ``QATConfig`` sets (fields left at their defaults are not set)."""
    if not isinstance(args, QATArguments):
        return {}
    fields = {f.name: f for f in dataclasses.fields(args)}
    out = {}
    for key in KEYWORDS:
        field = fields[key]
        default = (
            field.default
            if field.default_factory is dataclasses.MISSING
            else field.default_factory()
        )
        value = getattr(args, key)
        if _comparable(value) != _comparable(default):
            out[key] = value
    return out


def resolve_settings(
    model: Any, args: Any, peft_config: Any = None, **keywords: Any
) -> TrainerSettings:
    """The trainer's settings from ``args``, its keywords (``KEYWORDS``' values; None: not
    given), ``peft_config`` and a ``PeftModel`` input; each conflict is one ``UsageError``,
    raised before any model work."""
    given = {
        k: _normalise(k, keywords[v]) for k, v in KEYWORDS.items() if keywords.get(v) is not None
    }
    origin = {k: f"{KEYWORDS[k]}=" for k in given}  # where each given value came from
    for source, lora in (("peft_config=", peft_config), ("a PeftModel", _peft_model_lora(model))):
        if lora is None:
            continue
        if "lora" in given:
            raise UsageError(
                f"LoRA settings come both from {origin['lora']} and from {source}; give them once"
                + (" (the PeftModel's adapter is kept and quantised)" if "Peft" in source else "")
            )
        if not isinstance(lora, LoraConfig):
            raise UsageError(
                f"peft_config must be a peft.LoraConfig (qat trains quantised LoRA), got "
                f"{type(lora).__name__}"
            )
        check_lora_config(lora)
        given["lora"], origin["lora"] = lora, source
    if "lora" in given:  # LoRA settings mean LoRA training
        if given.setdefault("finetune", "lora") != "lora":
            raise UsageError(
                f"finetune={given['finetune']!r} with LoRA settings from {origin['lora']}: LoRA "
                "trains with finetune='lora'"
            )
        origin.setdefault("finetune", origin["lora"])
    from_args = _from_args(args)
    for key, value in from_args.items():
        if key in given and _comparable(given[key]) != _comparable(value):
            raise UsageError(
                f"{key} is set both in args ({type(args).__name__}) and by {origin[key]}, with "
                "different values; set it in one place"
            )
    values = {**DEFAULTS, **from_args, **given}
    if values["finetune"] == "lora" and values.get("lora") is None:
        values["lora"] = args.lora if isinstance(args, QATArguments) else None  # its defaults
    settings = TrainerSettings(**values)
    check_quant_for_qdec(settings.quant, settings.qdec)
    return settings


def _peft_model_lora(model: Any) -> Any:
    """The one adapter config of a ``PeftModel`` (None for other models); more are refused."""
    if not isinstance(model, PeftModel):
        return None
    configs = model.peft_config
    if len(configs) != 1:
        raise UsageError(
            f"the PeftModel holds {len(configs)} adapters ({', '.join(configs)}); qat trains "
            "one LoRA adapter"
        )
    config = next(iter(configs.values()))
    if not isinstance(config, LoraConfig):
        raise UsageError(
            f"the PeftModel's adapter is {type(config).__name__}; qat trains LoRA adapters only "
            "(quantised: the quantiser sees W + BA)"
        )
    return config


def adopt_model_quant(model: Any, quant: QuantConfig | None) -> QuantConfig | None:
    """The quant config of a model handed over already quantised (``quantize_model`` leaves
    it as ``model.qat_quant``): the run's when the trainer has none, and refused when the
    trainer's differs (the model would train with one and its run record the other)."""
    own = getattr(model, "qat_quant", None)
    if quant is None or own is None:
        return quant if quant is not None else own
    if _comparable(own) != _comparable(quant):
        raise UsageError(
            "the model is already quantised with another quant config than the trainer's "
            "(args.quant / quant_config): pass the float model, or leave the trainer's unset"
        )
    return quant
