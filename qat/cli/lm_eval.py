"""``qat lm-eval``: lm-evaluation-harness tasks on a recipe's quantised causal LM or a run.

    qat lm-eval recipes/smollm2_wikitext_w4a4.yaml --tasks hellaswag,arc_easy --limit 200
    qat lm-eval outputs/smollm2_wikitext_w4a4 --tasks my_task --include_path my_tasks/

The model is built as ``qat perplexity`` builds it (quantisers on) and handed to lm-eval in
memory: ``qat.integrations.lm_eval``. Task names are checked before the model loads.
"""

from __future__ import annotations

import sys
from typing import Any

from qat.cli.base import run_cli, split_options
from qat.errors import UsageError

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
Writes each task's metrics, the quant config and the source; prints a table.
The library function: qat.integrations.lm_eval.lm_eval."""


def _limit(value: float | None) -> int | float | None:
    if value is not None and value >= 1 and value == int(value):
        return int(value)  # a count of documents; lm-eval reads a float below 1 as a fraction
    return value


def _batch_size(value: str) -> int | str:
    """An int where the option holds one; 'auto' and anything else go on as written (the
    library checks them)."""
    try:
        return int(value)
    except ValueError:
        return value


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
        from qat.integrations.lm_eval import lm_eval

        opts, overrides = split_options(argv[1:], OPTIONS)
        tasks = [t.strip() for t in opts.get("tasks", "").split(",") if t.strip()]
        if not tasks:
            raise UsageError("--tasks is required: lm-eval task names, comma-separated")
        r = lm_eval(
            argv[0],
            tasks,
            overrides,
            num_fewshot=opts.get("num_fewshot"),
            limit=_limit(opts.get("limit")),
            batch_size=_batch_size(opts.get("batch_size", "1")),
            include_path=opts.get("include_path"),
            model_args=opts.get("model_args", ""),
            output=opts.get("output"),
            device=opts.get("device"),
        )
        print(table(r))
        if r["output"]:
            print(f"qat lm-eval: wrote {r['output']}")

    return run_cli("lm-eval", USAGE, argv, body)


if __name__ == "__main__":
    sys.exit(main())
