"""``qat lm-eval``: lm-evaluation-harness tasks on a recipe's quantised causal LM or a run.

    qat lm-eval recipes/smollm2_wikitext_w4a4.yaml --tasks hellaswag,arc_easy --limit 200
    qat lm-eval outputs/smollm2_wikitext_w4a4 --tasks my_task --include_path my_tasks/

The model is built as ``qat perplexity`` builds it (quantisers on) and handed to lm-eval in
memory: ``qat.integrations.lm_eval``. Task names are checked before the model loads.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from qat.cli.base import run_cli, split_options, write_results
from qat.errors import UsageError
from qat.runs.folders import check_output_file

OPTIONS: dict[str, type] = {
    "tasks": str,
    "limit": float,
    "num_fewshot": int,
    "batch_size": str,
    "include_path": str,
    "output": str,
    "device": str,
    "model_args": str,
}
USAGE = """usage: qat lm-eval RECIPE.yaml|RUN_DIR --tasks T1,T2 [--limit N] [--num_fewshot K]
                   [--batch_size B] [--include_path DIR] [--model_args k=v,...]
                   [--output FILE] [--device D] [--key value ...]

lm-evaluation-harness (pip install 'qat[lm_eval]') on the recipe's causal LM under its quant
config, or on a trained run / checkpoint folder (its quant config, LoRA adapter included):
the fake-quantised model is scored in memory by lm-eval's HFLM. Recipe keys override the
recipe as in `qat train` (--quant null for float, --quant.weight.width 6, ...).
--tasks T1,T2      lm-eval task, group or tag names, globs (mmlu_*) or task YAML files
--limit N          only the first N documents of each task (a value below 1: that fraction)
--num_fewshot K    few-shot examples per prompt (default: each task's own)
--batch_size B     lm-eval's batch size (default 1; 'auto' lets lm-eval pick)
--include_path DIR a folder of your own task YAML files (searched first)
--model_args k=v   more HFLM arguments, comma-separated (max_length=2048,add_bos_token=True)
--output FILE      results JSON (default: <output_dir or RUN_DIR>/lm_eval.json)
--device D         cpu, cuda, cuda:N or auto (default: cuda when there is one, cpu with use_cpu)
Writes each task's metrics, the quant config and the source; prints a table."""


def parse_model_args(text: str) -> dict[str, Any]:
    """``k=v,k=v`` as lm-eval's own --model_args: numbers and true/false typed, the rest str."""
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--model_args: {item!r} is not key=value")
        out[key.strip()] = _typed(val.strip())
    return out


def _typed(val: str) -> Any:
    if val.lower() in ("true", "false"):
        return val.lower() == "true"
    if val.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(val)
        except ValueError:
            pass
    return val


def _limit(value: float | None) -> int | float | None:
    if value is not None and value >= 1 and value == int(value):
        return int(value)  # a count of documents; lm-eval reads a float below 1 as a fraction
    return value


def _batch_size(value: str) -> int | str:
    if value == "auto" or value.startswith("auto:"):
        return value
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise UsageError(f"--batch_size must be a whole number >= 1 or 'auto', got {value!r}")
    return size


def run(path: str, argv: list[str]) -> dict[str, Any]:
    opts, overrides = split_options(argv, OPTIONS)
    tasks = [t.strip() for t in opts.get("tasks", "").split(",") if t.strip()]
    if not tasks:
        raise UsageError("--tasks is required: lm-eval task names, comma-separated")
    batch_size = _batch_size(opts.get("batch_size", "1"))
    model_args = parse_model_args(opts.get("model_args", ""))
    if opts.get("output"):
        check_output_file(opts["output"])

    from qat.integrations.lm_eval import (
        check_arguments,
        find_tasks,
        lm_eval_evaluate,
        require_lm_eval,
        summary,
    )

    check_arguments(opts.get("num_fewshot"), _limit(opts.get("limit")), model_args)
    require_lm_eval()
    from qat import models
    from qat.quant.density import density_report
    from qat.runs.build import build_model, resolve_source

    src = resolve_source(path, overrides)
    recipe, args = src.recipe, src.recipe.args
    if args.qdec is not None:
        raise UsageError(
            "qat lm-eval does not apply QDEC (the recipe's qdec section); pass --qdec null"
        )
    out = (
        Path(opts["output"])
        if opts.get("output")
        else (src.checkpoint or Path(recipe.args.output_dir)) / "lm_eval.json"
    )
    check_output_file(out)
    manager = find_tasks(tasks, opts.get("include_path"))  # unknown names: before the model
    device = models.resolve_device(opts.get("device"), recipe.args.use_cpu)
    built = build_model(src, head="causal_lm", device=device)
    output = lm_eval_evaluate(
        built.model,
        built.tokenizer,
        tasks,
        num_fewshot=opts.get("num_fewshot"),
        limit=_limit(opts.get("limit")),
        batch_size=batch_size,
        include_path=opts.get("include_path"),
        model_args=model_args,
        task_manager=manager,
    )
    density = density_report(built.model)
    results = {
        "source": path,
        "model_name_or_path": args.model_name_or_path,
        "quant": None if args.quant is None else args.quant.to_dict(),
        "bits_per_element": density.quantized_bits_per_element or None,
        "tasks": tasks,
        "num_fewshot": opts.get("num_fewshot"),
        "limit": opts.get("limit"),
        "batch_size": batch_size,
        **summary(output),
    }
    return write_results(results, out)


def table(results: dict[str, Any]) -> str:
    """One row per task and metric: value and standard error."""
    rows = [("task", "metric", "value", "stderr")]
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if (
                name.endswith("_stderr")
                or not isinstance(value, (int, float))
                or isinstance(value, bool)
                or name == "sample_len"
            ):
                continue
            err = metrics.get(f"{name}_stderr,{filt}" if filt else f"{name}_stderr")
            rows.append(
                (task, key, f"{value:.4f}", f"{err:.4f}" if isinstance(err, (int, float)) else "-")
            )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(argv: list[str] | None = None) -> int:
    def body(argv: list[str]) -> None:
        r = run(argv[0], argv[1:])
        print(table(r))
        print(f"qat lm-eval: wrote {r['output']}")

    return run_cli("lm-eval", USAGE, argv, body)


if __name__ == "__main__":
    sys.exit(main())
