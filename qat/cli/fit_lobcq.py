"""``qat fit-lobcq``: calibrate LO-BCQ codebooks on a model's weights or on Gaussian data and
write them to a file (``qat.formats.fit.lobcq``). Parses its options before importing torch."""

from __future__ import annotations

import argparse
import sys

DEFAULT_MAX_BLOCKS = 1 << 18  # qat.formats.fit.lobcq.DEFAULT_MAX_BLOCKS (checked by a test)


def main(argv: list[str] | None = None) -> int:
    """``qat fit-lobcq (--from-model PATH | --gaussian N) --out codebooks.json``."""
    p = argparse.ArgumentParser(prog="qat fit-lobcq", description="Calibrate LO-BCQ codebooks.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--from-model",
        metavar="PATH_OR_PKG",
        help="safetensors file, folder with model.safetensors, or pkg://pkg/dir",
    )
    src.add_argument("--gaussian", type=int, metavar="N", help="N standard Gaussian scalars")
    p.add_argument("--out", required=True, help="JSON file for codebook_file:")
    p.add_argument("--num-codebooks", type=int, default=16)
    p.add_argument("--block-len", type=int, default=8)
    p.add_argument("--array-len", type=int, default=64)
    p.add_argument("--iters", type=int, default=30, help="6-bit integer fit iterations")
    p.add_argument("--warm-iters", type=int, default=20, help="1/16-grid warm-start iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-blocks",
        type=int,
        default=DEFAULT_MAX_BLOCKS,
        help="subsample to at most this many blocks (default %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    if (
        min(a.num_codebooks, a.block_len, a.array_len, a.max_blocks) < 1
        or min(a.iters, a.warm_iters) < 0
    ):
        p.error("sizes must be >= 1 and --iters >= 0")
    if a.array_len % a.block_len:
        p.error("--array-len must be a multiple of --block-len")
    import torch

    from qat.errors import QatError
    from qat.formats.fit.lobcq import fit_lobcq, save_codebooks
    from qat.models import weight_block_arrays

    if a.gaussian is not None:
        gen = torch.Generator().manual_seed(a.seed)
        rows = max(1, a.gaussian // a.array_len)
        samples, source = torch.randn(rows, a.array_len, generator=gen), f"gaussian:{a.gaussian}"
    else:
        per_array = a.array_len // a.block_len
        try:
            samples = weight_block_arrays(
                a.from_model, a.array_len, a.max_blocks // per_array + 1, a.seed
            )
        except QatError as e:
            print(f"qat fit-lobcq: error: {e}", file=sys.stderr)
            return 2
        source = f"model:{a.from_model}"
    cbs, hist = fit_lobcq(
        samples,
        a.num_codebooks,
        a.block_len,
        a.array_len,
        a.iters,
        a.seed,
        a.max_blocks,
        a.warm_iters,
        progress=not a.no_progress,
    )
    save_codebooks(
        a.out,
        cbs,
        a.block_len,
        a.array_len,
        history=hist,
        source=source,
        iters=a.iters,
        warm_iters=a.warm_iters,
        seed=a.seed,
    )
    print(f"wrote {a.out}: {a.num_codebooks} codebooks, MSE {hist[0]:.4f} -> {hist[-1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
