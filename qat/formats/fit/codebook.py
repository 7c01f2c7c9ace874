"""Lloyd/EM optimiser for BOF4 / BOF4-S codebook levels (docs/formats.md); the command is
``qat codebook``.

The levels minimise the error on Gaussian weights ``w = s * x`` (not on ``x``), where ``s`` is the
block's scale (absmax for BOF4, signed absmax for BOF4-S) and ``x = w / s``:

- E-step: nearest level (nearest in ``x`` is nearest in ``w``: ``s`` is shared by the block).
  Ties on a midpoint go to the upper level, as in the quantiser (``qat.formats.codebook``).
- M-step, MSE: ``level = sum(s_k^2 x_k) / sum(s_k^2)`` over the cell;
  MAE: the ``|s_k|``-weighted median of the cell's ``x_k``.
- Pinned levels: -1, 0, +1 for BOF4; 0, +1 for BOF4-S (its most negative level is free).

Two forms of the expectations, same fixed point:

- ``integral`` (default): the element defining the scale sits exactly on a pinned level with
  zero error; every other element, given the block's max ``m = max|w|``, is ``N(0,1)`` truncated
  to ``(-m, m)``, and ``x = w/m`` (or ``-w/m``: same law by symmetry, so BOF4 and BOF4-S differ
  only in the pinned levels). With ``h(m) = phi(m) (2 Phi(m) - 1)^(I-2)`` (the max's density over
  the truncation mass), a cell ``[a, b]`` has ``sum s^2 = int h m^2 [Phi(mb) - Phi(ma)] dm`` and
  ``sum s^2 x = int h m [phi(ma) - phi(mb)] dm``: 1-D Simpson quadrature, exact to ~1e-15.
- ``mc``: seeded Gaussian blocks, the scale element dropped, samples sorted once with prefix sums
  of the weights, so each cell is a contiguous slice found by ``searchsorted``. Its noise is
  ~1e-3 at 2^23 samples and ~3e-4 at 2^25 (the weights ``s^2`` vary per block).

Both reproduce the published tables to ~1e-4 (integral: <= 3e-4).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from qat.errors import UsageError, check_one_of

KINDS = {"bof4": "absmax", "bof4s": "signed_absmax"}
METRICS = ("mse", "mae")
METHODS = ("integral", "mc")
DEFAULT_SAMPLES = 1 << 23  # Monte-Carlo: normalised scalars drawn (rounded up to whole blocks)
DEFAULT_ITERS = 5000
DEFAULT_TOL = 1e-10
_SQRT_2PI = math.sqrt(2 * math.pi)


def _phi(u: Tensor) -> Tensor:
    return torch.exp(-u * u / 2) / _SQRT_2PI


def pinned_mask(kind: str) -> Tensor:
    """Which of the 16 sorted levels stay fixed: index 0 (-1, BOF4 only), 7 (0) and 15 (+1)."""
    mask = torch.zeros(16, dtype=torch.bool)
    mask[[7, 15]] = True
    if kind == "bof4":
        mask[0] = True
    return mask


def initial_levels(kind: str) -> Tensor:
    """Evenly spaced start: 7 negative levels (the first is -1 for BOF4), 0, 7 positive, +1."""
    pos = torch.arange(1, 8, dtype=torch.float64) / 8
    neg = -torch.arange(7, 0, -1, dtype=torch.float64) / (7 if kind == "bof4" else 7.5)
    return torch.cat(
        [neg, torch.zeros(1, dtype=torch.float64), pos, torch.ones(1, dtype=torch.float64)]
    )


def _edges(levels: Tensor) -> Tensor:
    """Cell boundaries: -1, the 15 midpoints, +1 (x always lies in [-1, 1])."""
    one = torch.ones(1, dtype=torch.float64)
    return torch.cat([-one, (levels[1:] + levels[:-1]) / 2, one])


# --- numerical integration ---------------------------------------------------------------


def quadrature(block_size: int, points: int = 401) -> tuple[Tensor, Tensor]:
    """Nodes ``m`` and Simpson weights times ``h(m)`` over where ``h`` is not negligible."""
    m = torch.linspace(0, 12, 24001, dtype=torch.float64)
    log_h = -m * m / 2 + (block_size - 2) * torch.log(2 * torch.special.ndtr(m) - 1)
    log_h = torch.nan_to_num(log_h, nan=-math.inf)
    support = m[log_h > log_h.max() - 45]  # h below e^-45 of its peak contributes nothing
    lo, hi = float(support.min()), float(support.max())
    m = torch.linspace(lo, hi, points, dtype=torch.float64)
    simpson = torch.ones(points, dtype=torch.float64)
    simpson[1:-1:2], simpson[2:-1:2] = 4, 2
    h = _phi(m) * (2 * torch.special.ndtr(m) - 1).pow(block_size - 2)
    return m, h * simpson * (hi - lo) / (points - 1) / 3


def integral_step(quad: tuple[Tensor, Tensor], metric: str) -> Callable[[Tensor], Tensor]:
    """Unpinned M-step targets of every cell, from the quadrature (see module docstring)."""
    m, hw = quad

    def mse(levels: Tensor) -> Tensor:
        u = _edges(levels)[:, None] * m
        cdf, pdf = torch.special.ndtr(u), _phi(u)
        return ((pdf[:-1] - pdf[1:]) @ (hw * m)) / ((cdf[1:] - cdf[:-1]) @ (hw * m * m))

    # MAE: weighted median, F(t) = int h m Phi(mt) dm is the cell's cumulative |s| weight.
    # Invert a tabulated F by interpolation, then polish with two exact Newton steps.
    f = lambda t: torch.special.ndtr(t[:, None] * m) @ (hw * m)
    df = lambda t: _phi(t[:, None] * m) @ (hw * m * m)
    grid = torch.linspace(-1, 1, 4001, dtype=torch.float64)
    table = f(grid)

    def mae(levels: Tensor) -> Tensor:
        edges = _edges(levels)
        lo, hi = edges[:-1], edges[1:]
        fe = f(edges)
        target = (fe[:-1] + fe[1:]) / 2
        i = torch.searchsorted(table, target).clamp(1, grid.numel() - 1)
        frac = (target - table[i - 1]) / (table[i] - table[i - 1]).clamp_min(1e-300)
        t = grid[i - 1] + frac * (grid[i] - grid[i - 1])
        for _ in range(2):
            t = t - (f(t) - target) / df(t).clamp_min(1e-300)
        return torch.minimum(torch.maximum(t, lo), hi)

    return mse if metric == "mse" else mae


# --- Monte Carlo -------------------------------------------------------------------------


@dataclass
class SortedSamples:
    """Normalised scalars sorted ascending, with float64 prefix sums of the M-step weights."""

    x: Tensor  # [N] float32, sorted
    cum_w: Tensor  # [N+1] prefix sums of the weight (s^2 for MSE, |s| for MAE)
    cum_wx: Tensor  # [N+1] prefix sums of weight * x


def gaussian_samples(kind: str, block_size: int, samples: int, seed: int) -> tuple[Tensor, Tensor]:
    """``(x, s)`` from ``ceil(samples / (B-1))`` seeded Gaussian blocks, scale element dropped."""
    nblocks = max(1, math.ceil(samples / (block_size - 1)))
    w = torch.randn(nblocks, block_size, generator=torch.Generator().manual_seed(seed))
    idx = w.abs().argmax(dim=-1, keepdim=True)
    s = w.gather(-1, idx)
    if KINDS[kind] == "absmax":
        s = s.abs()
    keep = torch.ones_like(w, dtype=torch.bool).scatter_(-1, idx, False)
    return (w / s)[keep], s.expand_as(w)[keep]


def sort_samples(x: Tensor, s: Tensor, metric: str) -> SortedSamples:
    """Sort once; the prefix sums make every M-step a handful of subtractions."""
    order = torch.argsort(x, stable=True)
    xs, ss = x[order], s[order].double()
    w = ss * ss if metric == "mse" else ss.abs()
    zero = torch.zeros(1, dtype=torch.float64)
    cum_w = torch.cat([zero, torch.cumsum(w, 0)])
    return SortedSamples(xs, cum_w, torch.cat([zero, torch.cumsum(w * xs.double(), 0)]))


def mc_step(data: SortedSamples, metric: str) -> Callable[[Tensor], Tensor]:
    """Unpinned M-step targets of every cell from the sorted samples (NaN for an empty cell)."""
    n = data.x.numel()

    def step(levels: Tensor) -> Tensor:
        cuts = torch.searchsorted(data.x, _edges(levels)[1:-1].float(), right=False)
        lo = torch.cat([cuts.new_zeros(1), cuts])  # x == midpoint goes to the upper cell
        hi = torch.cat([cuts, cuts.new_full((1,), n)])
        wsum = data.cum_w[hi] - data.cum_w[lo]
        if metric == "mse":
            return (data.cum_wx[hi] - data.cum_wx[lo]) / wsum
        # first sample whose cumulative weight reaches half the cell's weight
        pos = torch.searchsorted(data.cum_w, data.cum_w[lo] + wsum / 2, right=False)
        pos = torch.maximum(torch.minimum(pos, hi), lo + 1).clamp(1, max(n, 1))
        return torch.where(wsum > 0, data.x[pos - 1].double(), math.nan)

    return step


# --- driver ------------------------------------------------------------------------------


def fit_codebook(
    kind: str = "bof4s",
    metric: str = "mse",
    block_size: int = 64,
    method: str = "integral",
    samples: int = DEFAULT_SAMPLES,
    iters: int = DEFAULT_ITERS,
    seed: int = 0,
    tol: float = DEFAULT_TOL,
    progress: bool = False,
) -> tuple[list[float], int]:
    """Sorted 16 levels minimising ``metric`` on Gaussian weights, and the iterations run.

    Stops once no level moves by more than ``tol`` in an iteration. Deterministic (``mc``: for
    a given ``seed`` and ``samples``).
    """
    for key, value, valid in (
        ("kind", kind, tuple(KINDS)),
        ("metric", metric, METRICS),
        ("method", method, METHODS),
    ):
        check_one_of(key, value, valid, UsageError)
    if block_size < 2:
        raise UsageError(f"block_size must be >= 2, got {block_size}")
    if method == "integral":
        step = integral_step(quadrature(block_size), metric)
    else:
        step = mc_step(
            sort_samples(*gaussian_samples(kind, block_size, samples, seed), metric), metric
        )
    levels, pinned = initial_levels(kind), pinned_mask(kind)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=iters, desc=f"{kind}-{metric} B={block_size}", unit="it")
    done = 0
    while done < iters:
        done += 1
        target = step(levels)
        new = torch.where(pinned | torch.isnan(target), levels, target)
        delta = float((new - levels).abs().max())
        levels = new
        if bar is not None:
            bar.update(1)
            bar.set_postfix(delta=f"{delta:.1e}", refresh=False)
        if delta <= tol:
            break
    if bar is not None:
        bar.close()
    return [float(v) for v in levels.float()], done


def write_codebook(
    path: str,
    kind: str,
    metric: str,
    block_size: int,
    levels: list[float],
    method: str,
    samples: int | None,
    iters: int,
    seed: int | None,
) -> None:
    """The JSON file that a format spec's ``codebook_file:`` reads."""
    doc = {
        "kind": kind,
        "metric": metric,
        "block_size": block_size,
        "normalization": KINDS[kind],
        "levels": levels,
        "method": method,
        "samples": samples,
        "iters": iters,
        "seed": seed,
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
