"""What a QAT trainer may be handed besides a ready model and tokenised rows, made ready:

- a model **name** (Hub id, local folder, ``pkg://``; ``gguf_file`` from the config), loaded
  as ``qat.build_model`` loads it, with its tokenizer (``load_named_model``);
- rows of raw **text** for a sequence classifier, tokenised (``ready_rows``; a causal LM's
  raw text goes to ``QATSFTTrainer``, where TRL tokenises it);
- a model already wrapped by ``peft.get_peft_model``: its adapter is taken off with its
  weights (``take_peft_adapter``) and put back as qat's quantised LoRA once the base is
  quantised (``restore_peft_adapter``), so the quantiser sees ``W + BA``.

Which head a named model gets (``choose_head``): a causal LM for ``QATSFTTrainer``; for
``QATTrainer``, ``task_name`` in the ``QATConfig`` decides (a GLUE task: a sequence classifier
with its labels; ``causal_lm`` / ``chat``: a causal LM), else the checkpoint's own
``architectures`` (``*ForCausalLM``, or ``*ForSequenceClassification`` with its
``num_labels``), else a GGUF file (a decoder); a base model without a head (BERT's
``BertModel``) needs a ``task_name``, or ``qat.build_model(name, num_labels=N)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qat.errors import UsageError
from qat.models import load_config
from qat.runs.build import RECIPE_SUFFIXES, ModelArgs, build_model
from qat.runs.checkpoints import QAT_CONFIG_FILE
from qat.tasks.registry import TASKS

CAUSAL_LM, CLASSIFIER = "causal_lm", "sequence_classification"


def load_named_model(name: str, args: Any, head: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for the model ``name`` (``head``: forced, or None for
    ``choose_head``'s rule). The name, the config's keys and the model's config are checked
    first: a name that does not resolve is one ``QatError`` line before any weights load."""
    _check_name(name)
    gguf_file, dtype = _load_keys(args)
    config = load_config(name, gguf_file)  # ModelLoadError: one line naming the model
    task = getattr(args, "task_name", None)
    head, num_labels = choose_head(name, config, task, head)
    model_args = ModelArgs(
        model_name_or_path=name,
        gguf_file=gguf_file,
        tokenizer_name_or_path=getattr(args, "tokenizer_name_or_path", None),
        torch_dtype=dtype,
        task_name=task if head == CLASSIFIER == getattr(TASKS.get(task), "head", None) else None,
    )
    built = build_model(model_args, head=head, num_labels=num_labels)
    model, tokenizer = built.model, built.tokenizer
    if head == CAUSAL_LM and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # as qat train's decoder loop does
    return model, tokenizer


def choose_head(
    name: str, config: Any, task: str | None, head: str | None = None
) -> tuple[str, int | None]:
    """``(head, num_labels)`` of a named model, by the rule in the module docstring."""
    if head is not None:
        return head, None
    if task in TASKS:  # the task says which head (and a classifier's labels)
        return TASKS[task].head, TASKS[task].num_labels
    if config is None:  # a GGUF file: llama.cpp's models are decoders
        return CAUSAL_LM, None
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForCausalLM") for a in archs):
        return CAUSAL_LM, None
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return CLASSIFIER, config.num_labels
    raise UsageError(
        f"model {name!r} ({', '.join(archs) or 'no architectures'}) has no head to train: set "
        "task_name in the QATConfig (a GLUE task, or causal_lm), or load it with "
        "qat.build_model(name, num_labels=N)"
    )


def _check_name(name: str) -> None:
    """A recipe or a qat run folder is not a model name: say what to call instead."""
    path = Path(name).expanduser()
    if path.suffix in RECIPE_SUFFIXES:
        raise UsageError(
            f"model {name!r} is a recipe, not a model: run it with qat.train({name!r})"
        )
    if (path / QAT_CONFIG_FILE).is_file():
        raise UsageError(
            f"model {name!r} is a qat run folder: load its trained model with "
            f"qat.build_model({name!r}).model"
        )


def _load_keys(args: Any) -> tuple[str | None, str | None]:
    """``(gguf_file, dtype)`` from a QATConfig's keys and TRL's ``model_init_kwargs``."""
    gguf_file = getattr(args, "gguf_file", None)
    dtype = getattr(args, "torch_dtype", None)
    for key, value in (getattr(args, "model_init_kwargs", None) or {}).items():
        if key in ("dtype", "torch_dtype"):
            value = value if isinstance(value, str) else str(value).removeprefix("torch.")
            if dtype not in (None, value):
                raise UsageError(
                    f"model_init_kwargs {key} {value!r} and torch_dtype {dtype!r} disagree"
                )
            dtype = value
        elif key == "gguf_file":
            if gguf_file not in (None, value):
                raise UsageError(f"model_init_kwargs gguf_file {value!r} and gguf_file disagree")
            gguf_file = value
        else:
            raise UsageError(
                f"model_init_kwargs key {key!r} is not supported when qat loads the model by "
                "name (it takes dtype and gguf_file)"
            )
    return gguf_file, dtype


def ready_rows(rows: Any, causal: bool, tokenizer: Any, max_length: int | None) -> Any:
    """``QATTrainer``'s rows: a classifier's raw text tokenised (``tokenize_text_rows``), a
    causal LM's raw text refused (``refuse_raw_lm_text``), anything else as it is."""
    if rows is None:
        return None
    if causal:
        refuse_raw_lm_text(rows)
        return rows
    return rows if tokenizer is None else tokenize_text_rows(rows, tokenizer, max_length)


def refuse_raw_lm_text(dataset: Any) -> None:
    """Rows of raw ``text`` for a causal LM in ``QATTrainer``: Trainer would drop the column
    and fail far from here; TRL's trainer (``QATSFTTrainer``) is the one that tokenises them."""
    datasets = dataset.values() if isinstance(dataset, dict) else [dataset]
    for rows in datasets:
        columns = getattr(rows, "column_names", None) or []
        if "text" in columns and "input_ids" not in columns:
            raise UsageError(
                "rows of raw text for a causal LM: train it with QATSFTTrainer (TRL "
                "tokenises them), or pass rows with input_ids and labels"
            )


def tokenize_text_rows(dataset: Any, tokenizer: Any, max_length: int | None) -> Any:
    """Rows of raw text for a sequence classifier (a ``text`` column, ``text_pair`` for
    sentence pairs, and ``label``), tokenised with truncation at ``max_length``; rows that
    hold ``input_ids`` (or anything else) come back unchanged."""
    if isinstance(dataset, dict):
        return {k: tokenize_text_rows(v, tokenizer, max_length) for k, v in dataset.items()}
    columns = getattr(dataset, "column_names", None)
    if not columns or "input_ids" in columns or "text" not in columns:
        return dataset
    pair = "text_pair" in columns

    def tokenise(batch: dict[str, list]) -> Any:
        second = batch["text_pair"] if pair else None
        return tokenizer(batch["text"], second, truncation=True, max_length=max_length)

    gone = [c for c in ("text", "text_pair") if c in columns]
    return dataset.map(tokenise, batched=True, remove_columns=gone)


def take_peft_adapter(model: Any) -> tuple[Any, dict[str, Any] | None]:
    """``(base model, adapter weights)`` of a ``PeftModel`` (its layers unloaded, the adapter's
    tensors copied); ``(model, None)`` for any other model. LoRA layers outside a PeftModel
    are refused: nothing says which config made them."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    if not isinstance(model, PeftModel):
        if any(isinstance(m, LoraLayer) for m in model.modules()):
            raise UsageError(
                "the model holds peft LoRA layers outside a PeftModel (inject_adapter_in_model?): "
                "pass the PeftModel, or the base model with peft_config=LoraConfig(...)"
            )
        return model, None
    name = next(iter(model.peft_config))
    state = {
        k: v.detach().clone()
        for k, v in get_peft_model_state_dict(model, adapter_name=name).items()
    }
    return model.unload(), state


def restore_peft_adapter(model: Any, state: dict[str, Any]) -> None:
    """Load the weights ``take_peft_adapter`` took into the new (quantised) LoRA layers;
    every tensor must find its place."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    lost = [k for k in result.unexpected_keys if "lora_" in k or "modules_to_save" in k]
    if lost:
        raise UsageError(
            f"the PeftModel's adapter weight {lost[0]!r} has no place in the quantised LoRA "
            f"model ({len(lost)} such)"
        )
