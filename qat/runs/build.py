"""One model builder for every source: a recipe (its model quantised as its ``quant`` section
says, for post-training quantisation) or a run / checkpoint directory (``qat_config.json``: the
checkpoint's quant config, fine-tuning mode and LoRA adapter rebuild the trained model).

The rule "what a checkpoint's state overrides" lives here once: ``checkpoint_overrides``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from qat.errors import UsageError


@dataclasses.dataclass
class Source:
    """What to load: the recipe (overrides applied) and, for a checkpoint, its directory."""

    recipe: Any  # qat.runs.recipe.Recipe
    checkpoint: Path | None = None
    finetune: str = "full"


def find_recipe_yaml(ckpt: Path) -> Path | None:
    for d in (ckpt, ckpt.parent):
        if (d / "recipe.yaml").is_file():
            return d / "recipe.yaml"
    return None


def resolve_source(path: str, overrides: list[str]) -> Source:
    """A recipe file, or a run/checkpoint directory with ``qat_config.json``."""
    from qat.runs.checkpoints import QAT_CONFIG_FILE, check_weights, read_qat_config
    from qat.runs.recipe import (
        apply_override,
        build_recipe,
        load_recipe,
        load_recipe_dict,
        parse_overrides,
    )

    p = Path(path).expanduser()
    if p.is_file():
        return Source(load_recipe(p, overrides))
    if not p.exists():
        raise UsageError(f"{path!r} does not exist (expected a recipe .yaml or a checkpoint "
                           "directory)")
    if not p.is_dir():
        raise UsageError(f"{path!r} is not a regular file or a directory (expected a recipe "
                           ".yaml or a checkpoint directory)")
    if not (p / QAT_CONFIG_FILE).is_file():
        raise UsageError(f"{path!r} is a directory that holds no {QAT_CONFIG_FILE}: not a "
                           "qat checkpoint (written by qat train); give a recipe .yaml file, "
                           "or to evaluate a plain model, a recipe whose model_name_or_path "
                           "points at it")
    state = read_qat_config(p)
    check_weights(p, state["finetune"])  # a truncated file: one line naming it, not a traceback
    yaml_path = find_recipe_yaml(p)
    data: dict[str, Any] = dict(load_recipe_dict(yaml_path)) if yaml_path else {}
    finetune = state.get("finetune") or "full"
    # The checkpoint's quant config and mode win over its recipe; the user's overrides win last.
    ckpt_keys: dict[str, Any] = {"quant": state.get("quant"), "finetune": finetune}
    if state.get("lora"):
        ckpt_keys["lora"] = state["lora"]
    if finetune != "lora":  # the run dir holds the whole model; a LoRA run holds the adapter
        ckpt_keys.update(model_name_or_path=str(p), gguf_file=None)
    data.setdefault("output_dir", str(p))
    for key, value in {**ckpt_keys, **parse_overrides(overrides)}.items():
        apply_override(data, key, value)  # build_recipe rejects unknown keys
    if not data.get("task_name"):
        raise UsageError(f"{path!r}: no recipe.yaml in it or its parent says which task; "
                           "pass --task_name")
    if finetune == "lora" and not data.get("model_name_or_path"):
        raise UsageError(f"{path!r} is a LoRA checkpoint, but no recipe.yaml names the base "
                           "model; pass --model_name_or_path")
    return Source(build_recipe(data, str(yaml_path or p)), p, finetune)


def load_model(src: Source, num_labels: int | None, device: Any = None):
    """The sequence classifier of ``src`` (``num_labels`` None: its causal LM), quantised as its
    config says, in eval mode, on ``device`` (a ``torch.device``; None:
    ``resolve_device("auto")``, the GPU when there is one, as ``qat train`` does)."""
    import qat.quant.attention  # noqa: F401 - registers the "qat" attention a saved run may name
    from qat import models
    from qat.models import check_max_length, load_sequence_classifier, load_tokenizer, preflight
    from qat.quant.quantize import quantize_model

    args = src.recipe.args
    ckpt = src.checkpoint
    if device is None:
        device = models.resolve_device(None, src.recipe.training_args.use_cpu)
    config = preflight(args)
    tok_name = args.tokenizer_name_or_path or args.model_name_or_path
    gguf = None if args.tokenizer_name_or_path else args.gguf_file
    if ckpt is not None and (ckpt / "tokenizer_config.json").is_file():
        tok_name, gguf = str(ckpt), None
    tokenizer = load_tokenizer(tok_name, gguf)
    if num_labels is None:  # a decoder (task_name causal_lm / chat)
        model = models.load_causal_lm(args.model_name_or_path, args.gguf_file, args.torch_dtype)
    else:
        model = load_sequence_classifier(args.model_name_or_path, num_labels, args.gguf_file,
                                         args.torch_dtype, pad_token_id=tokenizer.pad_token_id)
    if config is None:  # GGUF: the config comes with the model
        check_max_length(model.config, args.max_length, args.model_name_or_path)
    if args.quant is not None:
        quantize_model(model, args.quant)
    if ckpt is not None and src.finetune == "lora":
        model = _attach_lora(model, ckpt)
    return model.to(device).eval(), tokenizer


def _attach_lora(model, ckpt: Path):
    """Load a saved adapter onto the quantised base with ``QuantLoraLinear`` layers."""
    from peft import LoraConfig, PeftModel

    from qat.quant.lora import QuantLoraLinear
    from qat.quant.modules import QuantConv1D, QuantLinear

    if not (ckpt / "adapter_config.json").is_file():
        raise UsageError(f"{str(ckpt)!r} is a LoRA run but holds no adapter_config.json")
    config = LoraConfig.from_pretrained(str(ckpt))
    config._register_custom_module({QuantLinear: QuantLoraLinear, QuantConv1D: QuantLoraLinear})
    return PeftModel.from_pretrained(model, str(ckpt), config=config)


