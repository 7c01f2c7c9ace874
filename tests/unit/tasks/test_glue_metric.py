"""The GLUE ``evaluate`` module (qat/glue_metric) equals scikit-learn / scipy on real labels,
loads offline, and is what the trainer's ``compute_metrics`` goes through."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from tiny import GLUE_DIR
from transformers import EvalPrediction

from qat.tasks.glue import METRIC_DIR, get_task, load_metric


def _labels(task: str) -> np.ndarray:
    with (GLUE_DIR / task / "validation.tsv").open(newline="") as f:
        return np.array([int(r["label"]) for r in csv.DictReader(f, delimiter="\t")])


def _logits(n: int, classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, classes)).astype(np.float32)


def _expected(task: str, preds: np.ndarray, refs: np.ndarray) -> dict[str, float]:
    """Straight from scikit-learn / scipy, as the Hub's ``glue`` metric computes them."""
    names = get_task(task).metric_names
    out = {}
    if "matthews_correlation" in names:
        out["matthews_correlation"] = matthews_corrcoef(refs, preds)
    if "accuracy" in names:
        out["accuracy"] = accuracy_score(refs, preds)
    if "f1" in names:
        out["f1"] = f1_score(refs, preds)
    if "pearson" in names:
        out = {"pearson": pearsonr(preds, refs)[0], "spearmanr": spearmanr(preds, refs)[0]}
    return out


# Real validation labels of the committed fixtures (sst2, rte); the binary tasks' metrics
# (Matthews, F1) are computed over the same label arrays.
@pytest.mark.parametrize(
    "task,labels_of",
    [("sst2", "sst2"), ("rte", "rte"), ("cola", "sst2"), ("mrpc", "rte"), ("qqp", "sst2")],
)
def test_classification_metrics_equal_sklearn(task, labels_of):
    refs = _labels(labels_of)
    logits = _logits(len(refs), 2, seed=len(task))
    preds = logits.argmax(-1)
    expected = _expected(task, preds, refs)
    got = load_metric(task).compute(predictions=preds, references=refs)
    assert got == expected  # the same functions on the same arrays: equal, not approximately
    assert get_task(task).compute_metrics(logits, refs) == expected
    assert get_task(task).trainer_metrics(EvalPrediction(logits, refs)) == expected
    assert 0.2 < expected.get("accuracy", 0.5) < 0.8  # random logits: not a degenerate case


def test_mnli_three_classes_and_stsb_regression():
    refs = np.random.default_rng(0).integers(0, 3, 64)
    logits = _logits(64, 3, seed=1)
    assert load_metric("mnli").compute(predictions=logits.argmax(-1), references=refs) == {
        "accuracy": accuracy_score(refs, logits.argmax(-1))
    }
    scores = np.random.default_rng(2).uniform(0, 5, 64).astype(np.float32)
    gold = (scores + np.random.default_rng(3).normal(0, 1, 64)).astype(np.float32)
    expected = _expected("stsb", scores.astype(np.float64), gold)
    assert load_metric("stsb").compute(predictions=scores, references=gold) == expected
    assert get_task("stsb").trainer_metrics(EvalPrediction(scores[:, None], gold)) == expected
    assert 0.5 < expected["pearson"] < 1


def test_unknown_task_is_named():
    with pytest.raises(Exception, match="unknown task_name 'sst3'"):
        load_metric("sst3")


def test_evaluate_load_works_offline_from_the_folder(tmp_path):
    code = (
        "import evaluate, sys\n"
        "m = evaluate.load(sys.argv[1], 'mrpc')\n"
        "print(m.compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 0]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run(
        [sys.executable, "-c", code, str(METRIC_DIR)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip().splitlines()[-1] == "{'accuracy': 0.5, 'f1': 0.6666666666666666}"


def test_the_cached_module_starts_fresh_at_every_compute():
    metric = load_metric("sst2")
    assert metric is load_metric("sst2")  # loaded once per process (the trainer evaluates often)
    assert metric.compute(predictions=[1, 1, 1, 1], references=[1, 1, 1, 1]) == {"accuracy": 1.0}
    assert metric.compute(predictions=[0, 0], references=[1, 1]) == {"accuracy": 0.0}
