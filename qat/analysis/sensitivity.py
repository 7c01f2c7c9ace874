"""``qat sensitivity``: lower one unit at a time to its lowest choice; rank by accuracy drop.

    qat sensitivity recipes/minilm_sst2_search.yaml --model_name_or_path outputs/minilm_sst2_float

Reads the same ``search:`` section as ``qat search`` (space, granularity, held-out slice,
seed). The baseline is the recipe's ``quant`` section; each row lowers every searched role of
one unit (a module, or a block with ``granularity: layer``) to the choice with the fewest bits,
keeps the rest at the recipe's formats, and records the held-out accuracy and its drop from the
baseline. Writes ``sensitivity.csv`` (most sensitive first) and ``sensitivity.png``;
``search.sensitivity: <that csv>`` then seeds ``qat search``'s first trials with
sensitivity-ordered mixes.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from qat.analysis.search import Scorer, SearchError, read_recipe_and_spec
from qat.files import check_output_folder
from qat.runs.folders import check_output_dir

COLUMNS = ["rank", "unit", "modules", "accuracy", "drop", "bits", "lowered"]


def run(
    path: str, argv: list[str], output_dir: str | None = None, overwrite: bool = False
) -> list[dict[str, Any]]:
    """Measure every unit's drop; returns the rows, most sensitive first."""
    from tqdm.auto import tqdm

    if output_dir is not None:
        check_output_folder(output_dir)
    recipe, spec, _ = read_recipe_and_spec(path, argv)
    out = Path(recipe.args.output_dir if output_dir is None else output_dir)
    check_output_dir(str(out))  # a file in the way fails now, not after all the scoring
    table = out / "sensitivity.csv"
    if table.exists() and not overwrite:
        raise SearchError(
            f"{str(table)!r} exists; pass --overwrite to replace it or choose another --output_dir"
        )
    scorer = Scorer(recipe, spec)
    space = scorer.space
    low = space.extreme(low=True)
    base = scorer.score(space.quant_dict())
    rows = []
    for unit in tqdm(space.units, desc="sensitivity", unit="unit"):
        roles = {r: c for r, c in low.items() if unit.modules_for(r)}
        if not roles:
            continue  # nothing searched in this unit (e.g. attention when matmul is not)
        res = scorer.score(space.quant_dict(space.params_for({unit.name: roles})))
        rows.append(
            {
                "unit": unit.name,
                "modules": len(unit.linears) + len(unit.attention),
                "accuracy": res["accuracy"],
                "drop": base["accuracy"] - res["accuracy"],
                "bits": res["bits"],
                "lowered": "; ".join(f"{r}={c}" for r, c in roles.items()),
            }
        )
    rows.sort(key=lambda r: -r["drop"])  # stable: equal drops keep model order
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    out.mkdir(parents=True, exist_ok=True)
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    plot(rows, base["accuracy"], scorer.metric, out / "sensitivity.png")
    print(
        f"qat sensitivity: baseline held-out {scorer.metric}={base['accuracy']:.4f} "
        f"({base['bits']:.3f} bits)"
    )
    return rows


def plot(rows: list[dict[str, Any]], base: float, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.22 * len(rows) + 1)))
    names = [r["unit"] for r in rows][::-1]
    ax.barh(names, [r["drop"] for r in rows][::-1], color="C3")
    ax.set_xlabel(f"held-out {metric} drop (baseline {base:.4f})")
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
