"""Fine-tune a model on a GLUE task from a recipe, with block-quantisation-aware training.

    accelerate launch qat/train.py recipes/opt350m_sst2.yaml [--key value ...]
    python qat/train.py recipes/minilm_sst2.yaml --max_steps 200 --quant.weight.width 6
    qat train recipes/minilm_sst2.yaml --quant null
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script: Python put qat/ itself first on sys.path; use the repo root instead
    # so `import qat` finds the package and no module here shadows a library.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import logging  # noqa: E402
import os  # noqa: E402

USAGE = """usage: qat train RECIPE.yaml [--key value ...]

Keys are recipe keys (see README); nested keys take dots: --quant.weight.width 6.
--quant null trains in float. Any transformers.TrainingArguments field works by its name."""

logger = logging.getLogger("qat.train")


class UserError(Exception):
    """Bad input found before training: printed as one clear line, exit code 2."""


def check_output_dir(path: str) -> None:
    """Fail before loading anything if ``output_dir`` cannot be created or written (a file in
    the way, no permission, a read-only file system); creates nothing."""
    import tempfile

    p = Path(path).expanduser()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"output_dir {path!r} is not writable: {str(probe)!r} is a file, "
                        "not a folder")
    if not os.access(probe, os.W_OK):
        raise UserError(f"output_dir {path!r} is not writable ({str(probe)!r})")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UserError(f"output_dir {path!r} is not writable ({str(probe)!r}: "
                        f"{e.strerror})") from None


def apply_checkpoint_state(recipe, checkpoint: str) -> None:
    """On resume, the checkpoint's quant config, mode and LoRA settings win over the recipe."""
    from qat.quant_config import QuantConfig
    from qat.recipe import LoraArguments
    from qat.trainer import read_qat_config

    state = read_qat_config(checkpoint)
    args = recipe.args
    quant = QuantConfig.from_dict(state["quant"])
    if (None if quant is None else quant.to_dict()) != (
            None if args.quant is None else args.quant.to_dict()) or state["finetune"] != \
            args.finetune:
        logger.warning("resuming from %s: using its quant config and finetune mode (%s), "
                       "not the recipe's", checkpoint, state["finetune"])
    args.quant, args.finetune = quant, state["finetune"]
    if state.get("lora"):
        args.lora = LoraArguments(**state["lora"])


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` that was written to the end.

    Trainer writes ``trainer_state.json`` last, so a job killed while saving leaves a folder
    without it (or with a truncated one); such folders are skipped with a warning.
    """
    import json

    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        step = name[len(PREFIX_CHECKPOINT_DIR) + 1:]
        if name.startswith(PREFIX_CHECKPOINT_DIR + "-") and step.isdigit():
            found.append((int(step), os.path.join(output_dir, name)))
    for _, path in sorted(found, reverse=True):
        try:
            json.loads(Path(path, "trainer_state.json").read_text())
            return path
        except (OSError, ValueError):
            logger.warning("skipping incomplete checkpoint %s (no readable trainer_state.json; "
                           "the job was probably killed while saving it)", path)
    return None


def resolve_resume(recipe) -> str | None:
    """``resume_from_checkpoint``: a path, or true/"last" for the newest complete checkpoint."""
    value = recipe.training_args.resume_from_checkpoint
    if value in (None, False, "false", "False", ""):
        return None
    if value in (True, "true", "True", "last", "auto"):
        out = recipe.training_args.output_dir
        last = last_complete_checkpoint(out)
        if last is None:
            logger.warning("resume requested but %s holds no checkpoint: starting fresh", out)
        return last
    if not os.path.isdir(value):
        raise UserError(f"resume_from_checkpoint {value!r} does not exist")
    return value


def run(recipe) -> dict:
    """Train and evaluate as ``recipe`` says; returns the final metrics."""
    from transformers import DataCollatorWithPadding, set_seed

    from qat.glue import get_task, load_glue, tokenize_glue
    from qat.models import load_sequence_classifier, load_tokenizer
    from qat.trainer import QATTrainer

    args, targs = recipe.args, recipe.training_args
    check_output_dir(targs.output_dir)
    checkpoint = resolve_resume(recipe)
    if checkpoint:
        apply_checkpoint_state(recipe, checkpoint)
    set_seed(targs.seed)
    task = get_task(args.task_name)
    raw = load_glue(task.name, args.data_dir)
    tok_name = args.tokenizer_name_or_path or args.model_name_or_path
    tokenizer = load_tokenizer(tok_name, None if args.tokenizer_name_or_path else args.gguf_file)
    model = load_sequence_classifier(args.model_name_or_path, task.num_labels, args.gguf_file,
                                     args.torch_dtype, pad_token_id=tokenizer.pad_token_id,
                                     id2label=task.id2label)
    with targs.main_process_first(desc="tokenising"):
        data = tokenize_glue(raw, task, tokenizer, args.max_length)
    train = data["train"]
    if args.max_train_samples:
        train = train.shuffle(seed=targs.seed).select(range(min(args.max_train_samples,
                                                                len(train))))
    evals = {s: data[s] for s in task.validation_splits}
    if args.max_eval_samples:
        evals = {s: d.select(range(min(args.max_eval_samples, len(d)))) for s, d in evals.items()}
    eval_dataset = evals if len(evals) > 1 else next(iter(evals.values()))
    trainer = QATTrainer(
        model=model, args=targs, quant_config=args.quant, finetune=args.finetune,
        lora=args.lora, on_nonfinite=args.on_nonfinite, train_dataset=train,
        eval_dataset=eval_dataset,
        processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=task.trainer_metrics,
    )
    metrics: dict = {}
    if targs.do_train or not targs.do_eval:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        metrics.update(result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    eval_metrics = trainer.evaluate()
    trainer.save_metrics("eval", eval_metrics)
    metrics.update(eval_metrics)
    if trainer.args.should_save:
        recipe.save(targs.output_dir)
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    from qat.glue import DataError
    from qat.models import ModelLoadError
    from qat.nonfinite import NonFiniteError
    from qat.quant_config import QuantConfigError
    from qat.recipe import RecipeError, load_recipe

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO)
    try:
        recipe = load_recipe(argv[0], argv[1:])
        metrics = run(recipe)
    except (RecipeError, QuantConfigError, DataError, ModelLoadError, UserError,
            FileNotFoundError) as e:
        print(f"qat train: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"qat train: error: {e}", file=sys.stderr)
        return 1
    summary = {k: v for k, v in metrics.items() if k.startswith("eval_") and "runtime" not in k
               and "per_second" not in k}
    print("qat train: done;", ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
