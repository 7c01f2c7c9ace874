"""``qat sensitivity``: accuracy drop of lowering one unit at a time (``qat.analysis.sensitivity``).

qat sensitivity recipes/minilm_sst2_search.yaml --model_name_or_path outputs/minilm_sst2_float
"""

from __future__ import annotations

import sys

from qat.cli.base import run_cli, split_options

USAGE = """usage: qat sensitivity RECIPE.yaml [--output_dir DIR] [--overwrite] [--key value ...]

Lowers one searched unit at a time to its lowest choice (the recipe's search: space) and
records the held-out accuracy drop. Writes DIR/sensitivity.csv and DIR/sensitivity.png
(default DIR: the recipe's output_dir); --overwrite replaces an existing table."""


def main(argv: list[str] | None = None) -> int:
    def body(argv: list[str]) -> None:
        from qat.analysis.sensitivity import run

        opts, rest = split_options(argv[1:], {"output_dir": str, "overwrite": bool})
        # --output_dir is also a recipe key: ours only picks where the table goes
        rows = run(argv[0], rest, opts.get("output_dir"), bool(opts.get("overwrite")))
        for r in rows[:10]:
            print(f"qat sensitivity: {r['rank']:>3} {r['unit']}: drop {r['drop']:+.4f}")

    return run_cli("sensitivity", USAGE, argv, body)


if __name__ == "__main__":
    sys.exit(main())
