"""bench/papers.py: rows run on a tiny Llama land in the paper's JSON with their command,
budget and measurements; a second run skips the rows already there; a row that fails keeps
the rows written before it; the Q4_1 grid distance on hand-built blocks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import lm_recipe, load_bench


def _rows(path) -> dict:
    return {r["id"]: r for r in json.loads(path.read_text())["rows"]}


def test_rows_run_once_and_a_rerun_skips_them(tmp_path, committed_wikitext):
    from qat.formats import make_format
    from qat.runs.build import build_model
    from qat.tasks.language_modeling import chunk_ids, load_wikitext, perplexity

    bench = load_bench("papers")
    recipe = lm_recipe(tmp_path)
    opts = ["--recipe", recipe, "--chunk_size", "32", "--out", str(tmp_path / "out")]
    opts += ["--work", str(tmp_path / "work")]
    assert bench.main(["--paper", "bof4", "--rows", "smollm2-float", "smollm2-nf4", *opts]) == 0
    path = tmp_path / "out" / "bof4.json"
    rows = _rows(path)
    assert list(rows) == ["smollm2-float", "smollm2-nf4"]

    # the float row's perplexity is the library's on the first 2 test chunks of 32 tokens
    built = build_model(recipe, ["--quant", "null"], head="causal_lm")
    ids = built.tokenizer(load_wikitext("test"), return_tensors="pt")["input_ids"][0]
    assert rows["smollm2-float"]["test_ppl"] == pytest.approx(
        perplexity(built.model, chunk_ids(ids, 32, 2))[0], rel=1e-6
    )
    # NF4's weight error is the pooled error of every linear but lm_head, blocks of 64
    nf4, err, ref = make_format({"format": "nf4"}), 0.0, 0.0
    for name, m in built.model.named_modules():
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"):
            w = m.weight.detach()
            err += float((w - nf4.quantize(w)).double().square().sum())
            ref += float(w.double().square().sum())
    row = rows["smollm2-nf4"]
    assert row["weight_rel_mse"] == pytest.approx(err / ref, rel=1e-6)
    assert row["bits"]["quantized_linears"]["bits_per_element"] == 4.25
    assert math.isfinite(row["test_ppl"]) and math.isfinite(row["validation_ppl"])
    assert row["budget"]["test"] == "WikiText-2 test, first 2 x 32 tokens"
    assert "--paper bof4 --rows smollm2-nf4" in row["command"]
    assert "--chunk_size 32" in row["command"]

    # a rerun with one more row runs only that one: the stored rows are kept as they are
    data = json.loads(path.read_text())
    data["rows"][1]["test_ppl"] = -1.0
    path.write_text(json.dumps(data))
    more = ["smollm2-float", "smollm2-nf4", "smollm2-bof4s-mse-opq"]
    assert bench.main(["--paper", "bof4", "--rows", *more, *opts]) == 0
    rows = _rows(path)
    assert list(rows) == more
    assert rows["smollm2-nf4"]["test_ppl"] == -1.0
    assert rows["smollm2-bof4s-mse-opq"]["weight_rel_mse"] < err / ref  # BOF4-S + OPQ < NF4

    # another paper's float row, same model and chunks: the stored measurement, said so
    assert bench.main(["--paper", "lobcq", "--rows", "float", *opts]) == 0
    row = _rows(tmp_path / "out" / "lobcq.json")["float"]
    assert row["reused_from"] == "bof4.json#smollm2-float"
    assert row["test_ppl"] == rows["smollm2-float"]["test_ppl"]
    assert bench.main(["--paper", "bfp", "--rows", "float", *opts, "--test_chunks", "1"]) == 0
    assert "reused_from" not in _rows(tmp_path / "out" / "bfp.json")["float"]  # other chunks


def test_a_failing_row_keeps_the_rows_before_it(tmp_path):
    bench = load_bench("papers")
    rows = [bench.Row("a", "A", "x"), bench.Row("b", "B", "x")]

    def execute(row):
        if row.id == "b":
            raise RuntimeError("killed")
        return {"value": 1.5, "seeds": [42]}

    path = tmp_path / "p.json"
    with pytest.raises(RuntimeError, match="killed"):
        bench.run_rows(path, "p", rows, execute, lambda r: f"cmd {r.id}")
    stored = _rows(path)
    assert list(stored) == ["a"]
    assert stored["a"]["value"] == 1.5 and stored["a"]["command"] == "cmd a"
    assert stored["a"]["seeds"] == [42]


def test_rows_another_process_wrote_meanwhile_are_kept(tmp_path):
    # two runs of one paper side by side (e.g. QAT seeds in one, PTQ rows in another) share
    # the JSON: each write adds to what is on disk instead of replacing it with its own list
    bench = load_bench("papers")
    path = tmp_path / "p.json"
    other = {"id": "z", "name": "Z", "kind": "x", "value": 9.0}

    def execute(row):
        if row.id == "a":  # the other process finishes its row while "a" runs
            bench.write_results(path, "p", [*bench.load_results(path), other])
        return {"value": 1.0}

    rows = [bench.Row("a", "A", "x"), bench.Row("b", "B", "x"), bench.Row("z", "Z", "x")]
    bench.run_rows(path, "p", rows, execute, lambda r: f"cmd {r.id}")
    stored = _rows(path)
    assert list(stored) == ["z", "a", "b"]  # "z" kept, and not run again
    assert stored["z"]["value"] == 9.0 and stored["b"]["value"] == 1.0


def test_unknown_rows_are_refused(capsys):
    bench = load_bench("papers")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--paper", "lobcq", "--rows", "all-lobcq", "no-such-row"])
    assert exc.value.code == 2
    assert "unknown row(s) for --paper lobcq: no-such-row" in capsys.readouterr().err


def test_q41_grid_distance():
    bench = load_bench("papers")
    d, m = 0.01, -0.07
    k = torch.arange(64) % 16  # two blocks of 32, each with every code 0..15
    before = (m + d * k).reshape(2, 32)
    after = before.clone()
    after[1, 5] += 0.3 * d  # one weight of the second block moves 0.3 of a step
    got = bench.q41_grid_distance(before, after)
    assert got["before_max_distance"] < 1e-6
    assert got["off_grid_weights"] == pytest.approx(1 / 64)
    assert got["off_grid_blocks"] == pytest.approx(0.5)
    assert got["mean_distance"] == pytest.approx(0.3 / 64, rel=1e-4)
    assert got["n"] == 64


def test_spearman_against_hand_ranks():
    bench = load_bench("papers")
    assert bench.spearman([(1, 10), (2, 20), (3, 30)]) == pytest.approx(1.0)
    assert bench.spearman([(1, 30), (2, 20), (3, 10)]) == pytest.approx(-1.0)
    # ranks x 1, 2, 3, 4 against y 1, 3, 2, 4: 1 - 6 * 2 / (4 * 15) = 0.8
    assert bench.spearman([(0.1, 5), (0.2, 7), (0.3, 6), (0.4, 9)]) == pytest.approx(0.8)


def test_lobcq_qat_table_reads_seeds_against_the_committed_float_fine_tune(capsys):
    # LO-BCQ QAT rows of three seeds; the float fine-tune and BFP QAT come from the README's
    # committed rows (docs/decoder_qat): float 30.079, so the +25% bound is 37.60
    bench = load_bench("papers")
    rows = {
        f"qat-lobcq-full-s{s}": {
            "id": f"qat-lobcq-full-s{s}",
            "name": "LO-BCQ W4A4 QAT full",
            "seeds": [s],
            "perplexity": p,
            "train_loss": 3.9,
        }
        for s, p in ((42, 36.0), (43, 38.0), (44, 37.0))
    }
    bench._md_lobcq_qat(rows)
    out = capsys.readouterr().out
    assert "| float, before FT |  | 38.62 | +28.4% |  |" in out
    assert "| float, after FT | 42 | 30.08 | +0.0% | 3.530 |" in out
    assert "**BFP W4A4 QAT full, mean ± s.d.** | 3 seeds | **73.32 ± 1.48**" in out
    row = "| LO-BCQ W4A4 QAT full | 43 | 38.00 | +26.3% | 3.900 | lobcq.json#qat-lobcq-full-s43 |"
    assert row in out
    assert "**LO-BCQ W4A4 QAT full, mean ± s.d.** | 3 seeds | **37.00 ± 1.00** | **+23.0%**" in out
    assert "target: <= 37.60 (float after FT 30.08 + 25%)" in out
    assert "2 of 3 seeds reach it (best 36.00, +19.7%)" in out
