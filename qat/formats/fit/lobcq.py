"""Calibrate LO-BCQ codebooks (docs/formats.md); the command is ``qat fit-lobcq``.

Alternating fit on the normalised scalars ``y`` (each block array scaled by its E8M0 scale, as
in ``qat.formats.lobcq``, so entries live in the 6-bit integer domain):

1. assign each block of ``block_len`` scalars to the codebook with the least squared error
   (each scalar to its nearest entry);
2. update every codebook on the scalars of its blocks: the 16 integer entries in [-31, 31]
   with the least squared error, each scalar going to its nearest entry, found exactly by
   dynamic programming over the lookup bins (``best_entries``); kept only where it lowers the
   blocks' error; a codebook with no blocks stays. (Rounding each entry's mean to an integer,
   the Lloyd-Max step, stalls: from a rounded start no entry moves.) Before it, a warm start
   runs the Lloyd-Max loop on a 1/16 grid, each entry the mean of its scalars rounded to that
   grid, and its codebooks become integer ones by the same exact update for the blocks each
   holds (``integer_start``; see ``fit_lobcq``).

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
    nbins,
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
    """Alternate assignment and codebook updates with entries on the ``1/res`` grid.

    The update on the integer grid (``res`` 1) is exact (``best_entries``); on a finer grid
    each entry becomes the mean of its scalars, rounded to the grid. Returns the codebooks and
    the MSE of each assignment step (non-increasing); stops early when no entry changes.
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
        if res == 1:
            new = _exact_update(y, bins, choice, err, cbs)
        else:
            key = (
                choice.unsqueeze(-1) * NUM_ENTRIES + lut_idx[choice.unsqueeze(-1), bins]
            ).flatten()
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


def best_entries(count: Tensor, s1: Tensor, s2: Tensor) -> Tensor:
    """The 16 integer entries in [-31, 31] with the least squared error for scalars given per
    lookup bin (``bins_of``) as count, sum and sum of squares: float64 ``[16]``, increasing.

    Every scalar of a bin goes to one entry (the bin's centre decides, as in the format), so
    between consecutive entries ``a < b`` the bins below bin ``a + b + 62`` go to ``a`` and the
    rest to ``b``: the total is a sum of terms over consecutive pairs, minimised exactly by
    dynamic programming over increasing entries (63 candidate values).
    """
    nv = 2 * ENTRY_MAX + 1  # candidate value i is i - 31, whose own bin is 2 i
    zero = torch.zeros(1, dtype=torch.float64)
    pn, p1, p2 = (torch.cat([zero, t.double().cumsum(0)]) for t in (count, s1, s2))
    vals = torch.arange(nv, dtype=torch.float64) - ENTRY_MAX

    def cost(lo: Tensor, hi: Tensor, v: Tensor) -> Tensor:  # bins [lo, hi) all to value v
        return (p2[hi] - p2[lo]) - 2 * v * (p1[hi] - p1[lo]) + v * v * (pn[hi] - pn[lo])

    i = torch.arange(nv)
    left = cost(torch.zeros_like(i), 2 * i, vals)
    right = cost(2 * i, torch.full_like(i, count.numel()), vals)
    a, b = i[:, None], i[None, :]
    pair = cost(2 * a, a + b, vals[:, None]) + cost(a + b, 2 * b, vals[None, :])
    pair = torch.where(a < b, pair, torch.inf)
    best, back = left, []
    for _ in range(NUM_ENTRIES - 1):
        best, arg = (best[:, None] + pair).min(dim=0)  # the first of equal minima
        back.append(arg)
    last = int((best + right).argmin())
    picked = [last]
    for arg in reversed(back):
        picked.append(int(arg[picked[-1]]))
    return vals[torch.tensor(picked[::-1])]


def _block_errors(y: Tensor, book: Tensor) -> Tensor:
    """float32 errors of blocks ``y`` under one codebook, added left to right as ``assign``."""
    _, lut = build_luts(book[None])
    sq = (y - lut[0][bins_of(y)]).square()
    err = sq[:, 0]
    for i in range(1, y.shape[1]):
        err = err + sq[:, i]
    return err


def _integer_candidates(y: Tensor, choice: Tensor, ncb: int) -> list[Tensor | None]:
    """``best_entries`` of each codebook's blocks (per ``choice``); None for one with none."""
    nb = nbins()
    key = (choice.unsqueeze(-1) * nb + bins_of(y)).flatten()
    yd = y.flatten().double()
    count, s1, s2 = (
        torch.zeros(ncb * nb, dtype=torch.float64).index_add_(0, key, v).reshape(ncb, nb)
        for v in (torch.ones_like(yd), yd, yd * yd)
    )
    return [
        best_entries(count[c], s1[c], s2[c]).float() if count[c].sum() > 0 else None
        for c in range(ncb)
    ]


def _exact_update(y: Tensor, bins: Tensor, choice: Tensor, err: Tensor, cbs: Tensor) -> Tensor:
    """Each codebook replaced by ``best_entries`` of its blocks' scalars where that lowers its
    blocks' float32 error (the quantiser's own sums, so the next MSE cannot rise)."""
    new = cbs.clone()
    for c, cand in enumerate(_integer_candidates(y, choice, cbs.shape[0])):
        mine = choice == c
        if cand is not None and (
            _block_errors(y[mine], cand).double().sum() < err[mine].double().sum()
        ):
            new[c] = cand
    return new


def integer_start(y: Tensor, codebooks: Tensor, res: int) -> Tensor:
    """Integer codebooks from codebooks on the ``1/res`` grid: for the blocks each of them
    holds, the best integer entries (``best_entries``); rounding each entry instead loses
    much of what the finer grid found. A codebook that holds no block is rounded."""
    _, lut = build_luts(codebooks, res)
    choice, _, _ = assign(y, lut, res=res)
    cands = _integer_candidates(y, choice, codebooks.shape[0])
    rounded = round_codebooks(codebooks)
    return torch.stack([rounded[c] if v is None else v for c, v in enumerate(cands)])


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
    (nearly continuous Lloyd) precedes it; the best integer entries for the blocks each of its
    codebooks holds (``integer_start``) are the integer fit's starting point.
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
        cbs = integer_start(y, cbs, 16)
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
