"""The BOF4 / BOF4-S optimiser reproduces the published tables; ``qat codebook`` files load."""

from __future__ import annotations

import json

import pytest
import torch

from qat.cli.codebook import main
from qat.formats import FormatError, make_format
from qat.formats.codebook import BOF4_TABLES
from qat.formats.fit.codebook import fit_codebook


@pytest.mark.parametrize("kind,block", [("bof4", 64), ("bof4s", 64), ("bof4s", 32), ("bof4s", 128)])
def test_integral_regenerates_published_tables(kind, block):
    levels, iters = fit_codebook(kind, "mse", block)
    published = BOF4_TABLES[(kind, "mse", block)]
    err = max(abs(a - b) for a, b in zip(levels, published))
    assert err < 1e-3, err  # measured: 1.3e-4, 1.2e-4, 2.9e-4, 1.5e-4
    assert iters < 1000


def test_pinned_levels_and_order():
    for kind in ("bof4", "bof4s"):
        for metric in ("mse", "mae"):
            lv, _ = fit_codebook(kind, metric, 16, iters=20)
            assert lv[7] == 0.0 and lv[15] == 1.0 and lv == sorted(lv)
            assert (lv[0] == -1.0) == (kind == "bof4")
            assert -1.0 <= lv[0] and lv[14] < 1.0


def test_monte_carlo_deterministic_and_close_to_integral():
    a, _ = fit_codebook("bof4s", "mse", 64, method="mc", samples=1 << 21, seed=5)
    b, _ = fit_codebook("bof4s", "mse", 64, method="mc", samples=1 << 21, seed=5)
    assert a == b
    pub = BOF4_TABLES[("bof4s", "mse", 64)]
    assert max(abs(x - y) for x, y in zip(a, pub)) < 4e-3  # MC noise ~1/sqrt(samples)


def test_mae_integral_vs_monte_carlo():
    a, _ = fit_codebook("bof4", "mae", 16, iters=120)
    b, _ = fit_codebook("bof4", "mae", 16, method="mc", samples=1 << 20, iters=120)
    assert max(abs(x - y) for x, y in zip(a, b)) < 5e-3
    # MAE puts the levels nearer zero than MSE (the median of a cell sits below its s^2 mean)
    m, _ = fit_codebook("bof4", "mse", 16, iters=120)
    assert a[14] < m[14]


def test_main_writes_file_make_format_accepts(tmp_path, capsys):
    out = tmp_path / "cb.json"
    assert (
        main(
            [
                "--kind",
                "bof4s",
                "--metric",
                "mae",
                "--block-size",
                "48",
                "--out",
                str(out),
                "--iters",
                "60",
                "--no-progress",
            ]
        )
        == 0
    )
    doc = json.loads(out.read_text())
    assert doc["kind"] == "bof4s" and doc["metric"] == "mae" and doc["block_size"] == 48
    assert doc["normalization"] == "signed_absmax" and len(doc["levels"]) == 16
    assert {"samples", "iters", "seed"} <= doc.keys()
    f = make_format(
        {"format": "bof4s", "metric": "mae", "block_size": 48, "codebook_file": str(out)}
    )
    assert f.levels == tuple(doc["levels"])
    x = torch.tensor(doc["levels"])
    assert torch.equal(f.quantize(x), x)
    # a spec that disagrees with the file is refused, naming the parameter
    with pytest.raises(FormatError, match="block_size=48"):
        make_format({"format": "bof4s", "metric": "mae", "codebook_file": str(out)})
    with pytest.raises(FormatError, match="metric='mae'"):
        make_format({"format": "bof4s", "block_size": 48, "codebook_file": str(out)})
    with pytest.raises(FormatError, match="kind='bof4s'"):
        make_format(
            {"format": "bof4", "metric": "mae", "block_size": 48, "codebook_file": str(out)}
        )


def test_main_monte_carlo_and_bad_file(tmp_path):
    out = tmp_path / "mc.json"
    assert (
        main(
            [
                "--kind",
                "bof4",
                "--block-size",
                "64",
                "--method",
                "mc",
                "--samples",
                "100000",
                "--seed",
                "3",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    doc = json.loads(out.read_text())
    assert doc["samples"] == 100000 and doc["seed"] == 3 and doc["method"] == "mc"
    make_format({"format": "bof4", "codebook_file": str(out)})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"levels": [0.0] * 16}))
    with pytest.raises(FormatError, match="strictly increasing"):
        make_format({"format": "bof4", "codebook_file": str(bad)})
