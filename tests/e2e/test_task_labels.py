"""Saved models speak the task's language: config.id2label from the GLUE task, through
``pipeline("text-classification")`` on a trained run and on its packed export."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tiny import make_tiny_glue_dir, tiny_recipe

from qat.tasks.glue import GLUE_TASKS, get_task

EXPECTED = {
    "cola": ["unacceptable", "acceptable"],
    "sst2": ["negative", "positive"],
    "mrpc": ["not_equivalent", "equivalent"],
    "qqp": ["not_duplicate", "duplicate"],
    "stsb": [],
    "mnli": ["entailment", "neutral", "contradiction"],
    "qnli": ["entailment", "not_entailment"],
    "rte": ["entailment", "not_entailment"],
    "wnli": ["not_entailment", "entailment"],
}


def test_every_task_names_its_labels_in_id_order():
    assert {n: list(t.label_names) for n, t in GLUE_TASKS.items()} == EXPECTED
    assert get_task("mnli").id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
    assert get_task("rte").label2id == {"entailment": 0, "not_entailment": 1}
    assert get_task("stsb").id2label is None and get_task("stsb").label2id is None


# The export is loaded in a fresh interpreter: only `import qat` may register the quant method.
PIPE = """
import json, sys
import qat  # noqa: F401
from transformers import pipeline
clf = pipeline("text-classification", model=sys.argv[1], device="cpu")
print(json.dumps(clf(["a gripping, funny film", "flat and dull"], top_k=None)))
"""


def _labels(out: str) -> list[set[str]]:
    return [{d["label"] for d in row} for row in json.loads(out.strip().splitlines()[-1])]


def test_trained_run_and_its_export_print_label_names(finished_run, tmp_path):
    from transformers import pipeline

    from qat.cli.export import main as export_main

    config = json.loads((finished_run / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}
    clf = pipeline("text-classification", model=str(finished_run), device="cpu")
    got = clf(["a gripping, funny film", "flat and dull"], top_k=None)
    assert _labels(json.dumps(got)) == [{"negative", "positive"}] * 2

    export_dir = tmp_path / "export"
    assert export_main([str(finished_run), "--out", str(export_dir)]) == 0
    # A packed export keeps the trained model's config under base_config (model_type qat_packed)
    exported = json.loads((export_dir / "config.json").read_text())
    assert exported["model_type"] == "qat_packed"
    assert exported["base_config"]["id2label"] == {"0": "negative", "1": "positive"}
    fresh = subprocess.run(
        [sys.executable, "-c", PIPE, str(export_dir)], capture_output=True, text=True, check=True
    )
    assert _labels(fresh.stdout) == [{"negative", "positive"}] * 2


@pytest.mark.parametrize("task", ["rte"])
def test_pair_task_run_config(tmp_path, task):
    from qat.cli.train import main as train_main

    recipe = tiny_recipe(
        tmp_path, task_name=task, data_dir=make_tiny_glue_dir(tmp_path, task), max_steps=1
    )
    assert train_main([recipe]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {"0": "entailment", "1": "not_entailment"}
