"""Test-wide settings (offline Hub, offline W&B, local GLUE data) and the shared fixtures:
environment (``committed_wikitext``, ``wikitext_dir``, ``one_thread``), the session's finished
tiny run (``finished_run``, and ``run``: a copy per test) and the bad-input guard
(``no_model``). Tiny models and recipes live in ``tiny.py``."""

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# tiny.py's helpers assert (exit codes, one error line): rewrite them as pytest does in tests.
pytest.register_assert_rewrite("tiny")
from tiny import REPO, WIKITEXT_DIR, train_tiny_run  # noqa: E402

SHARED_GLUE = REPO.parent / "shared" / "data" / "glue"
SHARED_WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw"

# Under pytest-xdist (-n 2) each worker is a process of its own: one torch thread each (and in
# the subprocesses they start), so two workers on two cores do not oversubscribe them.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

# Triton kernels run on CPU tensors only under the interpreter, which triton reads when a
# kernel is defined: set it before anything imports triton, unless a GPU is there to use.
try:
    import torch

    _cuda = torch.cuda.is_available()
    if XDIST_WORKER:
        torch.set_num_threads(1)
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


@pytest.fixture()
def committed_wikitext(monkeypatch: pytest.MonkeyPatch) -> Path:
    """``QAT_WIKITEXT_DIR`` points at the committed WikiText-2 fixture (what ``lm_recipe``'s
    causal_lm runs read)."""
    monkeypatch.setenv("QAT_WIKITEXT_DIR", str(WIKITEXT_DIR))
    return WIKITEXT_DIR


@pytest.fixture()
def wikitext_text() -> str:
    """The ``test.txt`` that ``wikitext_dir`` writes; a module overrides it for other text."""
    return "The tower is 324 metres tall . " * 200


@pytest.fixture()
def wikitext_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wikitext_text: str) -> Path:
    """``tmp_path/wikitext`` holding only ``test.txt``, set as ``QAT_WIKITEXT_DIR``."""
    d = tmp_path / "wikitext"
    d.mkdir()
    (d / "test.txt").write_text(wikitext_text)
    monkeypatch.setenv("QAT_WIKITEXT_DIR", str(d))
    return d


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Torch uses one thread for the test, as a subprocess run with OMP_NUM_THREADS=1 does."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's one finished tiny ``qat train`` run: 3 steps, ``checkpoint-1..3`` (each:
    weights, optimizer, scheduler, trainer state, checksums). Read it, never change it: a test
    that damages a run takes its own copy, ``run``."""
    return train_tiny_run(
        tmp_path_factory.mktemp("finished"), max_steps=3, save_strategy="steps", save_steps=1
    )


@pytest.fixture()
def run(finished_run: Path, tmp_path: Path) -> Path:
    """A private copy of ``finished_run`` to damage."""
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst
