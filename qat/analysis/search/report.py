"""What a search writes: trials.csv, pareto.csv, uniform.csv, the pareto.png plot, best.yaml
(the recipe with the chosen quant config) and search_results.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from qat.analysis.search.pareto import pareto_front
from qat.analysis.search.score import Scorer
from qat.analysis.search.spec import SearchSpec


def write_tables(
    out: Path, rows, uniform, best, spec: SearchSpec, scorer: Scorer
) -> list[dict[str, Any]]:
    """trials.csv, pareto.csv, uniform.csv and pareto.png; returns the front."""
    param_names = list(scorer.space.params())
    cols = [
        "number",
        "source",
        "accuracy",
        "bits",
        "weight_bits",
        "activation_bits",
        "matmul_bits",
        "feasible",
    ]
    front = pareto_front(rows)
    for name, subset in (("trials.csv", rows), ("pareto.csv", front)):
        with open(out / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols + param_names)
            for r in subset:
                w.writerow([r[c] for c in cols] + [r["params"].get(p, "") for p in param_names])
    with open(out / "uniform.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["name", "width", "accuracy", "bits", "validation_accuracy"])
        w.writeheader()
        w.writerows(uniform)
    plot_front(rows, front, uniform, best, spec.max_bits, out / "pareto.png")
    return front


def write_outputs(
    out: Path,
    rows,
    uniform,
    best,
    best_quant,
    val,
    spec: SearchSpec,
    data: dict[str, Any],
    scorer: Scorer,
) -> dict[str, Any]:
    """The tables and plot, then best.yaml and search_results.json."""
    import yaml

    front = write_tables(out, rows, uniform, best, spec, scorer)
    best_recipe = {**data, "quant": best_quant, "output_dir": str(out / "train_best")}
    (out / "best.yaml").write_text(
        f"# qat search: trial {best['number']}, held-out {scorer.metric} "
        f"{best['accuracy']:.4f}, {best['bits']:.4f} average bits; validation "
        f"{scorer.metric} {val['accuracy']:.4f}\n" + yaml.safe_dump(best_recipe, sort_keys=False)
    )
    results = {
        "metric": scorer.metric,
        "trials": len(rows),
        "best": dict(best),
        "best_validation": val,
        "pareto": front,
        "uniform": uniform,
        "spec": spec.to_dict(),
    }
    (out / "search_results.json").write_text(json.dumps(results, indent=2))
    return results


def plot_front(rows, front, uniform, best, max_bits: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter(
        [r["bits"] for r in rows], [r["accuracy"] for r in rows], s=12, c="0.7", label="trials"
    )
    ax.step(
        [r["bits"] for r in front],
        [r["accuracy"] for r in front],
        where="post",
        c="C3",
        marker="o",
        ms=4,
        label="Pareto front",
    )
    if uniform:
        ax.plot(
            [u["bits"] for u in uniform],
            [u["accuracy"] for u in uniform],
            "s--",
            c="C0",
            label="uniform",
        )
        for u in uniform:
            ax.annotate(
                u["name"],
                (u["bits"], u["accuracy"]),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=8,
                color="C0",
            )
    if best is not None:
        ax.scatter(
            [best["bits"]], [best["accuracy"]], marker="*", s=160, c="C2", zorder=5, label="chosen"
        )
    if max_bits is not None:
        ax.axvline(max_bits, ls=":", c="0.4", label=f"max_bits {max_bits:g}")
    ax.set_xlabel("average bits per element")
    ax.set_ylabel("held-out accuracy (train split)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
