"""Per-layer variance vs depth of the real all-MiniLM-L6-v2: the picture of
docs/results/encoders.md.

    QAT_DATA_DIR=../shared/data/glue python bench/variance_depth.py [--num_batches 4]

Runs ``qat profile recipes/minilm_sst2.yaml`` on the CPU (float forward passes over the first
SST-2 validation sentences; W4A4 BFP only for the SQNR columns) into --out
(outputs/bench/profile_minilm: ``layers.csv``, ``variance_vs_depth.png``, ``sqnr.png``) and
copies ``variance_vs_depth.png`` to ``docs/variance_vs_depth.png`` (``--figure``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qat.analysis.profile import profile  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(REPO / "recipes/minilm_sst2.yaml"))
    ap.add_argument("--num_batches", type=int, default=4)
    ap.add_argument("--out", type=Path, default=REPO / "outputs/bench/profile_minilm")
    ap.add_argument("--figure", type=Path, default=REPO / "docs/variance_vs_depth.png")
    a = ap.parse_args(argv)
    result = profile(
        a.recipe, num_batches=a.num_batches, batch_size=8, output_dir=a.out, device="cpu"
    )
    a.figure.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(a.out / "variance_vs_depth.png", a.figure)
    print(f"wrote {result['csv']} and {a.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
