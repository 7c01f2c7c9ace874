"""bench/decoder_qat.py on a tiny Llama: every row trains or evaluates under one budget, rows
run apart (``--only``) merge into one table and picture, and mixed budgets are refused."""

from __future__ import annotations

import json
import math

import pytest
from tiny import lm_recipe, load_bench


def test_rows_run_apart_merge_into_one_table(tmp_path, committed_wikitext, capsys):
    bench = load_bench("decoder_qat")
    recipe = lm_recipe(tmp_path)
    budget = [
        "--recipe",
        recipe,
        "--steps",
        "3",
        "--block_size",
        "32",
        "--batch",
        "2",
        "--seed",
        "5",
        "--eval_chunks",
        "4",
    ]
    assert (
        bench.main([*budget, "--only", "qat-full", "float-before", "--out", str(tmp_path / "a")])
        == 0
    )
    assert bench.main([*budget, "--only", "ptq", "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    assert a["budget"]["training_tokens"] == 3 * 2 * 32
    by_id = {r["id"]: r for r in a["results"]}
    assert set(by_id) == {"float-before", "qat-full"}
    for r in by_id.values():
        assert r["perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
    assert by_id["float-before"]["train_loss"] is None  # evaluated only
    assert by_id["qat-full"]["train_loss"] > 0
    assert by_id["qat-full"]["name"] == "W4A4 bfp+mm QAT full"

    capsys.readouterr()
    figure = tmp_path / "fig" / "decoder.png"
    assert (
        bench.main(
            [
                "--table",
                str(tmp_path / "b" / "results.json"),
                str(tmp_path / "a" / "results.json"),
                "--plot",
                str(figure),
            ]
        )
        == 0
    )
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    # the bench's row order, whatever order the files came in
    assert [line.split(" | ")[0][2:] for line in table[2:]] == [
        "float, before FT",
        "W4A4 bfp+mm PTQ",
        "W4A4 bfp+mm QAT full",
    ]
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_refuses_results_of_other_budgets(tmp_path):
    bench = load_bench("decoder_qat")
    for name, steps in (("a", 3), ("b", 4)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(
            json.dumps({"recipe": "r.yaml", "budget": {"steps": steps}, "results": []})
        )
    with pytest.raises(SystemExit, match="another budget"):
        bench.load_results([tmp_path / "a" / "results.json", tmp_path / "b" / "results.json"])
    with pytest.raises(SystemExit, match="no such results file"):
        bench.load_results([tmp_path / "missing.json"])


def _results(path, lever, rows, budget=None, recipe="r.yaml"):
    path.mkdir()
    (path / "results.json").write_text(
        json.dumps(
            {
                "recipe": recipe,
                "lever": lever,
                "budget": {
                    "steps": 40,
                    "batch": 4,
                    "block_size": 256,
                    "training_tokens": 40960,
                    "seed": 42,
                    "eval_chunks": 16,
                    "overrides": [] if lever is None else ["--x", lever],
                    **(budget or {}),
                },
                "results": [
                    {
                        "id": i,
                        "name": n,
                        "recipe": recipe,
                        "perplexity": p,
                        "eval_loss": math.log(p),
                        "train_loss": None,
                        "seconds": 1.0,
                    }
                    for i, n, p in rows
                ],
            }
        )
    )
    return path / "results.json"


def test_levers_merge_under_one_budget_with_the_recovered_share(tmp_path, capsys):
    """Rows of several levers (other overrides, same budget) share a table; each QAT row's
    recovered share is (PTQ - QAT) / (PTQ - float after FT) against its own lever's PTQ."""
    bench = load_bench("decoder_qat")
    plain = _results(
        tmp_path / "plain",
        None,
        [("float-after", "float", 30.0), ("ptq", "W4 PTQ", 150.0), ("qat-full", "W4 QAT", 75.0)],
    )
    rot = _results(
        tmp_path / "rot", "rot", [("ptq", "W4 PTQ + rot", 90.0), ("qat-full", "W4 QAT + rot", 60.0)]
    )
    # another recipe's PTQ row of the same lever is not this recipe's reference
    other_recipe = _results(
        tmp_path / "q4", "rot", [("ptq", "Q4 PTQ + rot", 40.0)], recipe="dir/q4.yaml"
    )
    merged = bench.load_results([rot, plain, other_recipe])
    by = {(r["id"], r["lever"]): r for r in merged["results"]}
    after = bench.float_after(merged["results"])
    assert after == 30.0
    assert bench.recovered(by[("qat-full", None)], merged["results"], after) == pytest.approx(
        (150 - 75) / (150 - 30)
    )
    assert bench.recovered(by[("qat-full", "rot")], merged["results"], after) == pytest.approx(
        (90 - 60) / (90 - 30)
    )
    assert bench.recovered(by[("ptq", None)], merged["results"], after) is None
    capsys.readouterr()
    bench.report([plain, rot], None)
    out = capsys.readouterr().out
    assert "| W4 QAT + rot | 60.00 | +100.0% | 50% |" in out
    other = _results(tmp_path / "other", "x", [], budget={"steps": 41})
    with pytest.raises(SystemExit, match="another budget"):
        bench.load_results([plain, other])


def test_levers_bench_rows_are_valid_configs_and_its_table_follows_the_grid(tmp_path, capsys):
    from qat.quant.config import QuantConfig

    bench = load_bench("decoder_levers")
    rows = bench.grid()
    for row_id, (_, quant) in rows.items():  # every row is a config qat accepts
        assert quant is None or QuantConfig.from_dict(quant) is not None, row_id
    results = [
        {"id": "w4a4-rot16", "name": "W4A4 + rot", "validation_ppl": 40.0, "test_ppl": 50.0},
        {"id": "float", "name": "float", "validation_ppl": 10.0, "test_ppl": 20.0},
        {"id": "w4a4-rot128", "name": "W4A4 + rot128", "skipped": "does not divide"},
    ]
    path = tmp_path / "results.json"
    path.write_text(
        json.dumps({"chunk_size": 2048, "test_chunks": 2, "val_chunks": 1, "results": results})
    )
    figure = tmp_path / "levers.png"
    bench.report([path], figure)
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert table[2] == "| float | 10.00 | 20.00 | +0.0% |"  # the grid's order
    assert table[3] == "| W4A4 + rot | 40.00 | 50.00 | +150.0% |"
    assert "does not divide" in table[4]
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
