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

from qat.cli.base import run_cli, split_options

USAGE = """usage: qat eval RECIPE.yaml|CHECKPOINT_DIR [--output FILE] [--device D] [--key value ...]

Evaluates on the task's validation split(s) without training and prints the metrics and the
density report. Recipe keys override the recipe (or the checkpoint's recipe.yaml), e.g.
--quant null, --quant.weight.width 6, --max_eval_samples 200, --per_device_eval_batch_size 64.
--output FILE  metrics JSON (default: <checkpoint dir or output_dir>/eval_qat.json)
--device D     cpu, cuda, cuda:N or auto (default: cuda when there is one, cpu with use_cpu)
The library function: qat.evaluate (qat.evaluation.evaluate)."""


def main(argv: list[str] | None = None) -> int:
    def body(argv: list[str]) -> None:
        from qat.evaluation.evaluate import evaluate
        from qat.quant.density import DensityReport

        opts, overrides = split_options(argv[1:], {"output": str, "device": str})
        results = evaluate(argv[0], overrides, output=opts.get("output"), device=opts.get("device"))
        print(DensityReport.from_dict(results["density"]).format())
        for split, m in results["metrics"].items():
            print(f"qat eval: {split}: " + ", ".join(f"{k}={v:.4f}" for k, v in m.items()))
        print(f"qat eval: wrote {results['output']}")

    return run_cli("eval", USAGE, argv, body)


if __name__ == "__main__":
    sys.exit(main())
