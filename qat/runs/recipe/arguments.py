"""qat's own recipe keys, one dataclass field each, with their help (no torch, no transformers).

``QATArguments`` is the mixin half of ``qat.runs.recipe.config.QATConfig`` (which adds
``transformers.TrainingArguments``); it lives here, apart, so that ``qat train --help`` can list
these keys from the field metadata without importing torch. A new recipe key is one field
below (type, default, ``metadata={"help": ...}``); value checks that need more than the type go
in ``QATConfig.__post_init__``.
"""

from __future__ import annotations

import dataclasses
import textwrap
import typing
from typing import Any, Literal

FinetuneMode = Literal["full", "lora", "classifier"]
FINETUNE_MODES: tuple[str, ...] = typing.get_args(FinetuneMode)
OnNonfinite = Literal["stop", "skip"]
ON_NONFINITE: tuple[str, ...] = typing.get_args(OnNonfinite)
DistillLoss = Literal["kl", "jsd"]
DISTILL_LOSSES: tuple[str, ...] = typing.get_args(DistillLoss)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclasses.dataclass
class LoraArguments:
    """LoRA settings (``finetune: lora``). ``target_modules: null`` targets every quantised
    linear. Dropout must stay 0: the quantiser sees the effective weight ``W + BA``, and input
    dropout on the adapter path has no such form.

    >>> import qat
    >>> qat.LoraArguments(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    LoraArguments(r=4, alpha=8, dropout=0.0, target_modules=['q_proj', 'v_proj'])

    Pass it to ``QATTrainer(..., finetune="lora", lora=...)``, or as a recipe's ``lora:`` keys."""

    r: int = dataclasses.field(default=8, metadata=_help("adapter rank (>= 1)"))
    alpha: int = dataclasses.field(default=16, metadata=_help("scale alpha / r (alpha >= 1)"))
    dropout: float = dataclasses.field(
        default=0.0, metadata=_help("must be 0 (the quantiser sees W + BA)")
    )
    target_modules: list[str] | None = dataclasses.field(
        default=None, metadata=_help("module name endings to adapt; null: every quantised linear")
    )


@dataclasses.dataclass
class DistillArguments:
    """Knowledge distillation from the float model while it trains quantised (``distill:``;
    absent or null: off). The training loss is ``task_loss + weight * distill_loss``."""

    teacher: str = dataclasses.field(
        default="self",
        metadata=_help(
            "self (the float model the run starts from; with LoRA, "
            "the same model with adapters and quantisers off) or a "
            "model folder / Hub id"
        ),
    )
    loss: DistillLoss = dataclasses.field(
        default="kl", metadata=_help("kl (KL(teacher || student)) or jsd (Jensen-Shannon)")
    )
    temperature: float = dataclasses.field(
        default=1.0, metadata=_help("softens both distributions (> 0); the loss is scaled by T^2")
    )
    weight: float = dataclasses.field(
        default=1.0, metadata=_help("multiplies the distillation loss (>= 0)")
    )


@dataclasses.dataclass
class QATArguments:
    """The recipe keys that are not ``TrainingArguments`` fields."""

    model_name_or_path: str | None = dataclasses.field(
        default=None, metadata=_help("required: Hub id, local folder or pkg://package/path")
    )
    task_name: str | None = dataclasses.field(
        default=None, metadata=_help("required: GLUE task (sst2, mnli, ...)")
    )
    gguf_file: str | None = dataclasses.field(
        default=None, metadata=_help("GGUF file inside model_name_or_path to load instead")
    )
    tokenizer_name_or_path: str | None = dataclasses.field(
        default=None, metadata=_help("tokenizer source if not the model's")
    )
    torch_dtype: str | None = dataclasses.field(
        default=None, metadata=_help("dtype to load the weights in (float32, bfloat16, ...)")
    )
    max_length: int = dataclasses.field(
        default=128, metadata=_help("tokens per example (>= 1, within the model's positions)")
    )
    data_dir: str | None = dataclasses.field(
        default=None, metadata=_help("offline GLUE folder (else $QAT_DATA_DIR, else the Hub)")
    )
    max_train_samples: int | None = dataclasses.field(
        default=None, metadata=_help("train on this many rows (>= 1; null: all)")
    )
    max_eval_samples: int | None = dataclasses.field(
        default=None, metadata=_help("evaluate on this many rows (>= 1; null: all)")
    )
    finetune: FinetuneMode = dataclasses.field(
        default="full",
        metadata=_help(
            "what trains: the whole model, LoRA adapters and the head, or the classifier head alone"
        ),
    )
    lora: LoraArguments = dataclasses.field(
        default_factory=LoraArguments,
        metadata=_help("LoRA settings for finetune: lora (r, alpha, dropout, target_modules)"),
    )
    # A mapping in the recipe; QATConfig narrows the type to the QuantConfig it builds.
    quant: dict[str, Any] | None = dataclasses.field(
        default=None,
        metadata=_help(
            "formats per role (weight, activation, matmul), "
            "exclude, overrides, backend; null: float"
        ),
    )
    # A mapping in the recipe; QATConfig builds the QDECConfig (qat.quant.qdec.apply).
    qdec: dict[str, Any] | None = dataclasses.field(
        default=None,
        metadata=_help(
            "QDEC error compensation at inference (k_chunk, "
            "residual_bits, residual_device, prefill); null: off"
        ),
    )
    distill: DistillArguments | None = dataclasses.field(
        default=None,
        metadata=_help(
            "knowledge distillation from the float model (teacher, "
            "loss, temperature, weight); null: off"
        ),
    )
    on_nonfinite: OnNonfinite = dataclasses.field(
        default="stop",
        metadata=_help("on a NaN/inf loss or gradient: stop the run, or skip the step"),
    )
    # Trainer's convention (dropped from TrainingArguments in transformers 5): a new run into a
    # folder that holds a run is refused unless this is true (qat.training.run.check_run_folder).
    overwrite_output_dir: bool = dataclasses.field(
        default=False,
        metadata=_help("start over in a folder that holds a run (deletes its checkpoints)"),
    )
    # --- decoders (task_name causal_lm / chat; qat.tasks.language_modeling, qat.tasks.chat) ---
    dataset_name: str | None = dataclasses.field(
        default=None, metadata=_help("decoders: a Hub dataset; null or 'wikitext': WikiText-2 raw")
    )
    dataset_config: str | None = dataclasses.field(
        default=None, metadata=_help("decoders: the Hub dataset's config name")
    )
    text_column: str = dataclasses.field(
        default="text", metadata=_help("causal_lm: the column holding the text")
    )
    train_file: str | None = dataclasses.field(
        default=None, metadata=_help("decoders: local .txt / .jsonl / .json training data")
    )
    validation_file: str | None = dataclasses.field(
        default=None, metadata=_help("decoders: local evaluation data (with train_file)")
    )
    train_split: str = dataclasses.field(
        default="train", metadata=_help("decoders: the dataset split to train on")
    )
    eval_split: str = dataclasses.field(
        default="validation", metadata=_help("decoders: the dataset split to evaluate on")
    )
    block_size: int = dataclasses.field(
        default=1024,
        metadata=_help("decoders: tokens per training / evaluation chunk (chat: per row, at most)"),
    )
    trainer: Literal["qat", "sft"] = dataclasses.field(
        default="qat",
        metadata=_help(
            "qat (QATTrainer) or sft (TRL's SFTTrainer with qat's quantisers: qat.integrations.trl)"
        ),
    )


# The dataclasses whose fields are recipe keys, and the prefix their keys take.
NESTED_SECTIONS: tuple[tuple[type, str], ...] = (
    (QATArguments, ""),
    (LoraArguments, "lora."),
    (DistillArguments, "distill."),
)


def keys_help() -> str:
    """One line per qat recipe key (``lora``'s and ``distill``'s nested keys dotted): name, type,
    help and default, from the field metadata; for ``qat train --help``."""
    rows = []
    for cls, prefix in NESTED_SECTIONS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "lora":
                continue  # its nested keys follow
            mapping = f.name in ("quant", "qdec", "distill")
            kind = "mapping | None" if mapping else _type_text(hints[f.name])
            shown = "" if f.default in (None, dataclasses.MISSING) else f" [{f.default!r}]"
            rows.append((f"  --{prefix}{f.name} {kind}", f.metadata["help"] + shown))
    pad = max(len(left) for left, _ in rows) + 2
    return "\n".join(
        textwrap.fill(text, 100, initial_indent=f"{left:<{pad}}", subsequent_indent=" " * pad)
        for left, text in rows
    )


def _type_text(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "|".join(map(str, typing.get_args(annotation)))
    if isinstance(annotation, type) and typing.get_origin(annotation) is None:
        return annotation.__name__
    return str(annotation).replace("typing.", "")
