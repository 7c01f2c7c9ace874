"""``qat search`` and ``qat sensitivity`` on a tiny fine-tuned BERT: outputs, resume, seeding,
the fragile-layer ranking, and bad specs that fail before any trial."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny import make_tiny_glue_dir, make_tiny_model_dir, tiny_recipe

from qat.analysis import search as search_mod
from qat.analysis.search import average_bits, choose, pareto_front
from qat.analysis.search import runner as search_runner
from qat.cli import search as search_cli

BASE = {
    k: {"format": "bfp", "width": 12, "exponent_width": 8, "block_size": 16}
    for k in ("weight", "activation", "matmul")
}
SPACE = {"weight": {"width": [3, 12]}, "activation": {"width": [3, 12]}}
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    """A tiny float run fine-tuned to fit its 64 training rows, and a copy whose pooler is made
    fragile without changing its float function: a huge constant input feature (LayerNorm
    bias + K) cancelled by the pooler's bias. At width 3 that feature flushes every other
    input of its block to zero, so the pooler's output no longer depends on the sentence."""
    import qat.cli.train

    tmp = tmp_path_factory.mktemp("search_runs")
    data = make_tiny_glue_dir(tmp, n_train=64, n_val=32)
    recipe = tiny_recipe(
        tmp,
        "float.yaml",
        quant=None,
        max_steps=60,
        learning_rate=3e-3,
        per_device_train_batch_size=16,
        data_dir=data,
        output_dir=str(tmp / "float"),
    )
    assert qat.cli.train.main([recipe]) == 0
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp / "float")
    ln, pooler = model.bert.encoder.layer[-1].output.LayerNorm, model.bert.pooler.dense
    with torch.no_grad():
        for d in (0, 16):  # one feature per 16-element block
            ln.bias[d] += 50.0
            pooler.bias -= pooler.weight[:, d] * 50.0
    model.save_pretrained(tmp / "fragile")
    for name in TOKENIZER:
        if (tmp / "float" / name).is_file():
            (tmp / "fragile" / name).write_bytes((tmp / "float" / name).read_bytes())
    return {
        "tmp": str(tmp),
        "data": data,
        "float": str(tmp / "float"),
        "fragile": str(tmp / "fragile"),
    }


def _recipe(tmp_path: Path, runs: dict[str, str], model: str = "float", **search) -> str:
    spec = {
        "space": SPACE,
        "granularity": "layer",
        "trials": 64,
        "held_out_samples": 32,
        "uniform_widths": [4, 8],
        "seed": 0,
        **search,
    }
    return tiny_recipe(
        tmp_path,
        "search.yaml",
        quant=BASE,
        model_name_or_path=runs[model],
        data_dir=runs["data"],
        output_dir=str(tmp_path / "out"),
        search=spec,
    )


class _Interrupt(Exception):
    pass


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_search_resumes_writes_every_output_and_best_trains(tmp_path, runs, monkeypatch, capsys):
    import qat.cli.eval
    import qat.cli.train

    recipe = _recipe(tmp_path, runs, constraint={"max_bits": 12.0})  # all at W12: 12.5
    out = tmp_path / "out"
    scored: list[str] = []
    real_score = search_mod.Scorer.score

    def score(self, quant, which="held_out"):
        if which == "held_out" and quant["overrides"]:
            scored.append(json.dumps(quant, sort_keys=True))
            if len(scored) == 3 and interrupt:
                raise _Interrupt  # as if the job were killed during trial 2
        return real_score(self, quant, which)

    monkeypatch.setattr(search_mod.Scorer, "score", score)
    interrupt = True
    with pytest.raises(_Interrupt):
        search_cli.main([recipe, "--search.trials", "5"])
    assert (out / "search.db").is_file() and not (out / "trials.csv").exists()
    first_run = list(scored)

    # A second search into the same folder without --resume is refused; nothing is replaced.
    db_bytes = (out / "search.db").read_bytes()
    assert search_cli.main([recipe, "--search.trials", "5"]) == 2
    assert "already holds a search (search.db); pass --resume" in capsys.readouterr().err
    assert (out / "search.db").read_bytes() == db_bytes

    interrupt = False
    scored.clear()
    assert search_cli.main([recipe, "--search.trials", "5", "--resume"]) == 0
    # the killed trial's choices run first again; the two finished trials never do
    assert scored[0] == first_run[2]
    assert not set(first_run[:2]) & set(scored)
    trials = _rows(out / "trials.csv")
    assert len(trials) == 5 and len({t["number"] for t in trials}) == 5
    assert [t["number"] for t in trials[:2]] == ["0", "1"]
    # the resumed process reseeds its sampler, so it does not replay the first one's proposals
    params = [tuple(v for k, v in t.items() if ":" in k) for t in trials]
    assert len(set(params)) == 5
    units = ("layer.0", "layer.1", "bert.pooler.dense")
    assert [c for c in trials[0] if ":" in c] == [
        f"{u}:{r}.width" for u in units for r in ("weight", "activation")
    ]
    pareto = _rows(out / "pareto.csv")
    assert pareto and {p["number"] for p in pareto} <= {t["number"] for t in trials}
    assert [u["name"] for u in _rows(out / "uniform.csv")] == ["W4", "W8"]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / "search_results.json").read_text())
    feasible = [t for t in trials if float(t["bits"]) <= 12.0]
    best_acc = max(float(t["accuracy"]) for t in feasible)
    assert res["best"]["accuracy"] == best_acc and res["best"]["bits"] <= 12.0
    assert 0.0 <= res["best_validation"]["accuracy"] <= 1.0
    printed = capsys.readouterr().out
    assert "qat search: 5 trials" in printed and "uniform W4: 4.500 bits" in printed

    best = yaml.safe_load((out / "best.yaml").read_text())
    assert "search" not in best and best["model_name_or_path"] == runs["float"]
    assert all(p.startswith("^") and p.endswith("$") for p in best["quant"]["overrides"])
    train_out = tmp_path / "train_best"
    assert (
        qat.cli.train.main(
            [str(out / "best.yaml"), "--max_steps", "2", "--output_dir", str(train_out)]
        )
        == 0
    )
    saved = json.loads((train_out / "qat_config.json").read_text())["quant"]
    assert saved["overrides"] == best["quant"]["overrides"]
    assert (
        qat.cli.eval.main(
            [
                str(out / "best.yaml"),
                "--max_eval_samples",
                "8",
                "--output",
                str(tmp_path / "e.json"),
            ]
        )
        == 0
    )


def test_sensitivity_ranks_the_fragile_layer_first_and_seeds_the_search(tmp_path, runs, capsys):
    from qat.cli.sensitivity import main

    recipe = _recipe(tmp_path, runs, model="fragile", granularity="module", held_out_samples=64)
    assert main([recipe, "--output_dir", str(tmp_path / "sens")]) == 0
    rows = _rows(tmp_path / "sens" / "sensitivity.csv")
    assert len(rows) == 13  # 12 encoder linears + the pooler; attention has no searched role
    assert rows[0]["unit"] == "bert.pooler.dense" and rows[0]["rank"] == "1"
    assert float(rows[0]["drop"]) >= 0.25
    assert all(float(r["drop"]) <= 0.1 for r in rows[1:])
    assert (tmp_path / "sens" / "sensitivity.png").is_file()
    # an existing table is not replaced unless asked
    assert main([recipe, "--output_dir", str(tmp_path / "sens")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err

    table = str(tmp_path / "sens" / "sensitivity.csv")
    assert (
        search_cli.main(
            [
                recipe,
                "--search.trials",
                "2",
                "--search.seed_trials",
                "2",
                "--search.sensitivity",
                table,
                "--report_to",
                "wandb",
            ]
        )
        == 0
    )
    trials = _rows(tmp_path / "out" / "trials.csv")
    assert [t["source"] for t in trials] == ["sensitivity", "sensitivity"]
    # half budget: the 7 least sensitive of 13 units go to width 3, the 6 most keep width 12
    first = trials[0]
    assert first["bert.pooler.dense:weight.width"] == "12"
    assert [first[f"{r['unit']}:weight.width"] for r in rows] == ["12"] * 6 + ["3"] * 7
    assert all(trials[1][f"{r['unit']}:weight.width"] == "3" for r in rows)
    assert list((tmp_path / "out" / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize(
    "search,message",
    [
        ({"space": {}}, "search.space is empty"),
        (
            {"space": {"weight": {"widht": [3, 4]}}},
            "search.space.weight.widht: format 'bfp' has no parameter 'widht' "
            "(did you mean 'width'?)",
        ),
        (
            {"space": {"weight": {"width": [3, 99]}}},
            "search.space.weight.width: bfp.width must be in [2, 24], got 99",
        ),
        (
            {"space": SPACE, "constraint": {"max_bits": 2.0}},
            "search.constraint.max_bits 2 cannot be met: every unit at its lowest choice gives "
            "5.6429 average bits",
        ),  # matmuls are not searched: they stay at W12
        ({"space": SPACE, "trails": 3}, "unknown key search.trails (did you mean search.trials?)"),
        (
            {"space": {"wieght": {"width": [3]}}},
            "unknown key search.space.wieght (did you mean search.space.weight?)",
        ),
        ({"space": SPACE, "sampler": "cmaes"}, "search.sampler must be one of tpe, nsga2, random"),
    ],
)
def test_bad_specs_fail_before_any_trial(tmp_path, runs, monkeypatch, capsys, search, message):
    def no_trials(*args, **kwargs):
        raise AssertionError("a trial ran")

    monkeypatch.setattr(search_mod.Scorer, "score", no_trials)
    recipe = tiny_recipe(
        tmp_path,
        "bad.yaml",
        quant=BASE,
        model_name_or_path=runs["float"],
        data_dir=runs["data"],
        output_dir=str(tmp_path / "out"),
        search={"held_out_samples": 8, **search},
    )
    capsys.readouterr()  # drop what building the fixtures printed
    assert search_cli.main([recipe]) == 2
    # one error line, and the last (loading the model prints progress bars before it)
    err = [x for x in capsys.readouterr().err.strip().splitlines() if "error" in x]
    assert len(err) == 1 and err[0].startswith("qat search: error: ")
    assert message in err[0]
    assert not (tmp_path / "out" / "search.db").exists()


def test_missing_search_section_and_override_of_a_search_key(tmp_path, runs, capsys):
    recipe = tiny_recipe(tmp_path, quant=BASE, model_name_or_path=runs["float"])
    assert search_cli.main([recipe]) == 2
    assert "the recipe has no search: section" in capsys.readouterr().err
    spec, _ = search_mod.read_recipe_and_spec(
        _recipe(tmp_path, runs), ["--search.trials", "7", "--search.constraint.max_bits", "4.5"]
    )[1:]
    assert spec.trials == 7 and spec.max_bits == 4.5


def test_pareto_front_and_choice():
    rows = [
        {"accuracy": 0.9, "bits": 6.0},
        {"accuracy": 0.85, "bits": 4.0},
        {"accuracy": 0.8, "bits": 5.0},
        {"accuracy": 0.9, "bits": 7.0},
        {"accuracy": 0.7, "bits": 3.0},
    ]
    assert pareto_front(rows) == [rows[4], rows[1], rows[0]]
    assert choose(rows, 5.0) == rows[1]
    assert choose(rows, None) == rows[0]  # equal accuracy: fewer bits
    assert choose(rows, 2.0) is None


def test_average_bits_weights_elements_by_count(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from qat.quant.quantize import quantize_model

    model = AutoModelForSequenceClassification.from_pretrained(make_tiny_model_dir(tmp_path))
    w4 = {k: {"format": "bfp", "width": 4, "block_size": 16} for k in BASE}
    assert average_bits(quantize_model(model, w4), 8)["bits"] == pytest.approx(4.5)
    # weights at W8 (8.5 bits), inputs and matmuls at W4 (4.5): weight by element counts
    model = AutoModelForSequenceClassification.from_pretrained(make_tiny_model_dir(tmp_path))
    mixed = {**w4, "weight": {"format": "bfp", "width": 8, "block_size": 16}}
    got = average_bits(quantize_model(model, mixed), 8)
    n_w = 2 * (4 * 32 * 32 + 2 * 32 * 64) + 32 * 32  # 2 blocks + the pooler
    n_a = 8 * (2 * (4 * 32 + 32 + 64) + 32)  # in_features per token x 8 tokens
    n_m = 2 * (3 * 32 * 8 + 2 * 8 * 8)  # Q, K, V + P (2 heads) per attention module
    assert got["weight_bits"] == 8.5 and got["activation_bits"] == 4.5
    assert got["bits"] == pytest.approx((8.5 * n_w + 4.5 * (n_a + n_m)) / (n_w + n_a + n_m))


# --- bad tables, foreign or blank study files, resumes scored differently ----------


def _no_trials(monkeypatch) -> None:
    def no_trials(*args, **kwargs):
        raise AssertionError("a trial ran")

    monkeypatch.setattr(search_mod.Scorer, "score", no_trials)


def _one_error(capsys) -> str:
    err = [x for x in capsys.readouterr().err.strip().splitlines() if "error" in x]
    assert len(err) == 1 and err[0].startswith("qat search: error: "), err
    return err[0]


def test_max_bits_nan_is_refused_before_the_model_loads(tmp_path, runs, monkeypatch, capsys):
    _no_trials(monkeypatch)
    monkeypatch.setattr(search_runner, "Scorer", None)  # never built
    recipe = _recipe(tmp_path, runs, constraint={"max_bits": float("nan")})
    assert "max_bits: .nan" in Path(recipe).read_text()
    capsys.readouterr()
    assert search_cli.main([recipe]) == 2
    assert _one_error(capsys).endswith(
        "search.constraint.max_bits must be a finite number > 0, got nan"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "body, message",
    [
        (
            b"rank,unit\n1,layer.0\nx,layer.1\n",
            "line 3: rank 'x' of unit 'layer.1' is not an integer",
        ),
        (b"rank,unit\n1,layer.0\n2\n", "line 3: no unit name"),
        (b"rank,unit\n\xff\xfe,1\n", "cannot be read as CSV ('utf-8' codec can't decode byte 0xff"),
        (b"a,b\n1,2\n", "is not a sensitivity table (no unit and rank columns)"),
        (b"", "is not a sensitivity table"),
    ],
)
def test_bad_sensitivity_table_fails_before_the_model_loads(
    tmp_path, runs, monkeypatch, capsys, body, message
):
    monkeypatch.setattr(search_runner, "Scorer", None)
    table = tmp_path / "sensitivity.csv"
    table.write_bytes(body)
    recipe = _recipe(tmp_path, runs, sensitivity=str(table))
    capsys.readouterr()
    assert search_cli.main([recipe]) == 2
    assert _one_error(capsys).startswith(
        f"qat search: error: search.sensitivity: {str(table)!r} {message}"
    )


def test_sensitivity_output_dir_naming_a_file_fails_before_scoring(
    tmp_path, runs, monkeypatch, capsys
):
    from qat.analysis import sensitivity as sens_mod
    from qat.cli import sensitivity as sens_cli

    monkeypatch.setattr(sens_mod, "Scorer", None)
    f = tmp_path / "afile"
    f.write_text("keep me")
    recipe = _recipe(tmp_path, runs)
    capsys.readouterr()
    assert sens_cli.main([recipe, "--output_dir", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"qat sensitivity: error: --output_dir {str(f)!r} is a file, expected a folder"]
    assert f.read_text() == "keep me"
    # an empty name is no folder, not the recipe's output_dir
    assert sens_cli.main([recipe, "--output_dir", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["qat sensitivity: error: --output_dir must name a folder, got ''"]


def _foreign_sqlite(db: Path) -> None:
    import sqlite3

    con = sqlite3.connect(db)
    con.execute("CREATE TABLE notes (body TEXT)")
    con.execute("INSERT INTO notes VALUES ('mine')")
    con.commit()
    con.close()


@pytest.mark.parametrize("make", ["text", "sqlite", "other_study"])
@pytest.mark.parametrize("resume", [True, False])
def test_a_search_db_that_is_not_ours_is_left_untouched(
    tmp_path, runs, monkeypatch, capsys, make, resume
):
    _no_trials(monkeypatch)
    db = tmp_path / "out" / "search.db"
    db.parent.mkdir()
    if make == "text":
        db.write_text("not a database\n")
    elif make == "sqlite":
        _foreign_sqlite(db)
    else:
        import optuna

        optuna.create_study(storage=f"sqlite:///{db}", study_name="someone-else")
    before = db.read_bytes()
    capsys.readouterr()
    assert search_cli.main([_recipe(tmp_path, runs), *(["--resume"] if resume else [])]) == 2
    assert _one_error(capsys) == (
        f"qat search: error: {str(db)!r} is not a qat search study (not an optuna SQLite "
        "database holding study 'qat-search'); it was left as it is: move it away or choose "
        "another --output_dir"
    )
    assert db.read_bytes() == before


@pytest.mark.parametrize("make", ["empty", "half_written"])
def test_an_empty_or_half_written_search_db_starts_afresh(tmp_path, runs, capsys, make):
    db = tmp_path / "out" / "search.db"
    db.parent.mkdir()
    if make == "empty":
        db.write_bytes(b"")
    else:  # killed after optuna created the study, before qat recorded its key
        import optuna

        optuna.create_study(storage=f"sqlite:///{db}", study_name="qat-search")
    assert search_cli.main([_recipe(tmp_path, runs), "--search.trials", "1", "--resume"]) == 0
    assert len(_rows(tmp_path / "out" / "trials.csv")) == 1


@pytest.mark.parametrize(
    "override, key",
    [
        (["--search.seed", "1"], "seed"),
        (["--search.held_out_samples", "16"], "held_out_samples"),
        (["--quant.weight.width", "8"], "quant"),
    ],
)
def test_resume_scored_differently_is_refused_before_scoring(
    tmp_path, runs, monkeypatch, capsys, override, key
):
    recipe = _recipe(tmp_path, runs)
    assert search_cli.main([recipe, "--search.trials", "1"]) == 0
    db = tmp_path / "out" / "search.db"
    before = db.read_bytes()
    monkeypatch.setattr(search_runner, "Scorer", None)
    capsys.readouterr()
    assert search_cli.main([recipe, "--search.trials", "2", "--resume", *override]) == 2
    assert _one_error(capsys).startswith(
        f"qat search: error: --resume: the study in {str(db)!r} was scored with another {key} ("
    )
    assert db.read_bytes() == before
