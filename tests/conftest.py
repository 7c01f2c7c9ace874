"""Test-wide settings: offline Hub, offline W&B, local GLUE data."""

import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_GLUE = REPO.parent / "shared" / "data" / "glue"
SHARED_WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw"

# Triton kernels run on CPU tensors only under the interpreter, which triton reads when a
# kernel is defined: set it before anything imports triton, unless a GPU is there to use.
try:
    import torch

    _cuda = torch.cuda.is_available()
except ImportError:
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
# quant.backend auto would torch.compile every format of hundreds of tiny models; the compile
# and triton backends have tests of their own that name them.
os.environ.setdefault("QAT_BACKEND", "reference")
if SHARED_GLUE.is_dir():
    os.environ.setdefault("QAT_DATA_DIR", str(SHARED_GLUE))
if SHARED_WIKITEXT.is_dir():
    os.environ.setdefault("QAT_WIKITEXT_DIR", str(SHARED_WIKITEXT))


@pytest.fixture()
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a tokenizer or model is ever loaded, or training starts (checks on bad
    input must come first)."""
    import qat.models
    from qat.training.trainer import QATTrainer

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model, tokenizer or training was reached despite bad input")

    for name in ("load_tokenizer", "load_sequence_classifier", "load_causal_lm"):
        monkeypatch.setattr(qat.models, name, fail)
    monkeypatch.setattr(QATTrainer, "train", fail)
