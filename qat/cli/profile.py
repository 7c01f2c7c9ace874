"""``qat profile``: per-layer statistics of weights and activations, SQNR, plots, density.

    qat profile recipes/minilm_sst2.yaml --num_batches 4 --output_dir profile/minilm

What is measured and plotted: ``qat.analysis.profile``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from qat.cli.base import run_cli, split_options
from qat.errors import UsageError
from qat.runs.folders import check_output_folder

OPTIONS: dict[str, type] = {"num_batches": int, "batch_size": int, "output_dir": str, "device": str}
USAGE = """usage: qat profile RECIPE.yaml|CHECKPOINT_DIR [--num_batches 4] [--batch_size 8]
                   [--output_dir DIR] [--device D] [--key value ...]

Per-layer variance, max, kurtosis and SQNR (under the recipe's or checkpoint's quant config)
of weights and activations, to DIR/layers.csv with DIR/variance_vs_depth.png and DIR/sqnr.png
(default DIR: <output_dir>/profile). Prints the density report.
--device D  cpu, cuda, cuda:N or auto (default: cuda when there is one, cpu with use_cpu)"""


def run(path: str, argv: list[str]) -> dict[str, Any]:
    from transformers import DataCollatorWithPadding

    from qat import models
    from qat.analysis.profile import plot, profile_model, write_csv
    from qat.quant.density import density_report
    from qat.runs.build import build_model, resolve_source
    from qat.tasks.glue import get_task, glue_splits

    opts, overrides = split_options(argv, OPTIONS)
    nb, bs = opts.get("num_batches", 4), opts.get("batch_size", 8)
    if nb < 1 or bs < 1:
        raise UsageError("--num_batches and --batch_size must be >= 1")
    if opts.get("output_dir"):
        check_output_folder(opts["output_dir"])
    src = resolve_source(path, overrides)
    args = src.recipe.args
    out = check_output_folder(
        opts.get("output_dir") or Path(src.recipe.args.output_dir) / "profile"
    )
    device = models.resolve_device(opts.get("device"), src.recipe.args.use_cpu)
    task = get_task(args.task_name)
    split = task.validation_splits[0]
    raw = glue_splits(task, args.data_dir, (split,), eval_samples=nb * bs)
    built = build_model(src, device=device, num_labels=task.num_labels)
    model, tokenizer = built.model, built.tokenizer
    data = raw.tokenize(tokenizer, args.max_length)[split].remove_columns("label")
    collate = DataCollatorWithPadding(tokenizer)
    batches = [
        {
            k: v.to(device)
            for k, v in collate([data[i] for i in range(s, min(s + bs, len(data)))]).items()
        }
        for s in range(0, len(data), bs)
    ]
    rows = profile_model(model, batches)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "layers.csv")
    pngs = plot(rows, out)
    density = density_report(model)
    print(density.format())
    return {"csv": out / "layers.csv", "plots": pngs, "rows": rows, "density": density}


def main(argv: list[str] | None = None) -> int:
    def body(argv: list[str]) -> None:
        r = run(argv[0], argv[1:])
        print(
            f"qat profile: {len(r['rows'])} rows -> {r['csv']}; plots: "
            + ", ".join(str(p) for p in r["plots"])
        )

    return run_cli("profile", USAGE, argv, body)


if __name__ == "__main__":
    sys.exit(main())
