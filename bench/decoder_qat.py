"""Decoder QAT under one budget: WikiText-2 test perplexity of float (before and after
fine-tuning), PTQ and QAT (full, LoRA) side by side, every model evaluated on the same chunks.

    QAT_WIKITEXT_DIR=../shared/data/wikitext-2-raw python bench/decoder_qat.py \\
        --steps 200 --block_size 512 --batch 4 --seed 42 [--eval_chunks 16] \\
        [--codebook_recipe recipes/smollm2_wikitext_bof4s_a4.yaml] [--key value ...]

The recipe (default ``recipes/smollm2_wikitext_w4a4.yaml``) says the model, data and quant
config; the budget comes from the command line and is the same for every trained row. Rows:
float before FT, float after FT, PTQ (the recipe's quant on the untrained model), QAT full,
QAT LoRA, and with ``--codebook_recipe`` that recipe's PTQ and QAT full. Extra ``--key value``
pairs override every run's recipe (e.g. ``--use_cpu true``). Prints a markdown table and writes
``results.json`` into ``--out`` after every row; ``--plot PNG`` draws the perplexities.

    python bench/decoder_qat.py --table OUT_A/results.json OUT_B/results.json \\
        --plot docs/decoder_qat.png     # rows run apart (--only) in one table and picture
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from qat_vs_ptq import quant_label  # noqa: E402

from qat.runs.recipe.load import load_recipe  # noqa: E402

EVAL_ONLY = ["--do_train", "false", "--do_eval", "true"]


def rows(recipe: str, codebook: str | None, lora_lr: float) -> list[tuple[str, str, str, list]]:
    """(row id, display name, recipe, overrides); {q} is the recipe's quant label."""
    out = [
        ("float-before", "float, before FT", recipe, ["--quant", "null", *EVAL_ONLY]),
        ("float-after", "float, after FT", recipe, ["--quant", "null"]),
        ("ptq", "{q} PTQ", recipe, EVAL_ONLY),
        ("qat-full", "{q} QAT full", recipe, []),
        (
            "qat-lora",
            "{q} QAT LoRA",
            recipe,
            ["--finetune", "lora", "--learning_rate", str(lora_lr)],
        ),
    ]
    if codebook:
        out += [
            ("cb-ptq", "{q} PTQ", codebook, EVAL_ONLY),
            ("cb-qat-full", "{q} QAT full", codebook, []),
        ]
    return out


def load_results(paths: list[Path]) -> dict[str, Any]:
    """One result set from results.json files of runs split across processes or machines
    (``--only``); their budgets must be the same."""
    merged: dict[str, Any] | None = None
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"decoder_qat: {str(path)!r}: no such results file")
        data = json.loads(path.read_text())
        lever = data.get("lever")
        for r in data["results"]:  # a lever's rows keep its overrides and label
            r.setdefault("lever", lever)
            r.setdefault("overrides", data["budget"].get("overrides", []))
        if merged is None:
            merged = {**data, "results": list(data["results"])}
        elif _budget(data) != _budget(merged):
            raise SystemExit(
                f"decoder_qat: {str(path)!r} has another budget "
                f"({data['budget']} vs {merged['budget']})"
            )
        else:
            merged["results"] += data["results"]
    assert merged is not None
    order = [r[0] for r in rows("", "", 0.0)]
    merged["results"].sort(
        key=lambda r: (order.index(r["id"]) if r["id"] in order else 99, r.get("lever") or "")
    )
    return merged


def _budget(data: dict[str, Any]) -> dict[str, Any]:
    """What must agree for rows to share a table: the budget, less the levers' overrides."""
    return {k: v for k, v in data["budget"].items() if k != "overrides"}


def recovered(
    row: dict[str, Any], results: list[dict[str, Any]], after: float | None
) -> float | None:
    """(PTQ - QAT) / (PTQ - float after FT) of a QAT row, against the PTQ row of the same
    recipe and lever (else the recipe's plain PTQ row): the share of the quantisation damage
    training recovered. Recipes match by file name (runs in other folders merge)."""
    if "qat" not in row["id"] or after is None:
        return None
    ptq_id = "cb-ptq" if row["id"].startswith("cb-") else "ptq"
    ptqs = [
        r
        for r in results
        if r["id"] == ptq_id
        and Path(str(r.get("recipe"))).name == Path(str(row.get("recipe"))).name
    ]
    ptq = next((r for r in ptqs if r.get("lever") == row.get("lever")), None) or next(
        (r for r in ptqs if not r.get("lever")), None
    )
    if ptq is None or not math.isfinite(ptq["perplexity"]) or ptq["perplexity"] <= after:
        return None
    return (ptq["perplexity"] - row["perplexity"]) / (ptq["perplexity"] - after)


def float_after(results: list[dict[str, Any]]) -> float | None:
    """The fine-tuned float model's perplexity, the rows' reference (None if not run)."""
    rows = [r for r in results if r["id"] == "float-after"]
    row = next((r for r in rows if not r.get("lever")), rows[0] if rows else None)
    return None if row is None else row["perplexity"]


def report(paths: list[Path], figure: Path | None) -> None:
    """Print the markdown table (and draw ``figure``) of the results in ``paths``."""
    data = load_results(paths)
    b, results = data["budget"], data["results"]
    after = float_after(results)
    chunks = "all" if b["eval_chunks"] is None else f"the first {b['eval_chunks']}"
    print(
        f"\n{Path(data['recipe']).name}: {b['steps']} steps x {b['batch']} x "
        f"{b['block_size']} tokens = {b['training_tokens']} training tokens, seed {b['seed']}; "
        f"WikiText-2 test, {chunks} chunks of {b['block_size']} tokens\n"
    )
    print("| model | WikiText-2 test PPL | vs float after FT | recovered | train loss | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        ok = after and math.isfinite(r["perplexity"])
        rel = f"{r['perplexity'] / after - 1:+.1%}" if ok else ""
        tl = "" if r.get("train_loss") is None else f"{r['train_loss']:.3f}"
        share = recovered(r, results, after)
        rec = "" if share is None else f"{share:.0%}"
        print(
            f"| {r['name']} | {r['perplexity']:.2f} | {rel} | {rec} | {tl} | {r['seconds']:.0f} |"
        )
    if figure is not None:
        plot(data, figure)
        print(f"\ndrew {figure}")


def plot(data: dict[str, Any], path: Path) -> None:
    """Bars of perplexity per row from zero, with the issue's aim (float after FT + 25%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, b = data["results"], data["budget"]
    colour = {"float": "#4c72b0", "ptq": "#c44e52", "qat": "#55a868"}

    def kind(row_id: str) -> str:
        return "float" if row_id.startswith("float") else "ptq" if "ptq" in row_id else "qat"

    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.45 * len(results)))
    names = [r["name"] for r in results][::-1]
    ppl = [r["perplexity"] for r in results][::-1]
    bars = ax.barh(names, ppl, color=[colour[kind(r["id"])] for r in results][::-1])
    for bar, v in zip(bars, ppl):
        ax.text(
            bar.get_width() * 1.02,
            bar.get_y() + bar.get_height() / 2,
            f"{v:.1f}",
            va="center",
            fontsize=9,
        )
    after = float_after(results)
    if after:
        ax.axvline(after * 1.25, color="grey", ls="--", lw=1)
        ax.text(after * 1.25, -0.9, " float after FT +25%", color="grey", fontsize=8, va="bottom")
    ax.set_xlim(0, max(ppl) * 1.12)
    ax.set_ylim(-0.95, len(results) - 0.5)
    ax.set_xlabel("WikiText-2 test perplexity (lower is better)")
    ax.set_title(
        f"{Path(data['recipe']).stem}: {b['steps']} steps, {b['training_tokens']} "
        f"tokens, seed {b['seed']}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(REPO / "recipes/smollm2_wikitext_w4a4.yaml"))
    p.add_argument(
        "--codebook_recipe",
        default=None,
        help="a second recipe (e.g. BOF4-S+OPQ weights): its PTQ and QAT full rows",
    )
    p.add_argument("--steps", type=int)
    p.add_argument("--block_size", type=int)
    p.add_argument("--batch", type=int, help="per-device train batch (chunks)")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--eval_chunks",
        type=int,
        default=None,
        help="first N chunks of the test split (default: all of them)",
    )
    p.add_argument("--lora_lr", type=float, default=2e-4)
    p.add_argument("--out", default=str(REPO / "outputs/bench_decoder_qat"))
    p.add_argument(
        "--lever",
        default=None,
        metavar="LABEL",
        help="name the extra --key value overrides (e.g. 'rotation 64 + KD'): "
        "appended to every row's name, so runs of several levers under one "
        "budget merge into one table (--table)",
    )
    p.add_argument("--only", nargs="+", default=None, help="row ids to run (default: all)")
    p.add_argument(
        "--table",
        nargs="+",
        type=Path,
        metavar="RESULTS_JSON",
        default=None,
        help="only print the table of results.json files written earlier "
        "(rows split across runs with --only are merged)",
    )
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="PNG",
        help="also draw the perplexities (e.g. docs/decoder_qat.png)",
    )
    a, extra = p.parse_known_args(argv)
    if a.table:
        report(a.table, a.plot)
        return 0
    missing = [k for k in ("steps", "block_size", "batch", "seed") if getattr(a, k) is None]
    if missing:  # the budget is always stated, never a silent default
        p.error("the budget needs " + ", ".join(f"--{k}" for k in missing))
    from qat.training.run import run

    out = Path(a.out)
    budget = [
        "--max_steps",
        str(a.steps),
        "--block_size",
        str(a.block_size),
        "--per_device_train_batch_size",
        str(a.batch),
        "--seed",
        str(a.seed),
        "--eval_split",
        "test",
        "--max_eval_samples",
        "null" if a.eval_chunks is None else str(a.eval_chunks),
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--overwrite_output_dir",
        "true",
        *extra,
    ]
    args = load_recipe(a.recipe, budget).args
    tokens = (
        a.steps
        * a.batch
        * a.block_size
        * args.gradient_accumulation_steps
        * max(1, args.world_size)
    )
    results: list[dict[str, Any]] = []
    path = out / "results.json"

    def write() -> None:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "recipe": a.recipe,
                    "codebook_recipe": a.codebook_recipe,
                    "lever": a.lever,
                    "budget": {
                        "steps": a.steps,
                        "block_size": a.block_size,
                        "batch": a.batch,
                        "seed": a.seed,
                        "training_tokens": tokens,
                        "eval_chunks": a.eval_chunks,
                        "lora_lr": a.lora_lr,
                        "overrides": extra,
                    },
                    "results": results,
                },
                indent=2,
            )
        )

    for row_id, name, recipe_path, overrides in rows(a.recipe, a.codebook_recipe, a.lora_lr):
        if a.only and row_id not in a.only:
            continue
        recipe = load_recipe(recipe_path, [*budget, *overrides, "--output_dir", str(out / row_id)])
        label = quant_label(None if recipe.args.quant is None else recipe.args.quant.to_dict())
        t0 = time.time()
        metrics = run(recipe)
        shown = name.format(q=label) + (f" + {a.lever}" if a.lever else "")
        row = {
            "id": row_id,
            "name": shown,
            "recipe": recipe_path,
            "lever": a.lever,
            "overrides": extra,
            "eval_loss": metrics["eval_loss"],
            "perplexity": metrics["eval_perplexity"],
            "train_loss": metrics.get("train_loss"),
            "seconds": round(time.time() - t0, 1),
        }
        results.append(row)
        print(f"[{row['name']}] perplexity={row['perplexity']:.3f}", flush=True)
        write()  # after every row: a long CPU run that dies keeps what it measured
    report([path], a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
