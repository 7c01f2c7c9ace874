"""What every train loop shares (``qat.training.classifier`` for GLUE,
``qat.training.causal_lm`` for decoders): the end: clear an old run once everything has
loaded, train, save, evaluate, and record each saved checkpoint's checksums. (The trainers
read the recipe's qat keys from ``args``, the recipe's ``QATConfig``.)"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from qat.runs.checkpoints import write_checksums
from qat.runs.folders import CHECKPOINT_PREFIX, clear_run

logger = logging.getLogger(__name__)


def clear_old_run(recipe, checkpoint: str | None) -> None:
    """``overwrite_output_dir``: remove the old run, only once the model and data of the new
    one have loaded (bad input found before this leaves the old run as it was)."""

    args = recipe.args
    if checkpoint or not args.overwrite_output_dir or args.process_index != 0:
        return
    removed = clear_run(args.output_dir)
    if removed:
        logger.warning("overwrite_output_dir: removed the old run's %s", ", ".join(removed))


def checksum_callback():
    """A ``TrainerCallback`` that records every saved checkpoint's checksums once the whole
    checkpoint is written (``qat.runs.checkpoints.write_checksums``; verified on resume)."""
    from transformers import TrainerCallback

    class ChecksumOnSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if args.world_size > 1:  # every rank's shards are written first
                from accelerate import PartialState

                PartialState().wait_for_everyone()
            folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                write_checksums(folder)

    return ChecksumOnSave()


def train_and_evaluate(
    trainer, recipe, checkpoint: str | None, add_eval: Callable[[dict], dict] | None = None
) -> dict:
    """What every train loop ends with: train (unless only evaluating) and save the model,
    metrics and state; evaluate (``add_eval`` adds derived metrics, e.g. perplexity); save the
    resolved recipe. Returns the train and eval metrics."""
    args = recipe.args
    clear_old_run(recipe, checkpoint)  # every check passed, model and data loaded
    trainer.add_callback(checksum_callback())
    metrics: dict = {}
    if args.do_train or not args.do_eval:
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
        recipe.save(args.output_dir)
    return metrics
