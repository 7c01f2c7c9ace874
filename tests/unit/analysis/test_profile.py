"""``qat profile``: moment maths, depth parsing, CSV + PNG outputs, SQNR ordering, MiniLM."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from scipy.stats import kurtosis
from tiny import REPO, tiny_recipe

from qat.analysis.profile import COLUMNS, Moments, layer_depth
from qat.cli.profile import main


def test_moments_match_numpy_and_hand_sqnr():
    torch.manual_seed(0)
    x = torch.randn(1000) * 3 + 1
    m = Moments()
    m.add(x[:400], None)
    m.add(x[400:], None)
    row = m.row(False)
    xd = x.double()
    assert row["variance"] == pytest.approx(float(xd.var(unbiased=False)), rel=1e-9)
    assert row["kurtosis"] == pytest.approx(kurtosis(xd.numpy(), fisher=False), rel=1e-6)
    assert row["abs_max"] == pytest.approx(float(x.abs().max()))
    assert math.isnan(row["sqnr_db"])
    s = Moments()
    s.add(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))  # signal 5, error 1
    assert s.row(True)["sqnr_db"] == pytest.approx(10 * math.log10(5))


def test_layer_depth():
    assert layer_depth("bert.encoder.layer.3.attention.self.query") == 3
    assert layer_depth("model.layers.11.mlp.down_proj") == 11
    assert layer_depth("transformer.h.0.attn.c_attn") == 0
    assert layer_depth("bert.pooler.dense") == -1


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_profile_writes_csv_and_plots_and_sqnr_grows_with_width(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    sqnr = {}
    for width in (4, 8):
        out = tmp_path / f"w{width}"
        assert (
            main(
                [
                    recipe,
                    "--num_batches",
                    "2",
                    "--batch_size",
                    "4",
                    "--output_dir",
                    str(out),
                    "--quant.weight.width",
                    str(width),
                    "--quant.activation.width",
                    str(width),
                ]
            )
            == 0
        )
        rows = _rows(out / "layers.csv")
        assert list(rows[0]) == COLUMNS
        # two rows (weight, activation) per linear: 2 x 6 + pooler + classifier = 14 linears
        assert len(rows) == 28
        for png in ("variance_vs_depth.png", "sqnr.png"):
            assert (out / png).read_bytes()[:4] == b"\x89PNG"
        q = [r for r in rows if r["format"] != "float"]
        assert all(math.isfinite(float(r["sqnr_db"])) for r in q)
        assert all(float(r["variance"]) > 0 and float(r["kurtosis"]) > 0 for r in rows)
        head = [r for r in rows if r["layer"] == "classifier"]
        assert all(r["format"] == "float" and r["sqnr_db"] == "nan" for r in head)
        sqnr[width] = sum(float(r["sqnr_db"]) for r in q) / len(q)
    assert sqnr[8] > sqnr[4] + 15  # ~6 dB per extra mantissa bit
    assert "vs fp32" in capsys.readouterr().out


def test_profile_bad_option(tmp_path, capsys):
    assert main([tiny_recipe(tmp_path), "--num_batches", "zero"]) == 2
    assert "qat profile: error:" in capsys.readouterr().err


@pytest.mark.slow
def test_real_minilm_profile(tmp_path):
    out = tmp_path / "prof"
    assert (
        main(
            [
                str(REPO / "recipes" / "minilm_sst2.yaml"),
                "--num_batches",
                "1",
                "--batch_size",
                "4",
                "--output_dir",
                str(out),
            ]
        )
        == 0
    )
    rows = _rows(out / "layers.csv")
    assert len(rows) == 2 * 38  # 6 x 6 encoder linears + pooler + classifier
    assert {int(r["depth"]) for r in rows} == {-1, 0, 1, 2, 3, 4, 5}


def test_an_empty_output_dir_is_refused_not_read_as_the_default(tmp_path, capsys, no_model):
    """``--output_dir ''`` names no folder: one line before anything loads, where it used to
    fall back to the recipe's output_dir."""
    from tiny import one_error_line, tiny_recipe

    from qat.cli.profile import main

    assert main([tiny_recipe(tmp_path), "--output_dir", ""]) == 2
    line = one_error_line(capsys.readouterr().err, "profile")
    assert line == "qat profile: error: --output_dir must name a folder, got ''"
