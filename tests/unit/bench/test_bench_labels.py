"""bench/qat_vs_ptq.py names each quantised mode from the recipe's actual quant section."""

from __future__ import annotations

import json

import pytest
from tiny import W4A4_BFP, load_bench, tiny_recipe

W3A4 = {"weight": {"format": "bfp", "width": 3}, "activation": {"format": "bfp", "width": 4}}


@pytest.mark.parametrize(
    "quant,label",
    [
        (W4A4_BFP, "W4A4 bfp+mm"),
        (W3A4, "W3A4 bfp"),
        ({**W3A4, "overrides": {"fc2": {"weight": {"width": 6}}}}, "W3A4 bfp*"),
        ({"weight": {"format": "nf4"}}, "W4 nf4"),
        (
            {
                "weight": {"format": "mxfp4"},
                "activation": {"format": "mxint8"},
                "matmul": {"format": "mxfp8_e4m3"},
            },
            "W4A8 mxfp4/mxint8+mm8 mxfp8_e4m3",
        ),
        (
            {
                "weight": {"format": "lobcq"},
                "activation": {"format": "block_minifloat", "width": 6},
            },
            "W4A6 lobcq/block_minifloat",
        ),
        ({**W3A4, "matmul": {"format": "bfp", "width": 8}}, "W3A4 bfp+mm8 bfp"),
        ({"weight": None, "activation": None}, "float"),
        (None, "float"),
    ],
)
def test_quant_label(quant, label):
    assert load_bench("qat_vs_ptq").quant_label(quant) == label


def test_table_results_and_plot_use_the_recipe_widths(tmp_path, capsys):
    w3 = {
        role: {**spec, "width": 3} if role == "weight" else spec for role, spec in W4A4_BFP.items()
    }
    recipe = tiny_recipe(tmp_path, quant=w3, max_steps=1)
    out = tmp_path / "bench"
    bench = load_bench("qat_vs_ptq")
    assert (
        bench.main(
            [
                "--recipe",
                recipe,
                "--steps",
                "1",
                "--seeds",
                "3",
                "--out",
                str(out),
                "--modes",
                "float",
                "qat-full",
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["quant_label"] == "W3A4 bfp+mm"
    assert list(results["results"]) == [
        "float (full FT)",
        "W3A4 bfp+mm QAT full",
        "W3A4 bfp+mm PTQ of float",
    ]
    table = capsys.readouterr().out
    assert "W3A4 bfp+mm QAT full" in table and "W4A4" not in table
    assert (out / "qat_vs_ptq.png").stat().st_size > 0


def test_plot_from_results_json_names_the_formats(tmp_path, capsys):
    bench = load_bench("qat_vs_ptq")
    w3 = {"weight": {"format": "bfp", "width": 3}, "activation": {"format": "mxint8"}}
    results = {
        "recipe": "recipes/x.yaml",
        "model": "m",
        "task": "sst2",
        "quant_label": bench.quant_label(w3),
        "quant": w3,
        "steps": 10,
        "seeds": [1, 2],
        "results": {"float (full FT)": [0.8, 0.82], "W3A8 bfp/mxint8 QAT full": [0.7, 0.75]},
    }
    src = tmp_path / "results.json"
    src.write_text(json.dumps(results))
    png = tmp_path / "fig" / "qat_vs_ptq.png"
    assert bench.main(["--plot", str(src), "--figure", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = bench.plot(results, tmp_path / "again.png")
    assert drawn["labels"] == list(results["results"])
    assert "(W3A8 bfp/mxint8)" in drawn["title"] and "m on sst2" in drawn["title"]
    assert drawn["formats"] == [
        "weight: bfp(width=3, exponent_width=8, block_size=16)",
        "activation: mxint8(block_size=32)",
    ]
    with pytest.raises(SystemExit) as e:
        bench.main(["--plot", str(tmp_path / "missing.json"), "--figure", str(png)])
    assert e.value.code == 2
    assert "--plot" in capsys.readouterr().err
