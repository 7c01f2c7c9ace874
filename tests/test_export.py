"""Packed export: exact pack/unpack, HfQuantizer round trip (torch.equal logits), file size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import tiny_recipe
from transformers import AutoModelForSequenceClassification

import qat.hf_quantizer  # noqa: F401 - registers quant_method "qat" (qat/__init__ should too)
from qat.eval_cmd import load_model, resolve_source
from qat.export import (
    ExportError,
    _packers,
    export_model,
    main,
    pack_bits,
    pack_weight,
    unpack_bits,
    unpack_weight,
)
from qat.formats import make_format
from qat.modules import QuantLinear

REPO = Path(__file__).resolve().parent.parent


def test_bit_packing_round_trips():
    for bits in (2, 3, 4, 6, 8):
        codes = torch.randint(0, 2**bits, (101,))
        stream = pack_bits(codes, bits)
        assert stream.dtype == torch.uint8 and stream.numel() == -(-101 * bits // 8)
        assert torch.equal(unpack_bits(stream, bits, 101), codes)


def _specs() -> list[dict]:
    specs = [{"format": "bfp", "width": w} for w in (2, 4, 6, 8)]
    specs += [{"format": n} for n in sorted(_packers()) if n != "bfp"]
    if "bof4s" in _packers():
        specs.append({"format": "bof4s", "outliers": "opq"})
    return specs


@pytest.mark.parametrize("spec", _specs(), ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("dim", [-1, 0])
def test_unpack_is_bit_identical_to_fake_quantisation(spec, dim):
    torch.manual_seed(0)
    w = torch.randn(24, 70) * 0.05  # 70: a ragged last block for every block size
    w[2, 3] = 1.5  # an outlier
    fmt = make_format(spec)
    tensors, meta = pack_weight(fmt, w, dim)
    assert torch.equal(unpack_weight(json.loads(json.dumps(meta)), tensors),
                       fmt.quantize(w, dim))


def test_unsupported_format_and_float_model_fail_clearly():
    with pytest.raises(ExportError, match="packed export not supported for format 'int'"):
        pack_weight(make_format({"format": "int", "width": 4}), torch.randn(4, 8), -1)
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ExportError, match="not quantised"):
        export_model(model, "/tmp/never-written")


def _batch(tok):
    return tok(["a gripping, funny film", "flat"], return_tensors="pt", padding=True)


@pytest.mark.parametrize("weight", [{"format": "bfp", "width": 4}, {"format": "mxfp4"},
                                    {"format": "nf4", "block_size": 32}], ids=str)
def test_from_pretrained_rebuilds_identical_logits(tmp_path, weight):
    if weight["format"] not in _packers():
        pytest.skip(f"{weight['format']} not registered")
    recipe = tiny_recipe(tmp_path)
    model, tok = load_model(resolve_source(recipe, ["--quant.weight", json.dumps(weight)]), 2)
    out = export_model(model, tmp_path / "export", tok)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "qat" and cfg["quant"]["weight"]["format"] == weight["format"]
    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert isinstance(loaded.bert.encoder.layer[1].output.dense, QuantLinear)
    assert loaded.config._attn_implementation == "qat"
    batch = _batch(tok)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def _sizes(model, path: Path) -> tuple[float, float, int, int]:
    """(expected packed bytes, expected file bytes, packed bytes written, file bytes).

    expected packed = sum over quantised linears of bits_per_element x weight numel / 8;
    expected file   = expected packed + sum over all other state tensors (tied ones once)
                      of numel x element_size (biases, norms, embeddings, the float head).
    """
    packed = {f"{n}.weight": m.weight_quantizer.fmt.bits_per_element * m.weight.numel() / 8
              for n, m in model.named_modules() if isinstance(m, QuantLinear)
              and m.weight_quantizer is not None}
    seen, other = set(), 0
    for key, t in model.state_dict().items():
        if key not in packed and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            other += t.numel() * t.element_size()
    with safe_open(str(path), "pt") as f:
        written = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size()
                      for k in f.keys() if ".weight_" in k)
    exp_packed = sum(packed.values())
    return exp_packed, exp_packed + other, written, path.stat().st_size


def test_tiny_export_size(tmp_path):
    model, tok = load_model(resolve_source(tiny_recipe(tmp_path), []), 2)
    out = export_model(model, tmp_path / "export", tok)
    exp_packed, exp_file, written, size = _sizes(model, out / "model.safetensors")
    assert written == pytest.approx(exp_packed, rel=1e-3)  # BFP: exactly W + E/B bits
    assert size == pytest.approx(exp_file, rel=0.05)


def test_export_command(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    assert main([recipe, "--out", str(tmp_path / "e"), "--quant.weight.width", "6"]) == 0
    info = json.loads((tmp_path / "e" / "qat_export.json").read_text())
    assert info["density"]["quantized_linears"]["bits_per_element"] == pytest.approx(6.5)
    assert main([recipe]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    assert main([recipe, "--out", str(tmp_path / "f"), "--quant.weight",
                 "{format: int, width: 4}"]) == 2
    assert "packed export not supported" in capsys.readouterr().err


@pytest.mark.slow
def test_real_minilm_export(tmp_path):
    model, tok = load_model(resolve_source(str(REPO / "recipes" / "minilm_sst2.yaml"), []), 2)
    out = export_model(model, tmp_path / "minilm", tok)
    exp_packed, exp_file, written, size = _sizes(model, out / "model.safetensors")
    assert written == pytest.approx(exp_packed, rel=1e-3)  # 10764288 x 4.5 / 8 bytes
    assert size == pytest.approx(exp_file, rel=0.05)
    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    batch = _batch(tok)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
