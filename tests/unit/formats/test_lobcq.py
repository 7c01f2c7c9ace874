"""LO-BCQ: hand-computed quantisation, the alternating fit, codebook files and commands."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qat.cli.fit_lobcq import main
from qat.formats import FormatError, make_format
from qat.formats.fit.lobcq import fit_lobcq, save_codebooks
from qat.formats.lobcq import (
    DEFAULT_CODEBOOKS,
    array_exponent,
    assign,
    bins_of,
    build_luts,
    load_codebooks,
    normalize,
)

CB0 = list(range(-8, 8))  # 16 consecutive integers
CB1 = list(range(-30, 31, 4))  # -30, -26, ..., 30


def reference(x: list[float], books: list[list[int]], block_len: int, array_len: int):
    """Naive LO-BCQ in float64: E8M0 array scale, per-block least-MSE codebook, ties up."""
    out = []
    for a in range(0, len(x), array_len):
        arr = x[a : a + array_len]
        amax = max(abs(v) for v in arr)
        if amax == 0:
            out += [0.0] * len(arr)
            continue
        e = -127
        while amax > 31 * 2.0**e:
            e += 1
        for b in range(0, len(arr), block_len):
            ys = [min(31.0, max(-31.0, v / 2.0**e)) for v in arr[b : b + block_len]]
            best = None
            for book in books:
                qs = [min(book, key=lambda c, y=y: (abs(y - c), -c)) for y in ys]
                err = sum((y - c) ** 2 for y, c in zip(ys, qs))
                if best is None or err < best[0]:
                    best = (err, qs)
            out += [c * 2.0**e for c in best[1]]
    return out


def per_codebook_assign(y, lut_values, valid=None):
    """The reference before it was vectorised: one pass over ``y`` per codebook (torch's sum
    over a last dim of 8 adds left to right), stacked, the first least error."""
    bins = bins_of(y)
    errs = []
    for c in range(lut_values.shape[0]):
        sq = (y - lut_values[c].take(bins)).square()
        errs.append((sq if valid is None else sq * valid).sum(dim=-1))
    stacked = torch.stack(errs)
    choice = stacked.argmin(dim=0)
    flat = choice.unsqueeze(-1) * lut_values.shape[1] + bins
    return choice, lut_values.flatten().take(flat), stacked.gather(0, choice[None])[0]


def float32_assign(y, books):
    """numpy LO-BCQ assignment of blocks ``y`` ``[M, L_b]``: each scalar's nearest entry (ties
    up), float32 squared errors added left to right, the first least error wins."""
    y = y.numpy()
    errs, vals = [], []
    for book in books:
        entries = np.array(sorted(book), dtype=np.float32)
        dist = np.abs(y[..., None].astype(np.float64) - entries)
        # the last of equal distances: the upper entry
        v = entries[dist.shape[-1] - 1 - np.argmin(dist[..., ::-1], axis=-1)]
        d = (y - v).astype(np.float32)
        err = np.zeros(y.shape[0], dtype=np.float32)
        for i in range(y.shape[1]):
            err = (err + d[:, i] * d[:, i]).astype(np.float32)
        errs.append(err)
        vals.append(v)
    choice = np.argmin(np.stack(errs), axis=0)
    return choice.tolist(), np.stack(vals)[choice, np.arange(y.shape[0])].tolist()


@pytest.fixture
def two_books(tmp_path):
    path = tmp_path / "two.json"
    save_codebooks(str(path), torch.tensor([CB0, CB1], dtype=torch.float32), 8, 16)
    return str(path)


def test_bits_per_element(tmp_path):
    assert make_format({"format": "lobcq"}).bits_per_element == 4.625
    eight = tmp_path / "eight.json"
    save_codebooks(str(eight), torch.zeros(8, 16), 8, 64)
    assert (
        make_format(
            {"format": "lobcq", "num_codebooks": 8, "codebook_file": str(eight)}
        ).bits_per_element
        == 4.5
    )
    wide = tmp_path / "wide.json"
    save_codebooks(str(wide), torch.zeros(16, 16), 8, 128)
    assert (
        make_format(
            {"format": "lobcq", "array_len": 128, "codebook_file": str(wide)}
        ).bits_per_element
        == 4.5625
    )


def test_other_shapes_need_a_fitted_file_not_a_silent_fit():
    with pytest.raises(
        FormatError,
        match=r"no stored codebooks for num_codebooks=8.*"
        r"qat fit-lobcq --gaussian 131072 --num-codebooks 8",
    ):
        make_format({"format": "lobcq", "num_codebooks": 8})


def test_array_exponent_hand_values():
    amax = torch.tensor([31.0, 31.5, 15.5, 1.0, 0.0, 62.0, 1e-40])
    assert array_exponent(amax).tolist() == [0, 1, -1, -4, -127, 1, -127]
    # amax / 31 underflows to 0 (it was read as 2^0): still the smallest exponent
    assert array_exponent(torch.tensor([1e-45, 2e-44, 3e-44])).tolist() == [-127] * 3


def test_hand_computed_two_codebooks(two_books):
    f = make_format(
        {
            "format": "lobcq",
            "block_len": 8,
            "array_len": 16,
            "num_codebooks": 2,
            "codebook_file": two_books,
        }
    )
    # Array max 31 -> scale 2^0. Block 1: CB0 error 0.5 (the two half-way ties) beats CB1.
    # Block 2 holds 31: CB1 (31 -> 30; ties 4 -> 6, -4 -> -2, 12 -> 14, 0 -> 2) beats CB0.
    x = [1.0, -2.0, 3.0, 0.5, -0.5, 7.0, -8.0, 0.0, 31.0, 0.5, 4.0, -4.0, 12.0, 0.0, 2.0, -6.0]
    want = [1, -2, 3, 1, 0, 7, -8, 0, 30, 2, 6, -2, 14, 2, 2, -6]
    out = f.quantize(torch.tensor(x))
    assert out.tolist() == want == reference(x, [CB0, CB1], 8, 16)
    # ties between entries go up: 0.5 between 0 and 1 -> 1 ; -0.5 between -1 and 0 -> 0
    assert out[3] == 1 and out[4] == 0


def test_random_against_reference_ragged_dims_dtypes(two_books):
    f = make_format(
        {
            "format": "lobcq",
            "block_len": 8,
            "array_len": 16,
            "num_codebooks": 2,
            "codebook_file": two_books,
        }
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, generator=gen) * torch.tensor([1e-3, 1.0, 50.0])[:, None]
    x[1, :16] = 0  # an all-zero array
    out = f.quantize(x)
    for r in range(3):
        ref = reference(x[r].double().tolist(), [CB0, CB1], 8, 16)
        assert out[r].tolist() == pytest.approx(ref, rel=1e-6, abs=0)
    assert torch.equal(out[1, :16], torch.zeros(16))
    assert torch.equal(f.quantize(x.T.contiguous(), dim=0), out.T)
    xb = x.bfloat16()
    assert f.quantize(xb).dtype == torch.bfloat16
    assert torch.equal(f.quantize(xb), f.quantize(xb.float()).bfloat16())


def test_ragged_padding_does_not_choose_codebook(tmp_path):
    # A ragged block [20, 18] + 6 padding zeros. Book A (-15..0) costs 724 on the real pair;
    # book B (-28..-15, 18, 20) costs 0 on it but 6 * 15^2 on the padding: B must win.
    path = tmp_path / "c.json"
    books = [list(range(-15, 1)), list(range(-28, -14)) + [18, 20]]
    save_codebooks(str(path), torch.tensor(books, dtype=torch.float32), 8, 8)
    f = make_format(
        {
            "format": "lobcq",
            "block_len": 8,
            "array_len": 8,
            "num_codebooks": 2,
            "codebook_file": str(path),
        }
    )
    out = f.quantize(torch.tensor([20.0, 18.0]))
    assert out.tolist() == [20.0, 18.0] == reference([20.0, 18.0], books, 8, 8)


def test_nan_inf_pass_through():
    x = torch.tensor([1.0, float("nan"), -2.0, float("inf")] + [0.5] * 60)
    out = make_format({"format": "lobcq"}).quantize(x)
    assert math.isnan(out[1]) and out[3] == math.inf and torch.isfinite(out[[0, 2]]).all()


def test_default_codebooks_deterministic_and_valid():
    f = make_format({"format": "lobcq"})
    assert f.codebooks == DEFAULT_CODEBOOKS and len(f.codebooks) == 16
    assert all(len(r) == 16 and all(-31 <= v <= 31 for v in r) for r in f.codebooks)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    y = f.quantize(w)
    assert torch.equal(y, make_format({"format": "lobcq"}).quantize(w))
    rel = float(((y - w) ** 2).mean() / (w**2).mean())
    assert rel < 0.02  # 4.6 bits on Gaussian data


def test_fit_history_non_increasing():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen) * torch.rand(256, 1, generator=gen)
    for warm in (0, 10):
        cbs, hist = fit_lobcq(x, num_codebooks=4, iters=15, seed=0, warm_iters=warm)
        assert cbs.shape == (4, 16) and torch.equal(cbs, cbs.round())
        assert cbs.abs().max() <= 31 and torch.equal(cbs, cbs.sort(dim=-1).values)
        assert all(b <= a * (1 + 1e-9) for a, b in zip(hist, hist[1:])), hist
    # the 1/16-grid phase on its own is monotone too and ends below its start
    from qat.formats.fit.lobcq import _blocks, _initial, lloyd

    y = _blocks(x, 8, 64)
    _, hist = lloyd(y, _initial(y, 4), 15, res=16)
    assert len(hist) > 3 and all(b <= a * (1 + 1e-9) for a, b in zip(hist, hist[1:]))
    assert hist[-1] < hist[0]


def test_save_load_round_trip_and_spec(tmp_path):
    cbs, hist = fit_lobcq(torch.randn(64, 64), num_codebooks=2, iters=3, warm_iters=2)
    path = tmp_path / "cb.json"
    save_codebooks(str(path), cbs, 8, 64, history=hist)
    loaded, meta = load_codebooks(str(path))
    assert torch.equal(loaded, cbs) and meta["num_codebooks"] == 2 and meta["history"] == hist
    f = make_format({"format": "lobcq", "num_codebooks": 2, "codebook_file": str(path)})
    assert f.codebooks == tuple(tuple(int(v) for v in r) for r in cbs.tolist())
    assert f.quantize(torch.randn(4, 64)).shape == (4, 64)
    with pytest.raises(FormatError, match="num_codebooks: 2"):
        make_format({"format": "lobcq", "codebook_file": str(path)})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"codebooks": [[1, 2]]}))
    with pytest.raises(FormatError, match="16 finite numbers"):
        make_format({"format": "lobcq", "codebook_file": str(bad)})
    with pytest.raises(FormatError, match="multiple of block_len"):
        make_format({"format": "lobcq", "array_len": 60})


def test_main_gaussian_and_model(tmp_path):
    out = tmp_path / "g.json"
    assert (
        main(
            [
                "--gaussian",
                "16384",
                "--num-codebooks",
                "4",
                "--iters",
                "3",
                "--warm-iters",
                "2",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    make_format({"format": "lobcq", "num_codebooks": 4, "codebook_file": str(out)})
    model = tmp_path / "m"
    model.mkdir()
    save_file(
        {
            "a.weight": torch.randn(32, 96),
            "a.bias": torch.randn(32),
            "b.weight": torch.randn(16, 64).half(),
        },
        str(model / "model.safetensors"),
    )
    for src in (str(model), str(model / "model.safetensors")):
        out = tmp_path / "m.json"
        assert (
            main(
                [
                    "--from-model",
                    src,
                    "--num-codebooks",
                    "2",
                    "--iters",
                    "2",
                    "--warm-iters",
                    "2",
                    "--out",
                    str(out),
                    "--no-progress",
                ]
            )
            == 0
        )
        doc = json.loads(out.read_text())
        assert doc["source"].startswith("model:") and len(doc["codebooks"]) == 2
        make_format({"format": "lobcq", "num_codebooks": 2, "codebook_file": str(out)})


@pytest.mark.slow
def test_fit_beats_the_defaults_on_their_own_data():
    """DEFAULT_CODEBOOKS were fitted on this data by the fit as it was up to e1af0a2 (its
    integer step rounded each entry's mean; MSE 0.2622); the exact integer step goes lower."""
    data = torch.randn(8192, 64, generator=torch.Generator().manual_seed(0))
    _, hist = fit_lobcq(data, 16, 8, 64, iters=30, seed=0, warm_iters=60)
    from qat.formats.fit.lobcq import _blocks

    y = _blocks(data, 8, 64)
    _, lut = build_luts(torch.tensor(DEFAULT_CODEBOOKS, dtype=torch.float32))
    default = float(assign(y, lut)[2].double().sum() / y.numel())
    assert default == pytest.approx(0.2622, abs=1e-4)
    assert hist[-1] < default - 0.003  # 0.2579


def _hostile(shape, gen):
    """Heavy-tailed floats with all-zero arrays, exact midpoints and exact entries."""
    x = torch.randn(*shape, generator=gen) * torch.exp(2 * torch.randn(*shape, generator=gen))
    x.view(-1, shape[-1])[::7, :64] = 0  # all-zero arrays
    mid = torch.randint(-62, 63, (shape[0], 64), generator=gen).float() / 2  # midpoints, entries
    mid[:, 0] = 31  # scale 2^0: y is the value itself
    x[:, 64:128] = mid
    return x


@pytest.mark.parametrize("shape", [(2048, 576), (576, 1536), (96, 2045)], ids=str)
def test_vectorised_assign_equals_the_per_codebook_passes(shape):
    """Bit for bit on real sizes (an activation, a weight, a ragged row), default codebooks."""
    gen = torch.Generator().manual_seed(shape[1])
    x = _hostile(shape, gen)
    y, _, _, n = normalize(x, 8, 64)
    _, lut = build_luts(torch.tensor(DEFAULT_CODEBOOKS, dtype=torch.float32))
    valid = (torch.arange(y.shape[-3] * 64) < n).float().reshape(y.shape[-3:])
    for v in (None, valid) if n % 64 else (None,):
        got, want = assign(y, lut, v), per_codebook_assign(y, lut, v)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


@pytest.mark.parametrize("block_len", [5, 8, 16])
def test_assign_adds_left_to_right_in_float32(block_len):
    """Against numpy float32 on near-ties: codebooks A and B differ in one entry (3 vs 4), and
    each block holds a scalar a few ulps off 3.5 beside large ones, so which error is smaller
    depends on how the sum rounds; a duplicated codebook (the tie goes to the lower index)."""
    gen = torch.Generator().manual_seed(block_len)
    a = [-31, -24, -18, -13, -9, -6, -3, -1, 0, 1, 3, 6, 10, 15, 22, 31]
    b = [4 if v == 3 else v for v in a]
    books = [a, b, a, list(range(-8, 8))]
    y = (torch.rand(20000, block_len, generator=gen) * 62 - 31).float()
    ulps = torch.randint(-3, 4, (20000,), generator=gen).float()
    y[:, 1] = 3.5 + ulps * 2.0**-22
    _, lut = build_luts(torch.tensor(books, dtype=torch.float32))
    choice, q, _ = assign(y, lut)
    want_c, want_q = float32_assign(y, books)
    assert choice.tolist() == want_c and q.tolist() == want_q
    assert set(want_c) <= {0, 1, 3}  # the duplicate of codebook 0 never wins
    # the order matters here: pairwise sums choose otherwise on some blocks
    d = (y[..., None] - torch.stack([lut[c][bins_of(y)] for c in range(4)], -1)).square()
    while d.shape[1] > 1:
        d = torch.cat(
            [d[:, 0::2][:, : d.shape[1] // 2] + d[:, 1::2], d[:, d.shape[1] // 2 * 2 :]], 1
        )
    assert (d[:, 0].argmin(-1) != choice).any()


def _scalar_cost(y: torch.Tensor, entries: list[float]) -> float:
    """Squared error of scalars ``y`` at their nearest entry (ties up), in float64."""
    e = torch.tensor(sorted(entries), dtype=torch.float64)
    dist = (y.double()[:, None] - e).abs()
    near = e[e.numel() - 1 - dist.flip(-1).argmin(-1)]
    return float((y.double() - near).square().sum())


def test_best_entries_is_the_exact_integer_optimum():
    from qat.formats.fit.lobcq import best_entries

    def stats(y):
        bins = bins_of(y).flatten()
        yd = y.flatten().double()
        return [
            torch.zeros(125, dtype=torch.float64).index_add_(0, bins, v)
            for v in (torch.ones_like(yd), yd, yd * yd)
        ]

    gen = torch.Generator().manual_seed(0)
    exact = torch.tensor([-29, -17, -9, -4, -2, -1, 0, 1, 2, 3, 5, 8, 13, 20, 26, 31.0])
    y = exact[torch.randint(0, 16, (500,), generator=gen)]
    assert best_entries(*stats(y)).tolist() == exact.tolist()  # scalars on 16 integers: cost 0
    y = (torch.randn(4000, generator=gen) * 6).clamp(-31, 31)
    best = best_entries(*stats(y))
    cost = _scalar_cost(y, best.tolist())
    assert torch.equal(best, best.round()) and torch.equal(best, best.sort().values)
    for k in range(16):  # no single entry moved by one does better
        for d in (-1, 1):
            moved = best.clone()
            moved[k] += d
            if moved.abs().max() <= 31:
                assert _scalar_cost(y, moved.tolist()) >= cost - 1e-9
    rounded = torch.quantile(y, (torch.arange(16) + 0.5) / 16).round()  # the old start
    assert cost < _scalar_cost(y, rounded.tolist())
