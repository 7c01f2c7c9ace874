"""``qat codebook``: fit BOF4 / BOF4-S codebook levels and write them to a file
(``qat.formats.fit.codebook``). Parses its options before importing torch."""

from __future__ import annotations

import argparse
import sys

# The library's constants, spelled here so --help and bad options need no torch import
# (tests/unit/cli/test_cli_help.py checks they agree).
KINDS = ("bof4", "bof4s")
METRICS = ("mse", "mae")
METHODS = ("integral", "mc")
DEFAULT_SAMPLES = 1 << 23
DEFAULT_ITERS = 5000
DEFAULT_TOL = 1e-10


def main(argv: list[str] | None = None) -> int:
    """``qat codebook --kind bof4s --metric mse --block-size 64 --out codebook.json``."""
    p = argparse.ArgumentParser(
        prog="qat codebook", description="Fit BOF4 / BOF4-S levels for Gaussian weights."
    )
    p.add_argument("--kind", choices=list(KINDS), default="bof4s")
    p.add_argument("--metric", choices=list(METRICS), default="mse")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--out", required=True, help="JSON file for a format's codebook_file:")
    p.add_argument(
        "--method",
        choices=list(METHODS),
        default="integral",
        help="numerical integration (exact) or Monte Carlo (default %(default)s)",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=DEFAULT_SAMPLES,
        help="Monte Carlo: Gaussian scalars to draw (default %(default)s)",
    )
    p.add_argument("--iters", type=int, default=DEFAULT_ITERS, help="maximum Lloyd iterations")
    p.add_argument("--tol", type=float, default=DEFAULT_TOL, help="stop when levels move less")
    p.add_argument("--seed", type=int, default=0, help="Monte Carlo seed")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.block_size < 2:
        p.error("--block-size must be >= 2")
    if args.samples < 1 or args.iters < 1:
        p.error("--samples and --iters must be >= 1")
    from qat.formats.fit.codebook import fit_codebook, write_codebook

    levels, done = fit_codebook(
        args.kind,
        args.metric,
        args.block_size,
        args.method,
        args.samples,
        args.iters,
        args.seed,
        args.tol,
        progress=not args.no_progress,
    )
    mc = args.method == "mc"
    write_codebook(
        args.out,
        args.kind,
        args.metric,
        args.block_size,
        levels,
        args.method,
        args.samples if mc else None,
        done,
        args.seed if mc else None,
    )
    print(f"wrote {args.out} ({done} iterations): {', '.join(f'{v:.6f}' for v in levels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
