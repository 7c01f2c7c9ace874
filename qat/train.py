"""Fine-tune a model on a GLUE task from a recipe, with block-quantisation-aware training.

    accelerate launch qat/train.py recipes/opt350m_sst2.yaml [--key value ...]
    qat train recipes/opt350m_sst2.yaml --launch launch/fsdp.yaml   # checked first; exit 2
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

import contextlib  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
from collections.abc import Iterator  # noqa: E402

USAGE = """usage: qat train RECIPE.yaml [--key value ...] [--launch ACCELERATE_CONFIG.yaml]

Keys are recipe keys (see README); nested keys take dots: --quant.weight.width 6.
--quant null trains in float. Any transformers.TrainingArguments field works by its name.
--overwrite_output_dir true starts over in a folder that holds a run (deletes its checkpoints);
--resume_from_checkpoint true resumes its newest good checkpoint.
--launch CONFIG checks the recipe here, then runs `accelerate launch --config_file CONFIG`;
bad input exits 2 with one line (plain `accelerate launch` exits 1 and adds a traceback)."""

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


def check_fsdp_device(targs) -> None:
    """accelerate enables FSDP only on accelerator devices: on the CPU (MULTI_CPU) it drops
    the FSDP plugin without a word and trains as DDP, so an FSDP recipe on the CPU is refused
    rather than run as something else."""
    if getattr(targs, "fsdp_plugin_args", None) is not None and targs.device.type == "cpu":
        raise UserError("recipe key fsdp needs GPUs: on the CPU accelerate silently trains "
                        "without FSDP (as DDP); drop the fsdp keys or run on GPUs")


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
    """The newest ``checkpoint-N`` in ``output_dir`` whose every file a resume needs exists and
    reads (``qat.checkpoints.verify_checkpoint``); newer damaged ones are skipped with a
    warning naming the file and what is wrong with it."""
    from qat.checkpoints import last_good_checkpoint

    return last_good_checkpoint(output_dir)


def _wants_resume(recipe) -> bool:
    return recipe.training_args.resume_from_checkpoint not in (None, False, "false", "False", "")


def resolve_resume(recipe) -> str | None:
    """``resume_from_checkpoint``: a path, or true/"last" for the newest good checkpoint."""
    from qat.checkpoints import checkpoints, holds_run, verify_checkpoint

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
                raise UserError(f"resume_from_checkpoint: output_dir {out!r} holds a run "
                                f"({', '.join(found)}) but {what}; start over with "
                                "--overwrite_output_dir true")
            logger.warning("resume requested but %s holds no checkpoint: starting fresh", out)
        return last
    if not os.path.exists(value):
        raise UserError(f"resume_from_checkpoint {value!r} does not exist")
    if not os.path.isdir(value):
        raise UserError(f"resume_from_checkpoint {value!r} is a file, not a checkpoint folder")
    verify_checkpoint(value)  # CheckpointError: one line naming the damaged file
    return value


def check_run_folder(recipe, checkpoint: str | None) -> None:
    """Trainer's old ``overwrite_output_dir`` convention: a new run into a folder that holds a
    run is refused (say how to resume or overwrite); resuming a checkpoint of that folder is
    not a new run. Checked on every rank before anything is written."""
    from qat.checkpoints import holds_run

    out = recipe.training_args.output_dir
    found = holds_run(out)
    if not found:
        return
    inside = checkpoint is not None and Path(checkpoint).resolve().parent == Path(out).resolve()
    if inside and recipe.args.overwrite_output_dir:
        raise UserError("resume_from_checkpoint and overwrite_output_dir are both set: "
                        f"overwriting {out!r} would delete {checkpoint!r}, the checkpoint to "
                        "resume; drop one of them")
    if inside or recipe.args.overwrite_output_dir:
        return
    raise UserError(f"output_dir {out!r} already holds a run ({', '.join(found)}); resume it "
                    "with --resume_from_checkpoint true, or start over with "
                    "--overwrite_output_dir true (deletes its checkpoints)")


def run(recipe) -> dict:
    """Train and evaluate as ``recipe`` says; returns the final metrics."""
    from qat.checkpoints import clear_run

    targs = recipe.training_args
    check_output_dir(targs.output_dir)
    check_fsdp_device(targs)
    with _run_lock(recipe):  # a second run into the folder fails here, before reading it
        checkpoint = resolve_resume(recipe)
        check_run_folder(recipe, checkpoint)
        if checkpoint:
            apply_checkpoint_state(recipe, checkpoint)
        elif recipe.args.overwrite_output_dir and targs.process_index == 0:
            removed = clear_run(targs.output_dir)
            if removed:
                logger.warning("overwrite_output_dir: removed the old run's %s",
                               ", ".join(removed))
        return _train(recipe, checkpoint)


@contextlib.contextmanager
def _run_lock(recipe) -> Iterator[None]:
    """Hold ``output_dir``'s lock file (process 0 only) for the whole run."""
    from qat.checkpoints import RunLock

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

    from qat.glue import get_task, load_glue, tokenize_glue
    from qat.lora import check_target_modules
    from qat.models import (
        check_max_length,
        linear_module_names,
        load_sequence_classifier,
        load_tokenizer,
        preflight,
    )
    from qat.trainer import QATTrainer

    args, targs = recipe.args, recipe.training_args
    set_seed(targs.seed)
    task = get_task(args.task_name)
    config = preflight(args)  # cheap checks against the model's config, before any loading
    if config is not None and args.finetune == "lora" and args.lora.target_modules:
        names = linear_module_names(config, task.num_labels)
        if names is not None:
            check_target_modules(names, args.lora.target_modules)
    raw = load_glue(task.name, args.data_dir)
    # Subset before tokenising (same rows as shuffling the tokenised set: the permutation
    # depends only on the seed and the length), so 64 rows of SST-2 tokenise 64 rows.
    if args.max_train_samples:
        raw["train"] = raw["train"].shuffle(seed=targs.seed).select(
            range(min(args.max_train_samples, len(raw["train"]))))
    if args.max_eval_samples:
        for s in task.validation_splits:
            raw[s] = raw[s].select(range(min(args.max_eval_samples, len(raw[s]))))
    tok_name = args.tokenizer_name_or_path or args.model_name_or_path
    tokenizer = load_tokenizer(tok_name, None if args.tokenizer_name_or_path else args.gguf_file)
    model = load_sequence_classifier(args.model_name_or_path, task.num_labels, args.gguf_file,
                                     args.torch_dtype, pad_token_id=tokenizer.pad_token_id,
                                     id2label=task.id2label)
    if config is None:  # GGUF: its config is known only now, still before tokenising
        check_max_length(model.config, args.max_length, args.model_name_or_path)
    with targs.main_process_first(desc="tokenising"):
        data = tokenize_glue(raw, task, tokenizer, args.max_length)
    train = data["train"]
    evals = {s: data[s] for s in task.validation_splits}
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
        # A saved recipe that says "overwrite" would let a rerun wipe this run unasked.
        recipe.resolved.pop("overwrite_output_dir", None)
        recipe.save(targs.output_dir)
    return metrics


STATUS_ENV = "QAT_STATUS_FILE"


def launch(config: str, argv: list[str]) -> int:
    """``qat train RECIPE --launch CONFIG``: check the recipe, output_dir and checkpoint here
    (one line, exit 2, no process started), then ``accelerate launch --config_file CONFIG``
    this script. accelerate turns any failed child into exit 1 plus a CalledProcessError
    traceback; ``--quiet`` drops the traceback and the child's own status, written to
    ``$QAT_STATUS_FILE``, becomes the exit code (2 for bad input found later, 1 otherwise)."""
    import subprocess
    import tempfile

    from qat.recipe import load_recipe

    if not Path(config).is_file():
        kind = "a folder" if Path(config).is_dir() else "missing"
        raise UserError(f"--launch {config!r} is {kind}; give an accelerate config file, e.g. "
                        "launch/single_gpu.yaml")
    recipe = load_recipe(argv[0], argv[1:])
    check_output_dir(recipe.training_args.output_dir)
    check_run_folder(recipe, resolve_resume(recipe))
    with tempfile.TemporaryDirectory() as tmp:
        status = Path(tmp) / "status"
        env = dict(os.environ, **{STATUS_ENV: str(status)})
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
               "--quiet", str(Path(__file__).resolve()), *argv]
        rc = subprocess.run(cmd, env=env).returncode
        text = status.read_text().strip() if status.is_file() else ""
    return int(text) if text.isdigit() else rc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rc = _main(argv)
    status = os.environ.get(STATUS_ENV)
    if status and rc:  # for `--launch`: a failed rank's own exit code (see launch)
        Path(status).write_text(str(rc))
    return rc


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    from qat.checkpoints import CheckpointError, RunFolderError
    from qat.glue import DataError
    from qat.models import ModelLoadError
    from qat.nonfinite import NonFiniteError
    from qat.quant_config import QuantConfigError
    from qat.recipe import RecipeError, load_recipe

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO)
    try:
        if "--launch" in argv:
            i = argv.index("--launch")
            if i + 1 >= len(argv):
                raise UserError("--launch needs an accelerate config file")
            return launch(argv[i + 1], argv[:i] + argv[i + 2:])
        recipe = load_recipe(argv[0], argv[1:])
        metrics = run(recipe)
    except (RecipeError, QuantConfigError, DataError, ModelLoadError, UserError,
            FileNotFoundError, CheckpointError, RunFolderError) as e:
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
