"""``qat train``: fine-tune a model on a GLUE task, or a decoder on text or chat data, from a
recipe, with block-quantisation-aware training (the loop: ``qat.training.run``).

    accelerate launch qat/train.py recipes/opt350m_sst2.yaml [--key value ...]
    qat train recipes/opt350m_sst2.yaml --launch launch/fsdp.yaml   # checked first; exit 2
    python qat/train.py recipes/minilm_sst2.yaml --max_steps 200 --quant.weight.width 6
    qat train recipes/minilm_sst2.yaml --quant null
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from qat.errors import QatError, UsageError

USAGE = """usage: qat train RECIPE.yaml [--key value ...] [--launch ACCELERATE_CONFIG.yaml]

Keys are recipe keys (see docs/recipes.md); nested keys take dots: --quant.weight.width 6.
--quant null trains in float. Any transformers.TrainingArguments field works by its name.
--overwrite_output_dir true starts over in a folder that holds a run (deletes its checkpoints);
--resume_from_checkpoint true resumes its newest good checkpoint.
--launch CONFIG checks the recipe here, then runs `accelerate launch --config_file CONFIG`;
bad input exits 2 with one line (plain `accelerate launch` exits 1 and adds a traceback)."""


STATUS_ENV = "QAT_STATUS_FILE"
# what `--launch` hands to accelerate: the launch script, which calls main() below
SCRIPT = Path(__file__).resolve().parent.parent / "train.py"


def launch(config: str, argv: list[str]) -> int:
    """``qat train RECIPE --launch CONFIG``: check the recipe, output_dir and checkpoint here
    (one line, exit 2, no process started), then ``accelerate launch --config_file CONFIG``
    this script. accelerate turns any failed child into exit 1 plus a CalledProcessError
    traceback; ``--quiet`` drops the traceback and the child's own status, written to
    ``$QAT_STATUS_FILE``, becomes the exit code (2 for bad input found later, 1 otherwise)."""
    import subprocess
    import tempfile

    from qat.runs.folders import check_output_dir
    from qat.runs.recipe.load import load_recipe
    from qat.training.run import check_run_folder, resolve_resume

    if not Path(config).is_file():
        kind = "a folder" if Path(config).is_dir() else "missing"
        raise UsageError(
            f"--launch {config!r} is {kind}; give an accelerate config file, e.g. "
            "launch/single_gpu.yaml"
        )
    recipe = load_recipe(argv[0], argv[1:])
    check_output_dir(recipe.args.output_dir)
    check_run_folder(recipe, resolve_resume(recipe))
    with tempfile.TemporaryDirectory() as tmp:
        status = Path(tmp) / "status"
        env = dict(os.environ, **{STATUS_ENV: str(status)})
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            config,
            "--quiet",
            str(SCRIPT),
            *argv,
        ]
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
        from qat.runs.recipe.arguments import keys_help  # torch-free: the fields' help metadata

        print(f"{USAGE}\n\nqat's recipe keys:\n{keys_help()}")
        return 0
    from qat.training.nonfinite import NonFiniteError
    from qat.training.run import train

    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO
    )
    try:
        if "--launch" in argv:
            i = argv.index("--launch")
            if i + 1 >= len(argv):
                raise UsageError("--launch needs an accelerate config file")
            return launch(argv[i + 1], argv[:i] + argv[i + 2 :])
        metrics = train(argv[0], argv[1:])  # the recipe's trainer: qat or sft
    except (QatError, FileNotFoundError) as e:
        print(f"qat train: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"qat train: error: {e}", file=sys.stderr)
        return 1
    summary = {
        k: v
        for k, v in metrics.items()
        if k.startswith("eval_") and "runtime" not in k and "per_second" not in k
    }
    print(
        "qat train: done;",
        ", ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
