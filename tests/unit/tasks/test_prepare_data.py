"""data/prepare.py on a fake Hub: the files it writes read back through qat's own loaders, equal
the committed real-data fixtures byte for byte, and are never overwritten unasked."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import datasets
import pandas as pd
import pytest
from tiny import GLUE_DIR, REPO, WIKITEXT_DIR

from qat.tasks.glue import GLUE_TASKS, HUB_DATASET, get_task, load_glue
from qat.tasks.language_modeling import load_wikitext

SCRIPT = REPO / "data" / "prepare.py"


def _prepare():
    spec = importlib.util.spec_from_file_location("qat_data_prepare", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _synthetic_split(task: str, n: int, seed: int) -> dict[str, list]:
    t = get_task(task)
    cols = {
        k: [f'{task} {k} {seed}-{i}: a "quoted" word, a\ttab' for i in range(n)]
        for k in t.text_keys
    }
    cols["label"] = (
        [round(0.4 * i + 0.1 * seed, 1) for i in range(n)]
        if t.is_regression
        else [(i + seed) % t.num_labels for i in range(n)]
    )
    cols["idx"] = list(range(n))
    return cols


def _features(task: str) -> datasets.Features:
    t = get_task(task)
    feats = {k: datasets.Value("string") for k in t.text_keys}
    feats["label"] = (
        datasets.Value("float32")
        if t.is_regression
        else datasets.ClassLabel(names=list(t.label_names))
    )
    feats["idx"] = datasets.Value("int32")
    return datasets.Features(feats)


def _fixture_split(task: str, split: str) -> dict[str, list]:
    df = pd.read_csv(GLUE_DIR / task / f"{split}.tsv", sep="\t", keep_default_na=False)
    return {c: df[c].tolist() for c in df.columns}


def _wikitext_rows(path: Path) -> list[str]:
    # as the Hub's wikitext builder yields them: blank (single-space) lines become ""
    return [line if line.strip() else "" for line in path.read_text().splitlines(True)]


class FakeHub:
    """``datasets.load_dataset`` for nyu-mll/glue and Salesforce/wikitext, built here."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, name: str, config: str, **_) -> datasets.DatasetDict:
        self.calls.append((name, config))
        if name == HUB_DATASET:
            t = get_task(config)
            splits = {}
            for i, split in enumerate(("train", *t.validation_splits)):
                real = config in ("sst2", "rte")  # the committed fixtures are real rows
                data = (
                    _fixture_split(config, split)
                    if real
                    else _synthetic_split(config, 5 + i, seed=i)
                )
                splits[split] = datasets.Dataset.from_dict(data, features=_features(config))
            test = _synthetic_split(config, 3, seed=9)
            test["label"] = [-1.0 if t.is_regression else -1] * 3  # hidden test labels
            splits["test"] = datasets.Dataset.from_dict(test)
            return datasets.DatasetDict(splits)
        assert (name, config) == ("Salesforce/wikitext", "wikitext-2-raw-v1")
        rows = {s: _wikitext_rows(WIKITEXT_DIR / f"{s}.txt") for s in ("validation", "test")}
        rows["train"] = ["", " = Train = \n", "", " one line \n", " no newline at the end"]
        return datasets.DatasetDict(
            {s: datasets.Dataset.from_dict({"text": r}) for s, r in rows.items()}
        )


@pytest.fixture()
def hub(monkeypatch) -> FakeHub:
    fake = FakeHub()
    monkeypatch.setattr(datasets, "load_dataset", fake)
    return fake


def test_all_nine_tasks_and_wikitext_read_back(tmp_path, hub, monkeypatch, capsys):
    out = tmp_path / "data"
    assert _prepare().main(["--out", str(out)]) == 0
    assert [c[1] for c in hub.calls] == [*GLUE_TASKS, "wikitext-2-raw-v1"]
    for name, task in GLUE_TASKS.items():
        assert sorted(p.name for p in (out / "glue" / name).iterdir()) == sorted(
            f"{s}.tsv" for s in ("train", *task.validation_splits)
        )  # no test split, no .part
        ds = load_glue(name, str(out / "glue"))
        for i, split in enumerate(("train", *task.validation_splits)):
            expected = (
                _fixture_split(name, split)
                if name in ("sst2", "rte")
                else _synthetic_split(name, 5 + i, seed=i)
            )
            for col in task.text_keys:
                assert ds[split][col] == expected[col]
            if task.is_regression:
                assert ds[split]["label"] == pytest.approx(expected["label"], rel=1e-6)
            else:
                assert ds[split]["label"] == expected["label"]
    # real rows come back as the very bytes of the real files (SST-2's trailing spaces, RTE's
    # quoting), so the layout is the one ../shared/data holds
    for task in ("sst2", "rte"):
        for split in ("train", "validation"):
            assert (out / "glue" / task / f"{split}.tsv").read_bytes() == (
                GLUE_DIR / task / f"{split}.tsv"
            ).read_bytes()
    with (out / "glue" / "stsb" / "train.tsv").open(newline="") as f:
        labels = [r["label"] for r in csv.DictReader(f, delimiter="\t")]
    assert labels == ["0.0", "0.4", "0.8", "1.2", "1.6"]  # float32's shortest repr, as the
    # real files have it (3.8), not float(np.float32(0.4)) = 0.4000000059604645
    monkeypatch.setenv("QAT_WIKITEXT_DIR", str(out / "wikitext-2-raw"))
    for split in ("validation", "test"):
        assert load_wikitext(split) == (WIKITEXT_DIR / f"{split}.txt").read_text()
    assert load_wikitext("train") == " \n = Train = \n \n one line \n no newline at the end\n"
    stdout = capsys.readouterr().out
    assert f"export QAT_DATA_DIR={out.resolve() / 'glue'}" in stdout
    assert f"export QAT_WIKITEXT_DIR={out.resolve() / 'wikitext-2-raw'}" in stdout


def test_subset_and_refusal_to_overwrite(tmp_path, hub, capsys):
    prepare = _prepare()
    out = tmp_path / "data"
    assert prepare.main(["--out", str(out), "--tasks", "mnli", "--no-wikitext"]) == 0
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [
        "glue/mnli/train.tsv",
        "glue/mnli/validation_matched.tsv",
        "glue/mnli/validation_mismatched.tsv",
    ]
    target = out / "glue" / "mnli" / "train.tsv"
    target.write_text("mine\n")
    capsys.readouterr()
    n_calls = len(hub.calls)
    assert prepare.main(["--out", str(out), "--tasks", "mnli", "--no-wikitext"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"prepare.py: error: {target} already exists (and 2 more); pass --overwrite to replace\n"
    )
    assert target.read_text() == "mine\n" and len(hub.calls) == n_calls  # checked before work
    assert prepare.main(["--out", str(out), "--tasks", "mnli", "--no-wikitext", "--overwrite"]) == 0
    assert target.read_text().startswith("premise\thypothesis\tlabel\tidx\n")


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--tasks", "sst3"],
            "--tasks: unknown GLUE task 'sst3' (did you mean 'sst2'?); valid tasks",
        ),
        (["--no-glue", "--no-wikitext"], "--no-glue and --no-wikitext together leave nothing"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, hub, capsys, argv, message):
    assert _prepare().main(["--out", str(tmp_path / "d"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prepare.py: error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "d").exists() and hub.calls == []


def test_a_hub_split_without_the_expected_column_is_named(tmp_path, monkeypatch, capsys):
    bad = datasets.DatasetDict(
        {
            s: datasets.Dataset.from_dict({"text": ["x"], "label": [0]})
            for s in ("train", "validation")
        }
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: bad)
    assert _prepare().main(["--out", str(tmp_path), "--tasks", "sst2", "--no-wikitext"]) == 2
    assert capsys.readouterr().err.endswith(
        "\nprepare.py: error: sst2: the Hub split lacks column(s) sentence; it has text, label\n"
    )
    assert not list(tmp_path.rglob("*.tsv*"))  # nothing half-written


def test_help_answers_without_downloading(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT)])  # argparse names the program from argv[0]
    with pytest.raises(SystemExit) as done:
        _prepare().main(["--help"])
    out = capsys.readouterr()
    assert done.value.code == 0 and out.err == ""
    assert out.out.startswith("usage: prepare.py [-h] --out OUT [--tasks TASK [TASK ...]]")
    assert "--overwrite" in out.out
