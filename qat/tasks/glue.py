"""GLUE: the task table, loading (Hub or local TSV), tokenisation and the official metrics.

Metrics are computed with the scikit-learn / scipy functions the official ``glue`` metric uses
(``evaluate.load("glue")`` needs the Hub), so evaluation works offline. ``glue_scores`` is the
one implementation; the ``evaluate`` module in ``qat/glue_metric/`` (``load_metric``) wraps it,
and the trainer computes its metrics through that module.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from qat.errors import DataError, decode_utf8

HUB_DATASET = "nyu-mll/glue"
DATA_DIR_ENV = "QAT_DATA_DIR"


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """A GLUE task: a sequence classifier (``num_labels`` outputs; 1 = regression) scored by
    the official metric (``compute_metrics``). ``qat.tasks.registry`` holds it beside the
    decoder tasks."""

    head: ClassVar[str] = "sequence_classification"
    is_decoder: ClassVar[bool] = False
    name: str
    text_keys: tuple[str, ...]
    num_labels: int  # 1 = regression (STS-B)
    metric_names: tuple[str, ...]
    validation_splits: tuple[str, ...] = ("validation",)
    # The Hub dataset's class names in label-id order; () for regression. Saved models carry
    # them as config.id2label, so pipelines print "positive", not "LABEL_1".
    label_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.label_names) != (0 if self.num_labels == 1 else self.num_labels):
            raise ValueError(
                f"{self.name}: {len(self.label_names)} label names for {self.num_labels} labels"
            )

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def id2label(self) -> dict[int, str] | None:
        """``config.id2label`` for a classifier of this task; None for regression (STS-B)."""
        return dict(enumerate(self.label_names)) or None

    @property
    def label2id(self) -> dict[str, int] | None:
        return {name: i for i, name in enumerate(self.label_names)} or None

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.text_keys, "label")

    def predictions(self, logits: np.ndarray) -> np.ndarray:
        """Class ids (argmax over the last axis) or, for regression, the flat scores."""
        preds = np.asarray(logits)
        if self.is_regression:
            return preds.reshape(-1).astype(np.float64)
        return preds.argmax(-1) if preds.ndim > 1 else preds

    def compute_metrics(self, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
        """The official GLUE metric for this task from logits (or scores) and labels."""
        return glue_scores(self.name, self.predictions(predictions), references)

    def trainer_metrics(self, eval_pred) -> dict[str, float]:
        """``compute_metrics`` in the form ``transformers.Trainer`` calls it, through the
        ``evaluate`` module (``load_metric``)."""
        logits = eval_pred.predictions
        if isinstance(logits, tuple):
            logits = logits[0]
        return load_metric(self.name).compute(
            predictions=self.predictions(logits), references=np.asarray(eval_pred.label_ids)
        )


GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        GlueTask(
            "cola",
            ("sentence",),
            2,
            ("matthews_correlation",),
            label_names=("unacceptable", "acceptable"),
        ),
        GlueTask("sst2", ("sentence",), 2, ("accuracy",), label_names=("negative", "positive")),
        GlueTask(
            "mrpc",
            ("sentence1", "sentence2"),
            2,
            ("accuracy", "f1"),
            label_names=("not_equivalent", "equivalent"),
        ),
        GlueTask(
            "qqp",
            ("question1", "question2"),
            2,
            ("accuracy", "f1"),
            label_names=("not_duplicate", "duplicate"),
        ),
        GlueTask("stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearmanr")),
        GlueTask(
            "mnli",
            ("premise", "hypothesis"),
            3,
            ("accuracy",),
            ("validation_matched", "validation_mismatched"),
            label_names=("entailment", "neutral", "contradiction"),
        ),
        GlueTask(
            "qnli",
            ("question", "sentence"),
            2,
            ("accuracy",),
            label_names=("entailment", "not_entailment"),
        ),
        GlueTask(
            "rte",
            ("sentence1", "sentence2"),
            2,
            ("accuracy",),
            label_names=("entailment", "not_entailment"),
        ),
        GlueTask(
            "wnli",
            ("sentence1", "sentence2"),
            2,
            ("accuracy",),
            label_names=("not_entailment", "entailment"),
        ),
    ]
}

METRIC_DIR = Path(__file__).resolve().parent / "glue_metric"


def glue_scores(task_name: str, predictions: Any, references: Any) -> dict[str, float]:
    """The official GLUE metric of one task from class ids (scores for STS-B) and labels.

    The one implementation behind ``GlueTask.compute_metrics`` and the ``evaluate`` module.
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    task = get_task(task_name)
    preds = np.asarray(predictions)
    refs = np.asarray(references)
    if task.is_regression:
        preds = preds.astype(np.float64)
        return {
            "pearson": float(pearsonr(preds, refs)[0]),
            "spearmanr": float(spearmanr(preds, refs)[0]),
        }
    out: dict[str, float] = {}
    if "matthews_correlation" in task.metric_names:
        out["matthews_correlation"] = float(matthews_corrcoef(refs, preds))
    if "accuracy" in task.metric_names:
        out["accuracy"] = float((preds == refs).mean())
    if "f1" in task.metric_names:
        out["f1"] = float(f1_score(y_true=refs, y_pred=preds))
    return out


@functools.cache
def load_metric(task_name: str):
    """The GLUE metric of ``task_name`` as an ``evaluate`` module, loaded offline from the
    package (``evaluate.load(<qat/glue_metric>, task)``; kept in memory, no cache files).
    Loaded once per process: the trainer calls it at every evaluation."""
    import evaluate

    return evaluate.load(str(METRIC_DIR), get_task(task_name).name, keep_in_memory=True)


def get_task(name: str) -> GlueTask:
    if name in ("causal_lm", "chat"):  # qat.tasks.registry.DECODER_TASKS
        raise DataError(
            f"task_name {name!r} trains a decoder, not a GLUE classifier; measure "
            "it with qat perplexity (or qat train --do_train false)"
        )
    if name not in GLUE_TASKS:
        raise DataError(f"unknown task_name {name!r}; valid tasks: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[name]


def resolve_data_dir(data_dir: str | None) -> str | None:
    """The recipe's ``data_dir``, else ``$QAT_DATA_DIR``, else None (the Hub)."""
    return data_dir or os.environ.get(DATA_DIR_ENV) or None


def _decode(task: GlueTask, path: Path, raw: bytes) -> str:
    # utf-8-sig: a BOM would otherwise rename the first column
    return decode_utf8(
        raw, f"{task.name}: {str(path)!r}", DataError, "utf-8-sig", "; save the file as UTF-8"
    )


def read_tsv_records(task: GlueTask, path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and records of a GLUE TSV, one record per physical line.

    The files are tab-separated; a field may be wrapped in double quotes with inner quotes
    doubled (``csv`` QUOTE_MINIMAL, as ../shared/data writes a field holding a quote). A
    quoted field never spans lines in GLUE, so a record that does (an unclosed quote) would
    silently merge rows: it is an error naming the line, as are non-UTF-8 bytes and a row whose
    field count differs from the header's.
    """
    import csv

    where = f"{task.name}: {str(path)!r}"
    text = _decode(task, path, path.read_bytes())
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last record, it does not start one
    if not lines:
        raise DataError(f"{task.name}: data file {str(path)!r} is empty")
    reader = csv.reader(iter(lines), delimiter="\t", strict=True)
    records: list[list[str]] = []
    done = 0  # physical lines consumed so far
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(
                f"{where} line {done + 1}: malformed quoting ({e}); a field that "
                "starts with a double quote must end with one, with inner quotes "
                "doubled"
            ) from None
        if reader.line_num != done + 1:
            raise DataError(
                f"{where} line {done + 1}: a quote opened on this line closes on "
                f"line {reader.line_num}; records must not span lines"
            )
        done = reader.line_num
        records.append(rec)
    header, rows = records[0], records[1:]
    if len(set(header)) != len(header):
        dup = next(h for h in header if header.count(h) > 1)
        raise DataError(f"{where} line 1: column {dup!r} appears twice in the header")
    for i, rec in enumerate(rows):
        if len(rec) != len(header):
            what = "blank" if rec == [] else f"has {len(rec)} fields"
            raise DataError(
                f"{where} line {i + 2} {what}, expected {len(header)} "
                f"({', '.join(header)}); a tab inside a field?"
            )
    return header, rows


def read_split_tsv(task: GlueTask, path: Path):
    """Read one local split as a ``datasets.Dataset``, checking rows, columns and labels."""
    import pandas as pd
    from datasets import Dataset

    if path.is_dir():
        raise DataError(f"{task.name}: data file {str(path)!r} is a directory, expected a TSV file")
    if not path.is_file():
        raise DataError(f"{task.name}: data file {str(path)!r} does not exist")
    header, rows = read_tsv_records(task, path)
    if not rows:
        raise DataError(f"{task.name}: data file {str(path)!r} has a header but no rows")
    missing = [c for c in task.columns if c not in header]
    if missing:
        raise DataError(
            f"{task.name}: data file {str(path)!r} lacks column(s) "
            f"{', '.join(missing)}; it has {', '.join(header)}"
        )
    cols = {c: [r[header.index(c)] for r in rows] for c in task.columns}
    labels = pd.to_numeric(pd.Series(cols["label"]), errors="coerce")
    finite = labels.notna() & labels.abs().lt(float("inf"))
    if not finite.all():
        row = int((~finite).to_numpy().argmax())
        raise DataError(
            f"{task.name}: {str(path)!r} row {row + 2}: label "
            f"{cols['label'][row]!r} is not a number"
        )
    if task.is_regression:
        cols["label"] = labels.astype("float32").tolist()
    else:
        bad = ~labels.isin(range(task.num_labels))
        if bad.any():
            row = int(bad.to_numpy().argmax())
            raise DataError(
                f"{task.name}: {str(path)!r} row {row + 2}: label "
                f"{cols['label'][row]!r} is out of range; expected 0.."
                f"{task.num_labels - 1}"
            )
        cols["label"] = labels.astype("int64").tolist()
    features = None
    if task.is_regression:
        from datasets import Features, Value

        features = Features(
            {**{k: Value("string") for k in task.text_keys}, "label": Value("float32")}
        )
    return Dataset.from_dict(cols, features=features)


def load_glue(task_name: str, data_dir: str | None = None, splits: tuple[str, ...] | None = None):
    """Load ``train`` and the task's validation split(s) as a ``datasets.DatasetDict``.

    With a data dir (argument or ``$QAT_DATA_DIR``) read ``<dir>/<task>/<split>.tsv``;
    otherwise ``load_dataset("nyu-mll/glue", task)`` from the Hub.
    """
    from datasets import DatasetDict, load_dataset

    task = get_task(task_name)
    splits = splits or ("train", *task.validation_splits)
    root = resolve_data_dir(data_dir)
    if root is not None:
        base = Path(root).expanduser() / task.name
        if not Path(root).expanduser().exists():
            raise DataError(
                f"data_dir {root!r} does not exist (from "
                f"{'the recipe' if data_dir else DATA_DIR_ENV}); it should hold "
                f"{task.name}/train.tsv and {task.name}/validation.tsv"
            )
        for folder, what in ((Path(root).expanduser(), "data_dir"), (base, "task folder")):
            if folder.exists() and not folder.is_dir():
                raise DataError(
                    f"{what} {str(folder)!r} is a file, expected a folder holding "
                    f"{task.name}/train.tsv and {task.name}/validation.tsv"
                )
        return DatasetDict({s: read_split_tsv(task, base / f"{s}.tsv") for s in splits})
    try:
        ds = load_dataset(HUB_DATASET, task.name)
    except Exception as e:  # noqa: BLE001 - any Hub failure gets the same advice
        raise DataError(
            f"could not load {HUB_DATASET}/{task.name} from the Hugging Face Hub ({e}); to use "
            f"local files set data_dir in the recipe or {DATA_DIR_ENV} to a folder holding "
            f"{task.name}/train.tsv and {task.name}/validation.tsv"
        ) from None
    return DatasetDict({s: ds[s] for s in splits})


def tokenize_glue(ds, task: GlueTask, tokenizer: Any, max_length: int):
    """Tokenise text columns (no padding: the collator pads per batch) and keep ``label``."""

    def enc(batch):
        texts = [batch[k] for k in task.text_keys]
        return tokenizer(*texts, truncation=True, max_length=max_length)

    remove = [c for c in next(iter(ds.values())).column_names if c != "label"]
    return ds.map(enc, batched=True, remove_columns=remove, desc="tokenising")


@dataclasses.dataclass(frozen=True)
class GlueSplits:
    """Raw GLUE splits, read and subset; ``tokenize`` once a tokenizer exists. Tokenising is a
    second step so the data is checked before the (slow) model load gives the tokenizer."""

    task: GlueTask
    raw: Any  # datasets.DatasetDict

    def tokenize(self, tokenizer: Any, max_length: int):
        """The splits tokenised (``tokenize_glue``), as a ``DatasetDict``."""
        return tokenize_glue(self.raw, self.task, tokenizer, max_length)


def glue_splits(
    task: GlueTask,
    data_dir: str | None,
    splits: tuple[str, ...] | None = None,
    *,
    train_samples: int | None = None,
    eval_samples: int | None = None,
    seed: int = 0,
) -> GlueSplits:
    """Load ``splits`` of ``task`` (default: train and the validation split(s)) and subset them
    before tokenising, so 64 rows of SST-2 tokenise 64 rows.

    ``train_samples``: a seeded shuffle of ``train``, then its first rows (the same rows as
    shuffling the tokenised set: the permutation depends only on the seed and the length).
    ``eval_samples``: the first rows of every other split. None (or 0) keeps every row.
    """
    raw = load_glue(task.name, data_dir, splits=splits)
    for name in raw:
        n = train_samples if name == "train" else eval_samples
        if not n:
            continue
        ds = raw[name].shuffle(seed=seed) if name == "train" else raw[name]
        raw[name] = ds.select(range(min(n, len(ds))))
    return GlueSplits(task, raw)


def evaluate_split(model, tokenizer, task, data, batch_size: int) -> dict[str, float]:
    """Run ``model`` over one tokenised split and compute the task's metrics. Batches go to
    the model's device; logits stay there until the end (one copy back, no per-batch sync)."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer)
    device = next(model.parameters()).device
    preds, labels = [], []
    rows = data.with_format(None)
    with torch.no_grad():
        for start in tqdm(range(0, len(rows), batch_size), desc="eval", unit="batch"):
            batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
            labels.append(batch.pop("labels").numpy())
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            preds.append(model(**batch).logits.float())
    logits = torch.cat(preds).cpu().numpy()
    return task.compute_metrics(logits, np.concatenate(labels))
