"""Density report: bits per element per layer and whole model, vs fp32 and int8."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from qat.quant.density import density_report
from qat.quant.quantize import quantize_model


def bfp(width: int) -> dict:
    return {"format": "bfp", "width": width, "exponent_width": 8, "block_size": 16}


@pytest.fixture()
def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg).eval()


def test_w6_bfp_is_6_5_bits_and_4_9x(tiny_bert):
    quantize_model(tiny_bert, {"weight": bfp(6), "activation": bfp(6)})
    rep = density_report(tiny_bert)
    # 2 layers x (q, k, v, o, intermediate, output) + pooler; the classifier is excluded.
    assert len(rep.layers) == 13
    assert rep.quantized_bits_per_element == pytest.approx(6.5)
    d = rep.to_dict()["quantized_linears"]
    assert d["density_vs_fp32"] == pytest.approx(32 / 6.5)  # 4.92x
    assert d["density_vs_int8"] == pytest.approx(8 / 6.5)
    assert "4.92x vs fp32" in rep.format()
    # Whole model: quantised weights at 6.5 bits, every other parameter at 32 bits.
    quant = sum(
        m.weight.numel() for n, m in tiny_bert.named_modules() if hasattr(m, "weight_quantizer")
    )
    total = sum(p.numel() for p in tiny_bert.parameters())
    assert rep.quantized_params == quant and rep.total_params == total
    assert rep.total_bits == pytest.approx(6.5 * quant + 32 * (total - quant))


def test_per_layer_overrides_and_activation_bits(tiny_bert):
    quantize_model(
        tiny_bert,
        {
            "weight": bfp(4),
            "activation": bfp(8),
            "overrides": {r"output\.dense$": {"weight": bfp(6)}},
        },
    )
    rep = density_report(tiny_bert)
    bits = {x.name: x.weight_bits for x in rep.layers}
    assert bits["bert.encoder.layer.0.output.dense"] == 6.5
    assert bits["bert.encoder.layer.0.attention.self.query"] == 4.5
    assert all(x.activation_bits == 8.5 for x in rep.layers)


def test_float_model_is_32_bits(tiny_bert):
    rep = density_report(tiny_bert)
    assert rep.layers == [] and rep.quantized_params == 0
    assert rep.model_bits_per_element == 32
    assert rep.to_dict()["model"]["density_vs_fp32"] == pytest.approx(1.0)


def test_tied_embeddings_counted_once():
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    quantize_model(model, {"weight": bfp(4)})
    rep = density_report(model)
    assert rep.total_params == sum(p.numel() for p in model.parameters())
    assert rep.total_params < sum(p.numel() for p in model.state_dict().values())
