"""The train loop behind ``qat train``: output folder and resume checks, then load, quantise,
tokenise, train with ``QATTrainer``, evaluate and save (command: ``qat.cli.train``)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qat.errors import UsageError
from qat.runs.checkpoints import check_output_dir  # noqa: F401 - re-used by qat.cli.train
from qat.tasks.language_modeling import LM_TASKS

logger = logging.getLogger("qat.training.run")


def check_fsdp_device(targs) -> None:
    """accelerate enables FSDP only on accelerator devices: on the CPU (MULTI_CPU) it drops
    the FSDP plugin without a word and trains as DDP, so an FSDP recipe on the CPU is refused
    rather than run as something else."""
    if getattr(targs, "fsdp_plugin_args", None) is not None and targs.device.type == "cpu":
        raise UsageError("recipe key fsdp needs GPUs: on the CPU accelerate silently trains "
                        "without FSDP (as DDP); drop the fsdp keys or run on GPUs")


def apply_checkpoint_state(recipe, checkpoint: str) -> None:
    """On resume, what the checkpoint overrides (``qat.runs.build.checkpoint_overrides``: its
    quant config, mode and LoRA settings) wins over the recipe, with a warning when they differ.
    The weights stay the Trainer's to restore."""
    from qat.quant.config import QuantConfig
    from qat.runs.build import checkpoint_overrides
    from qat.runs.checkpoints import read_qat_config
    from qat.runs.recipe import LoraArguments

    keys = checkpoint_overrides(read_qat_config(checkpoint))
    args = recipe.args
    quant = QuantConfig.from_dict(keys["quant"])
    if (None if quant is None else quant.to_dict()) != (
            None if args.quant is None else args.quant.to_dict()) or keys["finetune"] != \
            args.finetune:
        logger.warning("resuming from %s: using its quant config and finetune mode (%s), "
                       "not the recipe's", checkpoint, keys["finetune"])
    args.quant, args.finetune = quant, keys["finetune"]
    if "lora" in keys:
        args.lora = LoraArguments(**keys["lora"])


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` whose every file a resume needs exists and
    reads (``qat.runs.checkpoints.verify_checkpoint``); newer damaged ones are skipped with a
    warning naming the file and what is wrong with it."""
    from qat.runs.checkpoints import last_good_checkpoint

    return last_good_checkpoint(output_dir)


def _wants_resume(recipe) -> bool:
    return recipe.training_args.resume_from_checkpoint not in (None, False, "false", "False", "")


def resolve_resume(recipe) -> str | None:
    """``resume_from_checkpoint``: a path, or true/"last" for the newest good checkpoint."""
    from qat.runs.checkpoints import checkpoints, holds_run, verify_checkpoint

    value = recipe.training_args.resume_from_checkpoint
    if not _wants_resume(recipe):
        return None
    if value in (True, "true", "True", "last", "auto"):
        out = recipe.training_args.output_dir
        last = last_complete_checkpoint(out)
        if last is None:
            found = holds_run(out)
            if found:  # starting fresh would overwrite the run that is there
                what = (f"none of its {len(checkpoints(out))} checkpoints is complete (see the "
                        "warnings above)" if checkpoints(out) else "no checkpoint")
                raise UsageError(f"resume_from_checkpoint: output_dir {out!r} holds a run "
                                f"({', '.join(found)}) but {what}; start over with "
                                "--overwrite_output_dir true")
            logger.warning("resume requested but %s holds no checkpoint: starting fresh", out)
        return last
    if not os.path.exists(value):
        raise UsageError(f"resume_from_checkpoint {value!r} does not exist")
    if not os.path.isdir(value):
        raise UsageError(f"resume_from_checkpoint {value!r} is a file, not a checkpoint folder")
    verify_checkpoint(value)  # CheckpointError: one line naming the damaged file
    return value


def check_run_folder(recipe, checkpoint: str | None) -> None:
    """Trainer's old ``overwrite_output_dir`` convention: a new run into a folder that holds a
    run is refused (say how to resume or overwrite); resuming a checkpoint of that folder is
    not a new run. Checked on every rank before anything is written."""
    from qat.runs.checkpoints import holds_run

    out = recipe.training_args.output_dir
    check_model_outside(recipe)
    found = holds_run(out)
    if not found:
        return
    inside = checkpoint is not None and Path(checkpoint).resolve().parent == Path(out).resolve()
    if inside and recipe.args.overwrite_output_dir:
        raise UsageError("resume_from_checkpoint and overwrite_output_dir are both set: "
                        f"overwriting {out!r} would delete {checkpoint!r}, the checkpoint to "
                        "resume; drop one of them")
    if inside or recipe.args.overwrite_output_dir:
        return
    raise UsageError(f"output_dir {out!r} already holds a run ({', '.join(found)}); resume it "
                    "with --resume_from_checkpoint true, or start over with "
                    "--overwrite_output_dir true (deletes its checkpoints)")


def check_model_outside(recipe) -> None:
    """``overwrite_output_dir`` deletes the old run: refuse when the model (or tokenizer) to
    fine-tune lies inside that folder, which would delete the input of this very run."""
    if not recipe.args.overwrite_output_dir:
        return
    out = Path(recipe.training_args.output_dir).expanduser().resolve()
    for key in ("model_name_or_path", "tokenizer_name_or_path"):
        value = getattr(recipe.args, key, None)
        if not value or not Path(value).expanduser().exists():
            continue  # a Hub name
        p = Path(value).expanduser().resolve()
        if p == out or out in p.parents:
            raise UsageError(f"{key} {value!r} lies inside output_dir {str(out)!r}, which "
                             "overwrite_output_dir would delete; write the new run to another "
                             "output_dir")


def clear_old_run(recipe, checkpoint: str | None) -> None:
    """``overwrite_output_dir``: remove the old run, only once the model and data of the new
    one have loaded (bad input found before this leaves the old run as it was)."""
    from qat.runs.checkpoints import clear_run

    targs = recipe.training_args
    if checkpoint or not recipe.args.overwrite_output_dir or targs.process_index != 0:
        return
    removed = clear_run(targs.output_dir)
    if removed:
        logger.warning("overwrite_output_dir: removed the old run's %s", ", ".join(removed))


def run(recipe, trainer_cls=None) -> dict:
    """Train and evaluate as ``recipe`` says; returns the final metrics. ``trainer_cls``
    replaces ``QATTrainer`` for decoder tasks (``trainer: sft`` passes TRL's, from above)."""
    targs = recipe.training_args
    check_output_dir(targs.output_dir)
    check_fsdp_device(targs)
    with _run_lock(recipe):  # a second run into the folder fails here, before reading it
        _remove_stale_temps(targs)
        checkpoint = resolve_resume(recipe)
        check_run_folder(recipe, checkpoint)
        if checkpoint:
            apply_checkpoint_state(recipe, checkpoint)
        if recipe.args.task_name in LM_TASKS:  # decoders: their own loop
            from qat.training.causal_lm import train_decoder

            return train_decoder(recipe, checkpoint, trainer_cls)
        return _train(recipe, checkpoint)


def _remove_stale_temps(targs) -> None:
    """What saves killed half-way left (we hold the lock: no save of ours is running)."""
    from qat.runs.checkpoints import remove_stale_temps

    if targs.process_index == 0:
        removed = remove_stale_temps(targs.output_dir)
        if removed:
            logger.warning("removed %d temporary file(s) of an interrupted save: %s",
                           len(removed), ", ".join(removed))


def checksum_callback():
    """A ``TrainerCallback`` that records every saved checkpoint's checksums once the whole
    checkpoint is written (``qat.runs.checkpoints.write_checksums``; verified on resume)."""
    from transformers import TrainerCallback

    from qat.runs.checkpoints import CHECKPOINT_PREFIX, write_checksums

    class ChecksumOnSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if args.world_size > 1:  # every rank's shards are written first
                from accelerate import PartialState

                PartialState().wait_for_everyone()
            folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                write_checksums(folder)

    return ChecksumOnSave()


@contextlib.contextmanager
def _run_lock(recipe) -> Iterator[None]:
    """Hold ``output_dir``'s lock file (process 0 only) for the whole run."""
    from qat.runs.checkpoints import RunLock

    targs = recipe.training_args
    if targs.process_index != 0:
        yield
        return
    created = not os.path.exists(targs.output_dir)
    lock = RunLock(targs.output_dir)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
        if created and os.path.isdir(targs.output_dir) and not os.listdir(targs.output_dir):
            os.rmdir(targs.output_dir)  # failed before writing anything: leave no trace


def _train(recipe, checkpoint: str | None) -> dict:
    from transformers import DataCollatorWithPadding, set_seed

    from qat.models import linear_module_names, preflight
    from qat.quant.lora import check_target_modules
    from qat.runs.build import build_model
    from qat.tasks.glue import get_task, load_glue, tokenize_glue
    from qat.training.teacher import check_distill
    from qat.training.trainer import QATTrainer

    args, targs = recipe.args, recipe.training_args
    set_seed(targs.seed)
    task = get_task(args.task_name)
    config = preflight(args)  # cheap checks against the model's config, before any loading
    if config is not None and args.finetune == "lora" and args.lora.target_modules:
        names = linear_module_names(config, task.num_labels)
        if names is not None:
            check_target_modules(names, args.lora.target_modules)
    check_distill(args.distill, config, causal=False, num_labels=task.num_labels,
                  finetune=args.finetune)  # the teacher's config too, before any weights
    raw = load_glue(task.name, args.data_dir)
    # Subset before tokenising (same rows as shuffling the tokenised set: the permutation
    # depends only on the seed and the length), so 64 rows of SST-2 tokenise 64 rows.
    if args.max_train_samples:
        raw["train"] = raw["train"].shuffle(seed=targs.seed).select(
            range(min(args.max_train_samples, len(raw["train"]))))
    if args.max_eval_samples:
        for s in task.validation_splits:
            raw[s] = raw[s].select(range(min(args.max_eval_samples, len(raw[s]))))
    # quantised here (QATTrainer leaves a quantised model as it is); on resume the Trainer
    # restores the weights and the adapter, the recipe already holds the checkpoint's settings
    built = build_model(recipe, num_labels=task.num_labels)  # GGUF: checked before tokenising
    model, tokenizer = built.model, built.tokenizer
    with targs.main_process_first(desc="tokenising"):
        data = tokenize_glue(raw, task, tokenizer, args.max_length)
    train = data["train"]
    evals = {s: data[s] for s in task.validation_splits}
    eval_dataset = evals if len(evals) > 1 else next(iter(evals.values()))
    trainer = QATTrainer(
        model=model, args=targs, quant_config=args.quant, finetune=args.finetune,
        lora=args.lora, on_nonfinite=args.on_nonfinite, distill=args.distill,
        train_dataset=train, eval_dataset=eval_dataset,
        processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=task.trainer_metrics,
    )
    return train_and_evaluate(trainer, recipe, checkpoint)


def train_and_evaluate(trainer, recipe, checkpoint: str | None,
                       add_eval: Callable[[dict], dict] | None = None) -> dict:
    """What every train loop ends with: train (unless only evaluating) and save the model,
    metrics and state; evaluate (``add_eval`` adds derived metrics, e.g. perplexity); save the
    resolved recipe. Returns the train and eval metrics."""
    targs = recipe.training_args
    clear_old_run(recipe, checkpoint)  # every check passed, model and data loaded
    trainer.add_callback(checksum_callback())
    metrics: dict = {}
    if targs.do_train or not targs.do_eval:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        metrics.update(result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    eval_metrics = trainer.evaluate()
    if add_eval is not None:
        extra = add_eval(eval_metrics)
        eval_metrics.update(extra)
        trainer.log(extra)
    trainer.save_metrics("eval", eval_metrics)
    metrics.update(eval_metrics)
    if trainer.args.should_save:
        # A saved recipe that says "overwrite" would let a rerun wipe this run unasked.
        recipe.resolved.pop("overwrite_output_dir", None)
        recipe.save(targs.output_dir)
    return metrics


def train(recipe: Any, overrides: list[str] | dict[str, Any] | None = None) -> dict:
    """Run a recipe end to end, as ``qat train RECIPE [--key value ...]`` does: the run folder
    checks, training, evaluation and the saved model; returns the final metrics.

    ``recipe``: a recipe file or a ``Recipe``; ``overrides``: recipe keys, as command-line
    tokens or a mapping.

    >>> import qat
    >>> metrics = qat.train("recipes/minilm_sst2.yaml",
    ...                     {"max_steps": 2, "max_train_samples": 16, "max_eval_samples": 8,
    ...                      "output_dir": str(tmp_path / "run"), "use_cpu": True})
    >>> sorted(k for k in metrics if k.startswith("eval_"))[:2]
    ['eval_accuracy', 'eval_loss']
    """
    from qat.runs.recipe import Recipe, load_recipe

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise TypeError("overrides apply to a recipe file; a Recipe is already resolved")
    return run(recipe)
