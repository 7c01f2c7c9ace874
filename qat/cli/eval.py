"""``qat eval``: GLUE evaluation of a recipe (PTQ, no training) or of a QAT checkpoint.

    qat eval recipes/minilm_sst2.yaml --quant.weight.width 6 --output ptq.json
    qat eval outputs/minilm_sst2 --max_eval_samples 200

A recipe is loaded from its ``model_name_or_path`` and quantised with its ``quant`` section
(post-training quantisation; an encoder's classifier head is untrained unless the path is a
fine-tuned run). A run or checkpoint directory must hold ``qat_config.json``; its quant
config, fine-tuning mode and LoRA adapter rebuild the trained model, and ``recipe.yaml`` (in
the directory or its parent) gives the task and ``max_length``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from qat.cli.base import run_cli, split_options, write_results
from qat.runs.folders import check_output_file

USAGE = """usage: qat eval RECIPE.yaml|CHECKPOINT_DIR [--output FILE] [--device D] [--key value ...]

Evaluates on the task's validation split(s) without training and prints the metrics and the
density report. Recipe keys override the recipe (or the checkpoint's recipe.yaml), e.g.
--quant null, --quant.weight.width 6, --max_eval_samples 200, --per_device_eval_batch_size 64.
--output FILE  metrics JSON (default: <checkpoint dir or output_dir>/eval_qat.json)
--device D     cpu, cuda, cuda:N or auto (default: cuda when there is one, cpu with use_cpu)"""


def run(
    path: str, overrides: list[str], output: str | None = None, device: str | None = None
) -> dict[str, Any]:
    """Evaluate ``path`` (recipe or checkpoint) on ``device`` (``--device``; None: auto);
    returns and writes the results."""
    from qat import models
    from qat.quant.density import density_report
    from qat.runs.build import build_model, resolve_source
    from qat.tasks.glue import evaluate_split, get_task, glue_splits

    if output is not None:
        check_output_file(output)
    src = resolve_source(path, overrides)
    args = src.recipe.args
    out = Path(output) if output else (src.checkpoint or Path(args.output_dir)) / "eval_qat.json"
    check_output_file(out)
    dev = models.resolve_device(device, args.use_cpu)
    task = get_task(args.task_name)
    raw = glue_splits(
        task, args.data_dir, task.validation_splits, eval_samples=args.max_eval_samples
    )
    built = build_model(src, device=dev, num_labels=task.num_labels)
    model, tokenizer = built.model, built.tokenizer
    data = raw.tokenize(tokenizer, args.max_length)
    metrics: dict[str, dict[str, float]] = {}
    for split in task.validation_splits:
        metrics[split] = evaluate_split(
            model, tokenizer, task, data[split], args.per_device_eval_batch_size
        )
    density = density_report(model)
    print(density.format())
    results = {
        "source": str(path),
        "mode": "checkpoint" if src.checkpoint else "ptq",
        "model_name_or_path": args.model_name_or_path,
        "task": task.name,
        "quant": None if args.quant is None else args.quant.to_dict(),
        "metrics": metrics,
        "density": density.to_dict(),
    }
    return write_results(results, out)


def main(argv: list[str] | None = None) -> int:
    def body(argv: list[str]) -> None:
        opts, rest = split_options(argv[1:], {"output": str, "device": str})
        results = run(argv[0], rest, opts.get("output"), opts.get("device"))
        for split, m in results["metrics"].items():
            print(f"qat eval: {split}: " + ", ".join(f"{k}={v:.4f}" for k, v in m.items()))
        print(f"qat eval: wrote {results['output']}")

    return run_cli("eval", USAGE, argv, body)


if __name__ == "__main__":
    sys.exit(main())
