"""Codebook formats (NF4, AF4, BOF4, BOF4-S) and OPQ against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from qat.formats import FormatError, make_format
from qat.formats.codebook import AF4_LEVELS, BOF4_TABLES, NF4_LEVELS
from qat.formats.opq import max_quantile, opq_bits

F32 = np.float32

# Spot values copied from the BOF4 paper's tables (first negative free level, a middle and the
# last free level), checked against the tables the formats use.
PUBLISHED = {
    ("bof4", 64): {1: -0.7535245418548584, 8: 0.0887245312333107, 14: 0.7790452241897583},
    ("bof4s", 64): {0: -0.8568463921546936, 8: 0.0887671709060669, 14: 0.7791395783424377},
    ("bof4s", 32): {0: -0.8732797503471375, 8: 0.0925938412547112, 14: 0.7956376671791077},
    ("bof4s", 128): {0: -0.83739173412323, 8: 0.0850915610790253, 14: 0.761027991771698},
}


def q(spec: dict, x: list[float] | torch.Tensor, dim: int = -1) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float32)
    return make_format(spec).quantize(t, dim=dim)


def mid(a: float, b: float) -> float:
    """The float32 midpoint the quantiser compares against."""
    return float((F32(a) + F32(b)) / F32(2))


def test_published_tables_exact_in_formats():
    for (kind, block), spots in PUBLISHED.items():
        f = make_format({"format": kind, "block_size": block})
        assert len(f.levels) == 16 and f.levels == BOF4_TABLES[(kind, "mse", block)]
        for i, v in spots.items():
            assert f.levels[i] == v
        assert f.levels[7] == 0.0 and f.levels[15] == 1.0
    assert make_format({"format": "nf4"}).levels == NF4_LEVELS
    assert make_format({"format": "af4"}).levels[9] == 0.12934483 == AF4_LEVELS[9]
    assert make_format({"format": "bof4"}).levels[0] == -1.0


def test_levels_map_to_themselves():
    for name in ("nf4", "af4", "bof4", "bof4s"):
        f = make_format({"format": name})  # one ragged block of 16
        x = torch.tensor(f.levels, dtype=torch.float32)
        assert torch.equal(f.quantize(x), x), name
        assert torch.equal(f.quantize(3 * x), 3 * x), name  # scale 3: q = 3 * level


def test_nearest_level_and_ties_go_up():
    nf = NF4_LEVELS
    x = [1.0, mid(0.0, nf[8]), mid(nf[6], 0.0), 0.5, 0.2, -0.4, 0.1, mid(nf[12], nf[13])]
    want = [1.0, nf[8], 0.0, nf[12], nf[9], nf[3], nf[8], nf[13]]
    assert q({"format": "nf4", "block_size": 8}, x).tolist() == pytest.approx(want, abs=0)


def test_zero_block_and_ragged_last_block():
    out = q({"format": "nf4", "block_size": 4}, [0.0, 0.0, 0.0, 0.0, 0.2, -0.4, 1.0, 0.1, -3.0])
    nf = NF4_LEVELS
    f32 = lambda v: float(F32(v))
    assert out.tolist() == [0, 0, 0, 0, f32(nf[9]), f32(nf[3]), 1.0, f32(nf[8]), -3.0]


def test_absmax_vs_signed_absmax():
    x = [-2.0, 1.0, 0.0, 0.5]
    bof4, bof4s = BOF4_TABLES[("bof4", "mse", 64)], BOF4_TABLES[("bof4s", "mse", 64)]
    # absmax: s = 2, x/s = [-1, .5, 0, .25]; .5 -> 0.4885 (mid to .6187 is .5536)
    a = q({"format": "bof4"}, x)
    assert a.tolist() == pytest.approx([-2.0, 2 * bof4[12], 0.0, 2 * bof4[10]], rel=1e-7)
    # signed absmax: s = -2, x/s = [1, -.5, 0, -.25]: -.5 -> -.5235, -.25 -> -.2911 (mid -.2405)
    s = q({"format": "bof4s"}, x)
    assert s.tolist() == pytest.approx([-2.0, -2 * bof4s[2], 0.0, -2 * bof4s[4]], rel=1e-7)
    # BOF4-S maps the signed max to exactly +1: the largest-|w| element is reproduced exactly.
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    out = q({"format": "bof4s"}, w)
    idx = w.abs().argmax(dim=-1, keepdim=True)
    assert torch.equal(out.gather(-1, idx), w.gather(-1, idx))
    assert make_format({"format": "bof4s"}).normalization == "signed_absmax"
    assert make_format({"format": "bof4"}).normalization == "absmax"


def test_dtypes_and_dim():
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    f = make_format({"format": "bof4s", "block_size": 32})
    y32 = f.quantize(w)
    assert y32.dtype == torch.float32 and y32.shape == w.shape
    wb = w.bfloat16()
    yb = f.quantize(wb)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, f.quantize(wb.float()).bfloat16())
    assert torch.equal(f.quantize(w.T.contiguous(), dim=0), y32.T)
    w3 = torch.randn(2, 40, 3)
    assert torch.equal(f.quantize(w3, dim=1), f.quantize(w3.movedim(1, -1)).movedim(-1, 1))


def test_nan_inf_pass_through():
    x = [1.0, float("nan"), 0.5, float("inf"), -float("inf"), 0.2, -0.4, 0.1]
    out = q({"format": "nf4", "block_size": 8}, x)
    assert math.isnan(out[1]) and out[3] == math.inf and out[4] == -math.inf
    ref = q({"format": "nf4", "block_size": 8}, [1.0, 0, 0.5, 0, 0, 0.2, -0.4, 0.1])
    assert out[[0, 2, 5, 6, 7]].tolist() == ref[[0, 2, 5, 6, 7]].tolist()


def test_bits_per_element():
    assert make_format({"format": "nf4"}).bits_per_element == 4.25
    assert make_format({"format": "bof4s", "block_size": 32}).bits_per_element == 4.5
    f = make_format({"format": "bof4s", "outliers": "opq"})
    extra = (1 - 0.95 ** (1 / 64)) * (16 + 6)  # expected outliers x (bf16 value + 6-bit index)
    assert f.bits_per_element == pytest.approx(4.25 + extra, rel=1e-12)
    assert opq_bits(64, 0.95) == pytest.approx(extra) and 0.017 < extra < 0.018


def test_invalid_params():
    with pytest.raises(FormatError, match="qat codebook --kind bof4 --metric mse --block-size 32"):
        make_format({"format": "bof4", "block_size": 32})
    with pytest.raises(FormatError, match="mae"):
        make_format({"format": "bof4s", "metric": "mae"})
    with pytest.raises(FormatError, match="normalization.*absmax, signed_absmax"):
        make_format({"format": "nf4", "normalization": "max"})
    with pytest.raises(FormatError, match="outliers.*none, opq"):
        make_format({"format": "bof4s", "outliers": "yes"})
    with pytest.raises(FormatError, match="outlier_quantile"):
        make_format({"format": "bof4s", "outlier_quantile": 1.0})
    with pytest.raises(FormatError, match="metric"):
        make_format({"format": "bof4", "metric": "l1"})
    with pytest.raises(FormatError, match="codebook_file"):
        make_format({"format": "nf4", "codebook_file": "x.json"})
    with pytest.raises(FormatError, match="could not be read"):
        make_format({"format": "bof4s", "codebook_file": "/nonexistent/cb.json"})


# --- OPQ -----------------------------------------------------------------------------------


def test_opq_threshold_matches_scipy():
    for i in (2, 17, 64, 128):
        ref = norm.ppf((0.95 ** (1 / i) + 1) / 2)
        assert float(max_quantile(i, 0.95)) == pytest.approx(ref, rel=1e-12)
        # F_M(ref) = (2 Phi(ref) - 1)^I = q
        assert (2 * norm.cdf(ref) - 1) ** i == pytest.approx(0.95, rel=1e-12)


def test_opq_outliers_kept_in_bf16_and_rest_quantised():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(8, 64, generator=gen)
    w[0, 5], w[1, 60], w[2, 0] = 10.0123, -7.77777, 0.3  # two clear outliers
    f = make_format({"format": "bof4s", "outliers": "opq"})
    out = f.quantize(w)
    arr = w.double().numpy()
    thresh = arr.std(axis=1, ddof=1) * norm.ppf((0.95 ** (1 / 64) + 1) / 2)
    mask = np.abs(arr) > thresh[:, None]
    assert mask[0, 5] and mask[1, 60]
    kept = w.bfloat16().float()
    assert torch.equal(out[torch.from_numpy(mask)], kept[torch.from_numpy(mask)])
    assert out[0, 5] == 10.0 and out[0, 5] != w[0, 5]  # 10.0123 in bf16 is 10.0
    # the others: the plain format on the block with the outliers set to 0
    inl = torch.where(torch.from_numpy(mask), torch.zeros_like(w), w)
    plain = make_format({"format": "bof4s"}).quantize(inl)
    assert torch.equal(out[~torch.from_numpy(mask)], plain[~torch.from_numpy(mask)])
    # signed max of the inliers maps to +1, so it is reproduced exactly
    idx = inl.abs().argmax(dim=-1)
    assert torch.equal(out[torch.arange(8), idx], w[torch.arange(8), idx])


def test_opq_ragged_block_uses_real_count():
    x = torch.tensor([0.1, -0.2, 0.15, 5.0, 0.05, -0.1, 0.12, 0.3, 0.2, 0.1])  # 64-block: n = 10
    f = make_format({"format": "nf4", "outliers": "opq"})
    a = x.double().numpy()
    thr = a.std(ddof=1) * norm.ppf((0.95 ** (1 / 10) + 1) / 2)  # I = 10, not 64
    assert (np.abs(a) > thr).tolist() == [False] * 3 + [True] + [False] * 6
    out = f.quantize(x)
    assert out[3] == 5.0
    # inliers: absmax 0.3 -> 0.2 / 0.3 = 0.667 -> 0.7230 (mid to 0.5626 is 0.6428)
    assert out[8] == pytest.approx(0.3 * NF4_LEVELS[14], rel=1e-7)
    assert out[7] == pytest.approx(0.3, rel=1e-7)
