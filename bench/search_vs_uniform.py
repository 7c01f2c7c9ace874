"""QAT vs PTQ, uniform vs searched widths, from the run folders docs/search.md's commands
write: accuracy on the validation split against average bits per element.

    python bench/search_vs_uniform.py --float outputs/minilm_sst2_float \
        --search outputs/minilm_sst2_search --qat_uniform outputs/qat_uniform_w4a4 \
        --qat_best outputs/qat_best --out docs/search_qat_vs_ptq.png

Reads (nothing is trained or evaluated here): the float run's all_results.json, the search
folder's uniform.csv (PTQ of the float run at uniform widths) and search_results.json (PTQ of
the chosen mix), and the two QAT runs' all_results.json (uniform W4A4 and the chosen mix, both
fine-tuned from the float run with the same steps and seed). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path


def _json(path: Path) -> dict:
    if not path.is_file():
        sys.exit(
            f"search_vs_uniform: {str(path)!r} does not exist (run the commands of docs/search.md)"
        )
    return json.loads(path.read_text())


def rows(float_dir: Path, search_dir: Path, qat_uniform: Path, qat_best: Path) -> list[dict]:
    res = _json(search_dir / "search_results.json")
    metric = res["metric"]
    best = res["best"]
    out = [
        {
            "name": "float",
            "kind": "float",
            "bits": 32.0,
            "accuracy": _json(float_dir / "all_results.json")[f"eval_{metric}"],
        }
    ]
    with open(search_dir / "uniform.csv") as f:
        for r in csv.DictReader(f):
            out.append(
                {
                    "name": f"uniform {r['name']}",
                    "kind": "PTQ",
                    "bits": float(r["bits"]),
                    "accuracy": float(r["validation_accuracy"]),
                }
            )
    out.append(
        {
            "name": f"searched mix (trial {best['number']})",
            "kind": "PTQ",
            "bits": best["bits"],
            "accuracy": res["best_validation"]["accuracy"],
        }
    )
    w4 = next(r for r in out if r["name"] == "uniform W4")
    out.append(
        {
            "name": "uniform W4",
            "kind": "QAT",
            "bits": w4["bits"],
            "accuracy": _json(qat_uniform / "all_results.json")[f"eval_{metric}"],
        }
    )
    out.append(
        {
            "name": f"searched mix (trial {best['number']})",
            "kind": "QAT",
            "bits": best["bits"],
            "accuracy": _json(qat_best / "all_results.json")[f"eval_{metric}"],
        }
    )
    return out


def plot(table: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    fl = next(r for r in table if r["kind"] == "float")
    ax.axhline(fl["accuracy"], color="k", ls="--", lw=1, label=f"float ({fl['accuracy']:.4f})")
    ptq_u = [r for r in table if r["kind"] == "PTQ" and r["name"].startswith("uniform")]
    ax.plot(
        [r["bits"] for r in ptq_u],
        [r["accuracy"] for r in ptq_u],
        "s--",
        color="tab:blue",
        label="PTQ, uniform width",
    )
    for r in ptq_u:
        ax.annotate(
            r["name"].split()[-1],
            (r["bits"], r["accuracy"]),
            fontsize=8,
            xytext=(4, -10),
            textcoords="offset points",
            color="tab:blue",
        )
    styles = {
        ("PTQ", "mix"): ("*", "tab:green", "PTQ, searched mix"),
        ("QAT", "uniform"): ("o", "tab:red", "QAT, uniform W4A4"),
        ("QAT", "mix"): ("P", "tab:purple", "QAT, searched mix"),
    }
    for r in table:
        key = (r["kind"], "mix" if r["name"].startswith("searched") else "uniform")
        if key in styles:
            marker, color, label = styles[key]
            ax.plot(r["bits"], r["accuracy"], marker, color=color, ms=11, label=label)
    ax.set_xlabel("average bits per element (BFP, block 16, 8-bit shared exponent)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--float", dest="float_dir", type=Path, required=True)
    p.add_argument("--search", type=Path, required=True)
    p.add_argument("--qat_uniform", type=Path, required=True)
    p.add_argument("--qat_best", type=Path, required=True)
    p.add_argument("--title", default="MiniLM / SST-2: QAT vs PTQ, uniform vs searched widths")
    p.add_argument("--out", type=Path, default=Path("docs/search_qat_vs_ptq.png"))
    a = p.parse_args(argv)
    table = rows(a.float_dir, a.search, a.qat_uniform, a.qat_best)
    print("| model | mode | bits/element | validation accuracy |\n| --- | --- | ---: | ---: |")
    for r in table:
        print(f"| {r['name']} | {r['kind']} | {r['bits']:.3f} | {r['accuracy']:.4f} |")
    plot(table, a.title, a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
