"""Calibrate LO-BCQ codebooks (docs/formats.md); the command is ``qat fit-lobcq``.

Alternating fit on the normalised scalars ``y`` (each block array scaled by its E8M0 scale, as
in ``qat.formats.lobcq``, so entries live in the 6-bit integer domain):

1. assign each block of ``block_len`` scalars to the codebook with the least squared error
   (each scalar to its nearest entry);
2. Lloyd-Max update of every codebook on the scalars of its blocks: each entry becomes the mean
   of the scalars mapped to it, rounded to the nearest integer and clamped to [-31, 31] (for a
   sum of squares that is the exact integer minimiser), an entry with no scalars stays.
   Before it, a warm start runs the same loop on a 1/16 grid (see ``fit_lobcq``).

Both steps minimise the same squared error over their own variables, so the per-iteration
mean squared error (normalised domain, per scalar) in ``history`` never increases. It stops
early when no entry changes. Initialisation (deterministic): blocks sorted by their absmax and
split into ``num_codebooks`` equal groups, each codebook starting at 16 quantiles of its group,
so codebooks begin specialised to narrow and wide blocks. ``seed`` picks the subsample.

File format: JSON ``{format: lobcq, num_codebooks, block_len, array_len, entry_bits: 6,
scale: e8m0, codebooks: [[16 ints], ...], history, source, iters, seed}``.
"""

from __future__ import annotations

import json
import math

import torch
from torch import Tensor

from qat.errors import DataError, UsageError
from qat.formats.lobcq import (
    ENTRY_MAX,
    NUM_ENTRIES,
    assign,
    bins_of,
    build_luts,
    normalize,
    round_codebooks,
)

DEFAULT_MAX_BLOCKS = 1 << 18


def _blocks(samples: Tensor, block_len: int, array_len: int) -> Tensor:
    """Normalised blocks ``[M, L_b]`` of a tensor (arrays along its last dim); all-padding
    blocks dropped, non-finite values read as 0."""
    x = samples.detach().float().reshape(-1, samples.shape[-1] if samples.dim() else 1)
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    y, _, _, n = normalize(x, block_len, array_len)
    y = y.reshape(x.shape[0], -1, block_len)  # [rows, blocks per row, L_b]
    keep = torch.arange(y.shape[1]) * block_len < n
    return y[:, keep].reshape(-1, block_len)


def _initial(y: Tensor, num_codebooks: int) -> Tensor:
    order = torch.argsort(y.abs().amax(dim=-1), stable=True)
    probs = (torch.arange(NUM_ENTRIES, dtype=torch.float32) + 0.5) / NUM_ENTRIES
    fallback = torch.linspace(-ENTRY_MAX, ENTRY_MAX, NUM_ENTRIES)
    rows = []
    for group in torch.tensor_split(order, num_codebooks):
        vals = y[group].flatten()
        if vals.numel() > 1 << 24:  # torch.quantile's input limit
            vals = vals[:: math.ceil(vals.numel() / (1 << 24))]
        rows.append(torch.quantile(vals, probs) if vals.numel() else fallback)
    return round_codebooks(torch.stack(rows))


def lloyd(
    y: Tensor, codebooks: Tensor, iters: int, res: int = 1, bar=None
) -> tuple[Tensor, list[float]]:
    """Alternate assignment and Lloyd-Max updates with entries on the ``1/res`` grid.

    Returns the codebooks and the MSE of each assignment step (non-increasing); stops early
    when no entry changes.
    """
    bins = bins_of(y, res)
    cbs = round_codebooks(codebooks, res)
    ncb, size = cbs.shape[0], cbs.numel()
    history: list[float] = []
    for it in range(iters + 1):
        lut_idx, lut_val = build_luts(cbs, res)
        choice, _, err = assign(y, lut_val, res=res)
        history.append(float(err.double().sum() / y.numel()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(mse=f"{history[-1]:.4f}", refresh=False)
        if it == iters:
            break
        key = (choice.unsqueeze(-1) * NUM_ENTRIES + lut_idx[choice.unsqueeze(-1), bins]).flatten()
        sums = torch.zeros(size, dtype=torch.float64).index_add_(0, key, y.flatten().double())
        counts = torch.zeros(size, dtype=torch.float64).index_add_(
            0, key, torch.ones_like(key, dtype=torch.float64)
        )
        new = torch.where(
            counts > 0, round_codebooks(sums / counts.clamp_min(1), res), cbs.flatten()
        ).reshape(ncb, NUM_ENTRIES)
        if torch.equal(new, cbs):
            break
        cbs = new
    return cbs, history


def fit_lobcq(
    samples: Tensor,
    num_codebooks: int = 16,
    block_len: int = 8,
    array_len: int = 64,
    iters: int = 30,
    seed: int = 0,
    max_blocks: int | None = DEFAULT_MAX_BLOCKS,
    warm_iters: int = 20,
    progress: bool = False,
) -> tuple[Tensor, list[float]]:
    """Codebooks ``[N_c, 16]`` (rows sorted, integer-valued float32) and the MSE history.

    ``history[i]``: MSE (normalised domain, per scalar) after the i-th assignment step of the
    6-bit integer fit; non-increasing. A warm start of ``warm_iters`` iterations on a 1/16 grid
    (nearly continuous Lloyd: integer rounding from the start freezes most entries after one
    step) precedes it; rounding its result is the integer fit's starting point.
    """
    if array_len % block_len:
        raise UsageError(f"array_len ({array_len}) must be a multiple of block_len ({block_len})")
    y = _blocks(samples, block_len, array_len)
    if y.shape[0] == 0:
        raise DataError("fit_lobcq: no samples")
    if max_blocks is not None and y.shape[0] > max_blocks:
        gen = torch.Generator().manual_seed(seed)
        y = y[torch.randperm(y.shape[0], generator=gen)[:max_blocks]]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=warm_iters + iters + 2, desc=f"lobcq N_c={num_codebooks}", unit="it")
    cbs = _initial(y, num_codebooks)
    if warm_iters > 0:
        cbs, _ = lloyd(y, cbs, warm_iters, res=16, bar=bar)
    cbs, history = lloyd(y, cbs, iters, res=1, bar=bar)
    if bar is not None:
        bar.close()
    return cbs.sort(dim=-1).values, history


def save_codebooks(
    path: str, codebooks: Tensor, block_len: int, array_len: int, **meta: object
) -> None:
    """Write the JSON file that ``{format: lobcq, codebook_file: path}`` reads."""
    cbs = round_codebooks(codebooks)
    doc = {
        "format": "lobcq",
        "num_codebooks": int(cbs.shape[0]),
        "block_len": block_len,
        "array_len": array_len,
        "entry_bits": 6,
        "scale": "e8m0",
        "codebooks": [[int(v) for v in row] for row in cbs.tolist()],
        **meta,
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
