"""Language modelling: text datasets, fixed-length chunks and perplexity.

The raw split is joined, tokenised once and cut into non-overlapping chunks of ``chunk_size``
tokens (the ragged tail is dropped); PPL = exp(mean token loss) over every predicted token of
every chunk (docs/formats.md, reference protocol). The text comes from the Hub (``wikitext`` /
``wikitext-2-raw-v1``) unless ``$QAT_WIKITEXT_DIR`` names a folder holding ``<split>.txt``.

Training (``task_name: causal_lm``) reads its text the same way (``load_split_text``: WikiText-2,
a Hub dataset's ``text_column``, or a local .txt / .jsonl / .json file) and packs it with the
same ``chunk_ids``, so the evaluation loss of a run is the ``qat perplexity`` loss of its model on
the same split and chunks (labels = input ids; the model shifts them).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from qat.errors import DataError, UsageError, decode_utf8

WIKITEXT_ENV = "QAT_WIKITEXT_DIR"
WIKITEXT = "wikitext"  # dataset_name for WikiText-2 raw (and the default of causal_lm)
DOC_SEPARATOR = "\n\n"  # between the rows of a dataset, before tokenising them as one text


def load_wikitext(split: str = "test") -> str:
    """The raw WikiText-2 split as one string (local folder or the Hub)."""
    if split not in ("test", "validation", "train"):
        raise DataError(f"--split must be test, validation or train; got {split!r}")
    path = wikitext_path(split)
    if path is not None:
        return decode_utf8(path.read_bytes(), repr(str(path)), UsageError)
    try:
        from datasets import load_dataset

        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    except Exception as e:  # noqa: BLE001 - any Hub failure gets the same advice
        raise DataError(
            f"could not load wikitext/wikitext-2-raw-v1 from the Hub ({e}); "
            f"set {WIKITEXT_ENV} to a folder holding {split}.txt"
        ) from None
    return "".join(ds["text"])


def wikitext_path(split: str) -> Path | None:
    """``$QAT_WIKITEXT_DIR/<split>.txt``, checked (None: no folder set, use the Hub)."""
    root = os.environ.get(WIKITEXT_ENV)
    if not root:
        return None
    folder = Path(root).expanduser()
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{WIKITEXT_ENV}={root!r} is a file, expected a folder holding {split}.txt")
    path = folder / f"{split}.txt"
    if path.is_dir():
        raise DataError(
            f"{WIKITEXT_ENV}={root!r}: {split}.txt is a directory, expected the raw text file"
        )
    if not path.is_file():
        raise DataError(f"{WIKITEXT_ENV}={root!r} holds no {split}.txt")
    return path


def check_not_export(model_type: Any, name: str) -> None:
    """A ``qat export`` folder holds packed codes for ``from_pretrained``, not a model the
    commands quantise and run: say so instead of "not a causal language model"."""
    if model_type == "qat_packed":  # qat.export.modeling_qat_packed.MODEL_TYPE
        raise UsageError(
            f"model {name!r} is a qat export (packed weights, model_type "
            "qat_packed): exports are for transformers' from_pretrained and "
            "inference engines; give the run folder or checkpoint it was "
            "exported from"
        )


def check_causal(config: Any, name: str) -> None:
    """Refuse encoders (BERT & co.) with a clear message: perplexity needs a decoder."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mtype = getattr(config, "model_type", None)
    check_not_export(mtype, name)
    causal = mtype in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        getattr(config, "is_decoder", False) or mtype not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )
    if not causal or getattr(config, "is_encoder_decoder", False):
        raise UsageError(
            f"model {name!r} is a {mtype!r} model, not a causal (decoder-only) "
            "language model; causal LM training and perplexity need a decoder such as Llama, "
            "OPT or GPT-2"
        )


def chunk_ids(ids: Any, chunk_size: int, max_chunks: int | None) -> list[Any]:
    """Non-overlapping ``chunk_size`` slices of a 1-D id tensor; the ragged tail is dropped."""
    if chunk_size < 2:
        raise UsageError(f"--chunk_size must be >= 2, got {chunk_size}")
    n = ids.numel() // chunk_size
    if max_chunks is not None:
        if max_chunks < 1:
            raise UsageError(f"--max_chunks must be >= 1, got {max_chunks}")
        n = min(n, max_chunks)
    if n == 0:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than one chunk of {chunk_size}")
    return [ids[i * chunk_size : (i + 1) * chunk_size] for i in range(n)]


def perplexity(model: Any, chunks: list[Any]) -> tuple[float, float, int]:
    """``(ppl, mean token loss, tokens scored)`` over ``chunks`` (each predicts len-1 tokens)."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    # The loss sum stays on the device (float64) so no chunk waits for the host (hence no
    # running perplexity on the bar; the result line gives it).
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with torch.no_grad():
        bar = tqdm(chunks, desc="perplexity", unit="chunk")
        for chunk in bar:
            ids = chunk.unsqueeze(0).to(device, non_blocking=True)
            logits = model(input_ids=ids).logits[0, :-1].float()
            total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").double()
            count += ids.shape[1] - 1
    mean = float(total) / count
    return math.exp(mean), mean, count


# --- text datasets for training (task_name: causal_lm) -----------------------------------------


def _split_of(args: Any, which: str) -> tuple[str | None, str]:
    """(local file or None, split name) of the recipe's ``train`` or ``eval`` data."""
    if which == "train":
        return args.train_file, args.train_split
    return args.validation_file, args.eval_split


DATA_SUFFIXES = (".txt", ".json", ".jsonl")  # train_file / validation_file kinds, any case


def data_file_kind(path: str) -> str:
    """``.txt``, ``.json`` or ``.jsonl`` (case-insensitive) of a data file; anything else is
    refused, not read as raw text (a .csv trained on as text is a silent wrong run)."""
    suffix = Path(path).suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise DataError(
            f"data file {path!r}: unrecognised suffix {Path(path).suffix!r}; "
            f"expected one of {', '.join(DATA_SUFFIXES)} (plain text, a JSON list "
            "of objects, one JSON object a line)"
        )
    return suffix


def _read_text(path: str) -> str:
    """The UTF-8 text of a data file (a missing, non-regular or non-UTF-8 file: one line)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(
            f"data file {path!r} does not exist"
            if not p.exists()
            else f"data file {path!r} is not a regular file"
        )
    return decode_utf8(p.read_bytes(), f"data file {path!r}", DataError)


def _json(text: str, where: str) -> Any:
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e})") from None
    except RecursionError:  # json recurses once per level: '[[[[...' overflows the stack
        raise DataError(f"{where}: JSON nested too deeply to read") from None


def read_rows_file(path: str) -> list[dict[str, Any]]:
    """Rows of a local .jsonl (one JSON object a line) or .json (a list of objects) file."""
    kind = data_file_kind(path)
    text = _read_text(path)
    if kind == ".json":
        rows = _json(text, f"data file {path!r}")
        if not isinstance(rows, list):
            raise DataError(f"data file {path!r} must hold a list of objects")
        lines = list(enumerate(rows, 1))
    else:
        lines = [
            (n, _json(line, f"data file {path!r} line {n}"))
            for n, line in enumerate(text.splitlines(), 1)
            if line.strip()
        ]
    for n, row in lines:
        if not isinstance(row, dict):
            raise DataError(
                f"data file {path!r} row {n}: expected a JSON object, got {type(row).__name__}"
            )
    return [row for _, row in lines]


def load_rows(args: Any, which: str) -> tuple[list[dict[str, Any]] | None, str, str]:
    """``(rows, text, where)`` of the recipe's train or eval data: rows of a .jsonl/.json file
    or Hub dataset, or (rows None) the raw text of a .txt file or of WikiText-2."""
    file, split = _split_of(args, which)
    if file:
        if data_file_kind(file) in (".json", ".jsonl"):
            return read_rows_file(file), "", f"data file {file!r}"
        return None, _read_text(file), f"data file {file!r}"
    name = args.dataset_name or WIKITEXT
    if name == WIKITEXT and args.dataset_config in (None, "wikitext-2-raw-v1"):
        return None, load_wikitext(split), f"WikiText-2 {split}"
    try:
        from datasets import load_dataset

        ds = load_dataset(name, args.dataset_config, split=split)
    except Exception as e:  # noqa: BLE001 - any Hub failure gets the same advice
        reason = " ".join(str(e).split())
        raise DataError(
            f"could not load dataset {name!r} (config {args.dataset_config!r}, "
            f"split {split!r}): {reason}"
        ) from None
    return ds.to_list(), "", f"dataset {name!r} split {split!r}"


def rows_text(rows: list[dict[str, Any]], column: str, where: str) -> str:
    """The ``column`` of every row joined into one text; an unknown column is refused."""
    if rows and column not in rows[0]:
        raise DataError(
            f"{where} has no text_column {column!r}; its columns: {', '.join(map(str, rows[0]))}"
        )
    for i, row in enumerate(rows):
        if not isinstance(row.get(column), str):
            raise DataError(
                f"{where} row {i + 1}: text_column {column!r} is "
                f"{type(row.get(column)).__name__}, not text"
            )
    return DOC_SEPARATOR.join(row[column] for row in rows)


def lm_text(args: Any, which: str) -> tuple[str, str]:
    """``(text, where)``: the recipe's train or eval text as one string."""
    rows, text, where = load_rows(args, which)
    if rows is not None:
        text = rows_text(rows, args.text_column, where)
    if not text.strip():
        raise DataError(f"{where} is empty: no text to train or evaluate on")
    return text, where


def lm_dataset(text: str, tokenizer: Any, block_size: int, max_chunks: int | None, where: str):
    """``text`` tokenised as ``qat perplexity`` does and packed into ``block_size`` chunks:
    a ``datasets.Dataset`` of ``input_ids``, ``attention_mask`` and ``labels`` (= input_ids)."""
    import torch
    from datasets import Dataset

    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0]
    try:
        chunks = chunk_ids(ids, block_size, max_chunks)
    except DataError as e:
        raise DataError(f"{where}: {e}; lower block_size or give more text") from None
    block = torch.stack(chunks).numpy()
    # an all-ones mask changes nothing for the model; TRL's SFTTrainer counts tokens with it
    return Dataset.from_dict({"input_ids": block, "attention_mask": block * 0 + 1, "labels": block})


def lm_splits(args: Any, tokenizer: Any) -> tuple[Any, Any, Any]:
    """``(train, eval, collator)`` of a ``causal_lm`` recipe: both texts read first, then
    tokenised and packed into ``block_size`` chunks (equal lengths: nothing to pad)."""
    from transformers import default_data_collator

    texts = {which: lm_text(args, which) for which in ("train", "eval")}
    limits = {"train": args.max_train_samples, "eval": args.max_eval_samples}
    with args.main_process_first(desc="tokenising"):
        train, evals = (
            lm_dataset(texts[w][0], tokenizer, args.block_size, limits[w], texts[w][1])
            for w in ("train", "eval")
        )
    return train, evals, default_data_collator
