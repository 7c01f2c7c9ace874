"""``qat search``: mixed-precision search (``qat.analysis.search``).

qat search recipes/minilm_sst2_search.yaml --model_name_or_path outputs/minilm_sst2_float
qat search recipes/minilm_sst2_search.yaml --search.trials 16 --resume
"""

from __future__ import annotations

import sys

from qat.cli.base import run_cli, split_options

USAGE = """usage: qat search RECIPE.yaml [--resume] [--key value ...]

Mixed-precision search driven by the recipe's search: section (see docs/search.md).
Recipe keys override as usual; search keys take dots: --search.trials 16.
--resume  continue the study stored in <output_dir>/search.db (finished trials are kept)
Writes trials.csv, pareto.csv, pareto.png, uniform.csv, best.yaml and search_results.json."""


def main(argv: list[str] | None = None) -> int:
    def body(argv: list[str]) -> None:
        from qat.analysis.search import run

        opts, rest = split_options(argv[1:], {"resume": bool})
        res = run(argv[0], rest, bool(opts.get("resume")))
        b, v = res["best"], res["best_validation"]
        print(f"qat search: {res['trials']} trials, {len(res['pareto'])} on the Pareto front")
        for u in res["uniform"]:
            print(
                f"qat search: uniform {u['name']}: {u['bits']:.3f} bits, held-out "
                f"{res['metric']}={u['accuracy']:.4f}, validation "
                f"{u['validation_accuracy']:.4f}"
            )
        print(
            f"qat search: chosen trial {b['number']}: {b['bits']:.3f} bits, held-out "
            f"{res['metric']}={b['accuracy']:.4f}, validation {res['metric']}="
            f"{v['accuracy']:.4f}"
        )

    return run_cli("search", USAGE, argv, body)


if __name__ == "__main__":
    sys.exit(main())
