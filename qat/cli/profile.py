"""``qat profile``: per-layer statistics of weights and activations, SQNR, plots, density.

    qat profile recipes/minilm_sst2.yaml --num_batches 4 --output_dir profile/minilm

What is measured and plotted: ``qat.analysis.profile``.
"""

from __future__ import annotations

import sys

from qat.cli.base import run_cli, split_options

OPTIONS: dict[str, type] = {"num_batches": int, "batch_size": int, "output_dir": str, "device": str}
USAGE = """usage: qat profile RECIPE.yaml|CHECKPOINT_DIR [--num_batches 4] [--batch_size 8]
                   [--output_dir DIR] [--device D] [--key value ...]

Per-layer variance, max, kurtosis and SQNR (under the recipe's or checkpoint's quant config)
of weights and activations, to DIR/layers.csv with DIR/variance_vs_depth.png and DIR/sqnr.png
(default DIR: <output_dir>/profile). Prints the density report.
--device D  cpu, cuda, cuda:N or auto (default: cuda when there is one, cpu with use_cpu)
The library function: qat.analysis.profile.profile."""


def main(argv: list[str] | None = None) -> int:
    def body(argv: list[str]) -> None:
        from qat.analysis.profile import profile
        from qat.quant.density import DensityReport

        opts, overrides = split_options(argv[1:], OPTIONS)
        r = profile(
            argv[0],
            overrides,
            num_batches=opts.get("num_batches", 4),
            batch_size=opts.get("batch_size", 8),
            output_dir=opts.get("output_dir"),
            device=opts.get("device"),
        )
        print(DensityReport.from_dict(r["density"]).format())
        print(
            f"qat profile: {len(r['rows'])} rows -> {r['csv']}; plots: "
            + ", ".join(str(p) for p in r["plots"])
        )

    return run_cli("profile", USAGE, argv, body)


if __name__ == "__main__":
    sys.exit(main())
