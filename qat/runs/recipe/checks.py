"""A recipe's values checked before ``TrainingArguments.__post_init__`` runs, so that a value
that would fail later (or silently do nothing) is one ``RecipeError`` line naming its key,
before any model loads: qat's keys (``check_qat_values``, ``check_decoder_values``) and
Trainer's (``check_training_values``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from transformers import TrainingArguments

from qat.errors import check_one_of
from qat.runs.recipe.arguments import FINETUNE_MODES, ON_NONFINITE
from qat.runs.recipe.text import RecipeError
from qat.tasks.glue import GLUE_TASKS
from qat.tasks.registry import DECODER_TASKS, get_task

# What a recipe must name: the model and the task (a trainer handed its model and data in
# Python needs neither, so QATConfig itself does not demand them).
RECIPE_REQUIRED = ("model_name_or_path", "task_name")


def check_recipe_required(values: Any) -> None:
    """A recipe (a mapping, or the config built from one) names its model and task."""
    get = values.get if isinstance(values, dict) else lambda key: getattr(values, key, None)
    for req in RECIPE_REQUIRED:
        if not get(req):
            raise RecipeError(f"recipe key {req!r} is required")


def check_qat_values(cfg: Any) -> None:
    """qat's own keys: allowed values, the task (when named) and its combinations."""
    check_one_of("finetune", cfg.finetune, FINETUNE_MODES, RecipeError)
    if cfg.on_nonfinite not in ON_NONFINITE:
        raise RecipeError(f"on_nonfinite must be 'stop' or 'skip'; got {cfg.on_nonfinite!r}")
    for key in ("max_length", "max_train_samples", "max_eval_samples"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            rule = ">= 1" if key == "max_length" else ">= 1 (or null for every row)"
            raise RecipeError(f"{key} must be {rule}, got {value!r}")
    task = None if cfg.task_name is None else get_task(cfg.task_name, RecipeError)
    if cfg.distill is not None and task is not None and task.num_labels == 1:
        raise RecipeError(
            f"distill needs class probabilities; task_name "
            f"{cfg.task_name} is a regression (one output, whose softmax "
            "is always 1): drop the distill section"
        )
    check_quant_training(cfg)
    check_decoder_values(cfg)


def check_quant_training(cfg: Any) -> None:
    """Quant options that need the weights to train, or the task's train rows."""

    gptq = None if cfg.quant is None else cfg.quant.gptq_spec
    # no task_name: a trainer's config, whose model is handed over (QATTrainer decides)
    if gptq is not None and cfg.task_name not in (None, "causal_lm", *GLUE_TASKS):
        raise RecipeError(
            f"quant.gptq calibrates on the train split of task_name causal_lm or a GLUE task; "
            f"task_name is {cfg.task_name!r}"
        )
    fused = None if cfg.quant is None else cfg.quant.fused_rotation
    if fused and fused["learned"] and cfg.finetune != "full":
        why = (
            "only the classification head trains"
            if cfg.finetune == "classifier"
            else "the adapter holds only the LoRA weights"
        )
        raise RecipeError(
            f"quant.rotation.learned trains rotations and smoothing scales, which finetune "
            f"{cfg.finetune} cannot ({why}); use finetune: full, or drop "
            "quant.rotation.learned"
        )


def check_decoder_values(cfg: Any) -> None:
    """The decoder keys (a decoder task_name: causal_lm, chat): values, and combinations that
    cannot work."""
    if cfg.block_size < 2:
        raise RecipeError(f"block_size must be >= 2, got {cfg.block_size!r}")
    if cfg.trainer not in ("qat", "sft"):
        raise RecipeError(f"trainer must be 'qat' or 'sft'; got {cfg.trainer!r}")
    if not cfg.text_column:
        raise RecipeError(f"text_column must name a column, got {cfg.text_column!r}")
    task = None if cfg.task_name is None else get_task(cfg.task_name, RecipeError)
    if task is None or not task.is_decoder:
        if cfg.trainer != "qat" and task is not None:
            raise RecipeError(
                f"trainer {cfg.trainer!r} needs task_name {' or '.join(DECODER_TASKS)}, "
                f"not {cfg.task_name!r}"
            )
        return
    if task.default_dataset is None and not (cfg.dataset_name or cfg.train_file):
        raise RecipeError(
            f"task_name {task.name} needs dataset_name or train_file ({task.data_hint})"
        )
    if bool(cfg.train_file) != bool(cfg.validation_file):
        raise RecipeError(
            "train_file and validation_file go together (got only "
            f"{'train_file' if cfg.train_file else 'validation_file'}); "
            "give both, or neither and a dataset_name"
        )
    if cfg.finetune == "classifier":
        raise RecipeError(
            "finetune classifier trains a classification head, which "
            f"task_name {cfg.task_name} has none of; use full or lora"
        )


def check_training_values(cfg: TrainingArguments) -> None:
    """Values TrainingArguments accepts but that fail (or silently do nothing) later: checked
    before its own ``__post_init__`` so the error names the key before any model is loaded."""

    def get(key: str) -> Any:
        return getattr(cfg, key)

    def bad(key: str, rule: str) -> RecipeError:
        return RecipeError(f"{key} must be {rule}, got {get(key)!r}")

    for field in dataclasses.fields(cfg):
        if field.init and isinstance(get(field.name), float) and math.isnan(get(field.name)):
            raise bad(field.name, "a number")
    lr = get("learning_rate")
    if not (0 <= lr < math.inf):
        raise bad("learning_rate", "finite and >= 0")
    for key in (
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
    ):
        if get(key) < 1:
            raise bad(key, ">= 1")
    for key in ("seed", "data_seed"):
        if get(key) is not None and not 0 <= get(key) < 2**32:
            raise bad(key, "in [0, 2**32) (numpy's seed range)")
    max_steps, epochs = get("max_steps"), get("num_train_epochs")
    if max_steps == 0 or max_steps < -1:
        raise bad("max_steps", ">= 1, or -1 to train for num_train_epochs")
    if max_steps < 0 and not (0 < epochs < math.inf):
        raise RecipeError(
            f"num_train_epochs must be > 0 and finite when max_steps is not set, got {epochs!r}"
        )
    if get("warmup_steps") is not None and get("warmup_steps") < 0:
        raise bad("warmup_steps", ">= 0")
    for key in ("eval_accumulation_steps", "save_total_limit"):
        if get(key) is not None and get(key) < 1:
            raise bad(key, ">= 1 (or null)")
    if get("dataloader_num_workers") < 0:
        raise bad("dataloader_num_workers", ">= 0")
    for key in ("adam_beta1", "adam_beta2", "label_smoothing_factor"):
        if not 0 <= get(key) < 1:
            raise bad(key, "in [0, 1)")
    if not 0 <= get("adam_epsilon") < math.inf:
        raise bad("adam_epsilon", "finite and >= 0")
    strategies = {
        "logging_steps": "logging_strategy",
        "save_steps": "save_strategy",
        "eval_steps": "eval_strategy",
    }
    for key, strategy in strategies.items():
        if (
            str(get(strategy)).lower().endswith("steps")
            and get(key) is not None
            and not get(key) > 0
        ):
            raise RecipeError(f"{key} must be > 0 when {strategy} is 'steps', got {get(key)!r}")
