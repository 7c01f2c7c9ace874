"""Compare fine-tuning modes under one budget on a GLUE task: float, QAT full, QAT LoRA,
QAT classifier-only, and PTQ (the float run quantised after training, no QAT).

    QAT_DATA_DIR=../shared/data/glue python bench/qat_vs_ptq.py --steps 200 --seeds 42 43
    python bench/qat_vs_ptq.py --plot outputs/bench_qat_vs_ptq/results.json  # results/encoders.md

Prints a table (mean and spread over seeds) and writes results.json and a PNG into --out.
``--plot RESULTS_JSON`` only draws a results.json written earlier, to docs/qat_vs_ptq.png
(``--figure``), the picture of docs/results/encoders.md. Quantised modes are labelled from the
recipe's own quant section (``quant_label``: "W4A4 bfp+mm" for the MiniLM recipe, "W3A4 bfp" for a
3-bit weight recipe without matmuls), and the figure spells out every format with its parameters.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qat.runs.recipe.load import load_recipe  # noqa: E402

# mode -> (display name; {q} is the recipe's quant label, overrides on top of the recipe);
# learning rates follow each mode's usual range
MODES: dict[str, tuple[str, list[str]]] = {
    "float": ("float (full FT)", ["--quant", "null"]),
    "qat-full": ("{q} QAT full", []),
    "qat-lora": ("{q} QAT LoRA", ["--finetune", "lora", "--learning_rate", "5e-4"]),
    "qat-classifier": (
        "{q} QAT classifier",
        ["--finetune", "classifier", "--learning_rate", "2e-3"],
    ),
}


def element_bits(fmt: Any) -> int:
    """Bits of one element's code: the 4 of "W4A4" (shared scales and selectors not counted)."""
    for attr in ("width", "elem_bits"):  # BFP, minifloat, block log, int, fixed; MX
        if isinstance(getattr(fmt, attr, None), int):
            return getattr(fmt, attr)
    table = getattr(fmt, "levels", None) or (getattr(fmt, "codebooks", None) or [None])[0]
    if table:  # codebook formats (NF4, AF4, BOF4), LO-BCQ: index into a table of levels
        return max(1, (len(table) - 1).bit_length())
    return int(fmt.bits_per_element)


def quant_label(quant: dict[str, Any] | None) -> str:
    """A truthful short name for a recipe's ``quant:`` section, e.g. "W4A4 bfp+mm", "W3A4 bfp",
    "W4 nf4", "W4A8 mxfp4/mxint8+mm8 mxfp8_e4m3". "+mm" marks quantised attention matmuls
    in the format of a linear role (else their width and format); "*" marks per-layer
    overrides."""
    from qat.formats import make_format

    if not quant or not any(quant.get(r) for r in ("weight", "activation", "matmul")):
        return "float"
    fmts = {
        role: make_format(quant[role])
        for role in ("weight", "activation", "matmul")
        if quant.get(role)
    }
    widths = "".join(
        f"{tag}{element_bits(fmts[role])}"
        for tag, role in (("W", "weight"), ("A", "activation"))
        if role in fmts
    )
    names = list(dict.fromkeys(fmts[r].name for r in ("weight", "activation") if r in fmts))
    label = " ".join(x for x in (widths, "/".join(names)) if x)
    if "matmul" in fmts:
        mm = fmts["matmul"]
        same = any(mm == fmts[r] for r in ("weight", "activation") if r in fmts)
        label += "+mm" if same else f"+mm{element_bits(mm)} {mm.name}"
    return label + ("*" if quant.get("overrides") else "")


def format_lines(quant: dict[str, Any] | None) -> list[str]:
    """Each quantised role with its full format, e.g. "weight: bfp(width=4, ...)"; overrides
    and excluded modules as recorded."""
    from qat.formats import make_format

    if not quant:
        return []
    lines = [
        f"{role}: {make_format(quant[role])}"
        for role in ("weight", "activation", "matmul")
        if quant.get(role)
    ]
    if quant.get("overrides"):
        lines.append(f"overrides: {quant['overrides']}")
    return lines


def plot(results: dict[str, Any], path: Path) -> dict[str, Any]:
    """Draw a results.json (as ``main`` writes it) to ``path``; returns what was written on it
    (``labels`` per bar, ``title``, ``formats``) so the words can be checked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values: dict[str, list[float]] = results["results"]
    metric = results.get("metric", "eval_accuracy")
    names = list(values)
    formats = format_lines(results.get("quant"))
    what = " on ".join(str(x) for x in (results.get("model"), results.get("task")) if x)
    title = (
        f"{Path(results['recipe']).stem} ({results['quant_label']}): "
        f"{what + ', ' if what else ''}{results['steps']} steps, seeds {results['seeds']}"
    )
    fig, ax = plt.subplots(figsize=(8, 4.2 + 0.18 * len(formats)))
    for i, name in enumerate(names):
        ax.scatter([i] * len(values[name]), values[name], color="tab:blue", zorder=3)
        ax.bar(i, statistics.mean(values[name]), color="tab:blue", alpha=0.3)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    every = [v for vals in values.values() for v in vals]
    top = max(every) + 0.05
    ax.set_ylim(min(every) - 0.05, min(top, 1.0) if max(every) <= 1 else top)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if formats:
        fig.text(0.01, 0.01, "\n".join(formats), fontsize=7, va="bottom", family="monospace")
    fig.tight_layout(rect=(0, 0.03 * len(formats), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"labels": names, "title": title, "formats": formats}


def ptq_eval(float_dir: Path, recipe_path: str, overrides: list[str]) -> dict:
    """Quantise a trained float model with the recipe's quant config and evaluate it as
    ``qat eval`` does (metrics named as the Trainer names them: ``eval_accuracy``, ...)."""
    from qat.runs.build import build_model
    from qat.tasks.glue import evaluate_split, get_task, glue_splits

    recipe = load_recipe(recipe_path, overrides)
    # the float run (its weights, tokenizer and recipe.yaml) under the recipe's quant config
    built = build_model(float_dir, {"quant": recipe.resolved["quant"]})
    args = built.recipe.args
    task = get_task(args.task_name)
    tok = built.tokenizer
    split = task.validation_splits[0]
    data = glue_splits(task, args.data_dir, (split,)).tokenize(tok, args.max_length)
    metrics = evaluate_split(built.model, tok, task, data[split], batch_size=128)
    return {f"eval_{k}": v for k, v in metrics.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(REPO / "recipes/minilm_sst2.yaml"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    p.add_argument("--out", default=str(REPO / "outputs/bench_qat_vs_ptq"))
    p.add_argument("--metric", default="eval_accuracy")
    p.add_argument(
        "--modes",
        nargs="+",
        choices=list(MODES),
        default=list(MODES),
        help="which fine-tuning runs (PTQ comes with the float run)",
    )
    p.add_argument(
        "--plot",
        metavar="RESULTS_JSON",
        type=Path,
        help="only draw this results.json (no training) to --figure",
    )
    p.add_argument(
        "--figure",
        type=Path,
        default=REPO / "docs/qat_vs_ptq.png",
        help="where --plot draws (default docs/qat_vs_ptq.png, docs/results/encoders.md)",
    )
    a = p.parse_args(argv)
    if a.plot is not None:
        if not a.plot.is_file():
            p.error(f"--plot {str(a.plot)!r}: no such file")
        plot(json.loads(a.plot.read_text()), a.figure)
        print(f"wrote {a.figure}")
        return 0
    from qat.training.run import run

    out = Path(a.out)
    recipe = yaml.safe_load(Path(a.recipe).read_text())
    label = quant_label(recipe.get("quant"))
    modes = {m: (MODES[m][0].format(q=label), MODES[m][1]) for m in a.modes}
    ptq_name = f"{label} PTQ of float"
    ptq = [ptq_name] if "float" in a.modes else []
    results: dict[str, list[float]] = {name: [] for name, _ in modes.values()}
    results.update({name: [] for name in ptq})
    for seed in a.seeds:
        common = [
            "--max_steps",
            str(a.steps),
            "--seed",
            str(seed),
            "--save_strategy",
            "no",
            "--report_to",
            "none",
        ]
        for mode_id, (mode, extra) in modes.items():
            run_dir = out / f"{mode_id}_{seed}"
            metrics = run(load_recipe(a.recipe, [*common, *extra, "--output_dir", str(run_dir)]))
            results[mode].append(metrics[a.metric])
            print(f"[{mode} seed {seed}] {a.metric}={metrics[a.metric]:.4f}", flush=True)
            if mode_id == "float":
                ptq_metrics = ptq_eval(run_dir, a.recipe, common)
                results[ptq_name].append(ptq_metrics[a.metric])
                print(f"[PTQ seed {seed}] {a.metric}={ptq_metrics[a.metric]:.4f}", flush=True)
    print(
        f"\n{Path(a.recipe).name}: {a.steps} steps x batch "
        f"{recipe.get('per_device_train_batch_size')}, seeds {a.seeds}, quant {label} = "
        f"{recipe.get('quant')}"
    )
    print(f"{'mode':<24} {a.metric:>14} {'spread (min..max)':>20}  per-seed")
    for mode, vals in results.items():
        mean = statistics.mean(vals)
        print(
            f"{mode:<24} {mean:>14.4f} {min(vals):>9.4f}..{max(vals):.4f}  "
            + " ".join(f"{v:.4f}" for v in vals)
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(
            {
                "recipe": str(a.recipe),
                "model": recipe.get("model_name_or_path"),
                "task": recipe.get("task_name"),
                "metric": a.metric,
                "quant_label": label,
                "quant": recipe.get("quant"),
                "steps": a.steps,
                "seeds": a.seeds,
                "results": results,
            },
            indent=2,
        )
    )
    plot(json.loads((out / "results.json").read_text()), out / "qat_vs_ptq.png")
    print(f"wrote {out / 'results.json'} and {out / 'qat_vs_ptq.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
