"""quantize_model on tiny OPT, Llama, BERT and GPT-2: what gets quantised, and that it matters."""

import pytest
import torch
from tiny import ARCHS, tiny_batch, tiny_model
from tiny import BFP4 as W4

from qat import QuantConfig, QuantConfigError, quantization_summary, quantize_model
from qat.errors import UsageError
from qat.quant.modules import MatmulQuantizer, QuantConv1D, QuantLinear
from qat.runs.recipe.arguments import LoraArguments
from qat.training.finetune import prepare_finetuning


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_float_quant_config_is_exact_and_heads_stay_float(arch):
    model = tiny_model(arch)
    batch = tiny_batch()
    ref = logits(model, batch)
    quantize_model(model, QuantConfig(weight=W4, activation=W4, matmul=W4))
    quantized = {n for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv1D))}
    assert quantized and not any(n.startswith(("score", "classifier")) for n in quantized)
    assert quantization_summary(model)["quantized_attention"] == 2
    # switching every quantiser off gives back the float model bit for bit (our attention
    # function equals eager attention)
    for m in model.modules():
        if hasattr(m, "enabled"):
            m.enabled = False
    assert torch.allclose(logits(model, batch), ref, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_matmul_format_changes_logits(arch):
    batch = tiny_batch()
    outs = {}
    for name, matmul in [("float", None), ("w4", W4), ("w3", {**W4, "width": 3})]:
        model = tiny_model(arch)
        quantize_model(model, QuantConfig(weight=None, activation=None, matmul=matmul))
        outs[name] = logits(model, batch)
    assert not torch.allclose(outs["float"], outs["w4"], atol=1e-5)
    assert not torch.allclose(outs["w4"], outs["w3"], atol=1e-5)


def test_v_block_axis_seq_differs_from_head_dim():
    batch = tiny_batch()
    outs = []
    for axis in ("head_dim", "seq"):
        model = tiny_model("opt")
        quantize_model(model, QuantConfig(matmul={**W4, "block_size": 4}, v_block_axis=axis))
        assert model.model.decoder.layers[0].self_attn.qat_matmul.v.dim == (
            -1 if axis == "head_dim" else -2
        )
        outs.append(logits(model, batch))
    assert not torch.allclose(outs[0], outs[1])


def test_overrides_and_exclude():
    model = tiny_model("opt")
    cfg = QuantConfig(
        weight=W4,
        activation=W4,
        matmul=W4,
        overrides={r".*fc2": {"weight": {"width": 6}}, r"layers\.1\.self_attn$": {"matmul": None}},
        exclude=["score", r"layers\.0\.fc1"],
    )
    quantize_model(model, cfg)
    layer0, layer1 = model.model.decoder.layers
    assert layer0.fc2.weight_quantizer.fmt.width == 6
    assert layer0.fc2.activation_quantizer.fmt.width == 4
    assert not isinstance(layer0.fc1, QuantLinear)
    assert isinstance(layer0.self_attn.qat_matmul, MatmulQuantizer)
    assert not hasattr(layer1.self_attn, "qat_matmul")
    assert model.config.qat_quant["overrides"][r".*fc2"] == {"weight": {"width": 6}}


def test_override_matching_nothing_is_an_error():
    with pytest.raises(QuantConfigError, match="nonexistent"):
        quantize_model(
            tiny_model("opt"),
            QuantConfig(weight=W4, overrides={"nonexistent": {"weight": {"width": 6}}}),
        )


def test_quantize_twice_is_refused():
    model = quantize_model(tiny_model("bert"), QuantConfig(weight=W4))
    with pytest.raises(UsageError, match="already quantised"):
        quantize_model(model, QuantConfig(weight=W4))


@pytest.mark.parametrize("arch", ARCHS)
def test_full_mode_every_quantised_weight_gets_gradient(arch):
    model = tiny_model(arch)
    quantize_model(model, QuantConfig(weight=W4, activation=W4, matmul=W4))
    model = prepare_finetuning(model, "full")
    model.train()
    model(**tiny_batch()).loss.backward()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv1D))]
    assert layers
    for name, m in layers:
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0, name


def test_weights_requantised_every_forward_and_never_in_place():
    model = tiny_model("opt")
    quantize_model(model, QuantConfig(weight=W4))
    fc1 = model.model.decoder.layers[0].fc1
    before = fc1.weight.detach().clone()
    batch = tiny_batch()
    out1 = logits(model, batch)
    assert torch.equal(fc1.weight, before)  # the float master weight is untouched
    with torch.no_grad():
        fc1.weight.mul_(1.7)
    assert not torch.allclose(logits(model, batch), out1)


@pytest.mark.parametrize("arch", ["bert", "opt"])
def test_classifier_mode_changes_only_head(arch):
    model = tiny_model(arch)
    quantize_model(model, QuantConfig(weight=W4, activation=W4, matmul=W4))
    model = prepare_finetuning(model, "classifier")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(**tiny_batch()).loss.backward()
        opt.step()
    head = "classifier" if arch == "bert" else "score"
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == n.startswith(head + "."), n


@pytest.mark.parametrize("arch", ["opt", "llama", "gpt2"])
def test_lora_quantises_effective_weight_and_merges_exactly(arch):
    model = tiny_model(arch)
    quantize_model(model, QuantConfig(weight=W4, activation=W4, matmul=W4))
    model = prepare_finetuning(model, "lora", LoraArguments(r=4, alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any(("score" in n) for n in trainable)
    assert not any(n.endswith("base_layer.weight") for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(**tiny_batch()).loss.backward()
        opt.step()
    batch = tiny_batch(seed=1)
    unmerged = logits(model, batch)
    merged = model.merge_and_unload()
    assert torch.equal(logits(merged, batch), unmerged)
    # and the adapters mattered
    assert not torch.allclose(logits(tiny_model(arch), batch), unmerged, atol=1e-4)


def test_lora_dropout_is_rejected():
    from qat.runs.recipe.sections import build_lora
    from qat.runs.recipe.text import RecipeError

    with pytest.raises(RecipeError, match="lora.dropout"):
        build_lora({"dropout": 0.1})
