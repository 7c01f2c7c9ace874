"""Language modelling: WikiText-2 text, fixed-length chunks and perplexity.

The raw split is joined, tokenised once and cut into non-overlapping chunks of ``chunk_size``
tokens (the ragged tail is dropped); PPL = exp(mean token loss) over every predicted token of
every chunk (docs/formats.md, reference protocol). The text comes from the Hub (``wikitext`` /
``wikitext-2-raw-v1``) unless ``$QAT_WIKITEXT_DIR`` names a folder holding ``<split>.txt``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from qat.errors import DataError, UsageError

WIKITEXT_ENV = "QAT_WIKITEXT_DIR"


def load_wikitext(split: str = "test") -> str:
    """The raw WikiText-2 split as one string (local folder or the Hub)."""
    if split not in ("test", "validation", "train"):
        raise DataError(f"--split must be test, validation or train; got {split!r}")
    path = wikitext_path(split)
    if path is not None:
        raw = path.read_bytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise UsageError(f"{str(path)!r} line {line}: not valid UTF-8 (byte "
                               f"0x{raw[e.start]:02x})") from None
    try:
        from datasets import load_dataset

        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    except Exception as e:  # noqa: BLE001 - any Hub failure gets the same advice
        raise DataError(f"could not load wikitext/wikitext-2-raw-v1 from the Hub ({e}); "
                           f"set {WIKITEXT_ENV} to a folder holding {split}.txt") from None
    return "".join(ds["text"])


def wikitext_path(split: str) -> Path | None:
    """``$QAT_WIKITEXT_DIR/<split>.txt``, checked (None: no folder set, use the Hub)."""
    root = os.environ.get(WIKITEXT_ENV)
    if not root:
        return None
    folder = Path(root).expanduser()
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{WIKITEXT_ENV}={root!r} is a file, expected a folder holding "
                           f"{split}.txt")
    path = folder / f"{split}.txt"
    if path.is_dir():
        raise DataError(f"{WIKITEXT_ENV}={root!r}: {split}.txt is a directory, expected the "
                           "raw text file")
    if not path.is_file():
        raise DataError(f"{WIKITEXT_ENV}={root!r} holds no {split}.txt")
    return path


def check_causal(config: Any, name: str) -> None:
    """Refuse encoders (BERT & co.) with a clear message: perplexity needs a decoder."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mtype = getattr(config, "model_type", None)
    causal = mtype in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        getattr(config, "is_decoder", False)
        or mtype not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    if not causal or getattr(config, "is_encoder_decoder", False):
        raise UsageError(f"model {name!r} is a {mtype!r} model, not a causal (decoder-only) "
                           "language model; perplexity needs one such as Llama, OPT or GPT-2")


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
        raise DataError(f"the text has {ids.numel()} tokens, fewer than one chunk of "
                           f"{chunk_size}")
    return [ids[i * chunk_size:(i + 1) * chunk_size] for i in range(n)]


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


def check_chunk_size(config: Any, chunk_size: int, name: str) -> None:
    """A chunk longer than the model's positions would fail (or read garbage) mid-run."""
    from qat.models import position_limit

    limit = position_limit(config)
    if limit is not None and chunk_size > limit:
        raise UsageError(f"--chunk_size {chunk_size} is beyond the position limit of model "
                           f"{name!r} ({limit} positions); pass --chunk_size {limit} or less")
