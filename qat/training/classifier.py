"""The train loop for GLUE classifiers, called by ``qat.training.run`` after its output-folder
and resume checks.

Order: cheap checks against the model's config (LoRA targets, the teacher), the data read and
subset, then the model, then tokenising; the shared end (``qat.training.loop``) trains,
evaluates and saves.
"""

from __future__ import annotations

from typing import Any

from qat.models import linear_module_names, preflight
from qat.quant.lora import check_target_modules
from qat.runs.build import build_model
from qat.tasks.glue import get_task, glue_splits
from qat.training.loop import train_and_evaluate
from qat.training.teacher import check_distill
from qat.training.trainer import QATTrainer


def train_classifier(recipe: Any, checkpoint: str | None) -> dict:
    """Train and evaluate a sequence classifier on the recipe's GLUE task; returns the
    metrics."""
    from transformers import DataCollatorWithPadding, set_seed

    args = recipe.args
    set_seed(args.seed)
    task = get_task(args.task_name)
    config = preflight(args)  # cheap checks against the model's config, before any loading
    if config is not None and args.finetune == "lora" and args.lora.target_modules:
        names = linear_module_names(config, task.num_labels)
        if names is not None:
            check_target_modules(names, args.lora.target_modules)
    check_distill(
        args.distill,
        config,
        causal=False,
        num_labels=task.num_labels,
        finetune=args.finetune,
        gguf=(args.model_name_or_path, args.gguf_file) if args.gguf_file else None,
    )  # the teacher's config too, before any weights
    raw = glue_splits(
        task,
        args.data_dir,
        train_samples=args.max_train_samples,
        eval_samples=args.max_eval_samples,
        seed=args.seed,
    )
    # quantised here (QATTrainer leaves a quantised model as it is); on resume the Trainer
    # restores the weights and the adapter, the recipe already holds the checkpoint's settings
    built = build_model(  # GGUF: checked before tokenising; a resumed run needs no GPTQ
        recipe, num_labels=task.num_labels, round_gptq=checkpoint is None
    )
    model, tokenizer = built.model, built.tokenizer
    with args.main_process_first(desc="tokenising"):
        data = raw.tokenize(tokenizer, args.max_length)
    train = data["train"]
    evals = {s: data[s] for s in task.validation_splits}
    eval_dataset = evals if len(evals) > 1 else next(iter(evals.values()))
    trainer = QATTrainer(
        model=model,
        args=args,  # a QATConfig: the trainer reads quant, finetune, lora, ... from it
        train_dataset=train,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=task.trainer_metrics,
    )
    return train_and_evaluate(trainer, recipe, checkpoint)
