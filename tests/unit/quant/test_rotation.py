"""Block Hadamard rotations (quant.rotation): the matrix, float invariance on every tiny
architecture, what they buy a block format, training, export, QDEC, LoRA and bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny import ARCHS, tiny_batch, tiny_model, tiny_recipe
from transformers import AutoModelForSequenceClassification

import qat  # noqa: F401 - registers the qat_packed model type
from qat.formats import make_format
from qat.quant.config import QuantConfig, QuantConfigError
from qat.quant.modules import MatmulQuantizer, QuantLinear
from qat.quant.quantize import quantize_model
from qat.quant.rotation import Rotation, hadamard
from qat.quant.ste import FakeQuantizer

W4 = {"format": "bfp", "width": 4, "exponent_width": 8, "block_size": 8}


def _config(rotation, **extra):
    return {"weight": W4, "activation": W4, "matmul": W4, "rotation": rotation, **extra}


@pytest.mark.parametrize("n", [2, 4, 8, 16, 64, 128])
def test_hadamard_is_orthonormal_symmetric_and_plus_minus(n):
    h = hadamard(n, torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, h.T)
    assert torch.allclose(
        h.abs(), torch.full((n, n), n**-0.5, dtype=torch.float64), rtol=0, atol=1e-15
    )
    # Sylvester's order: row i, column j is (-1)^popcount(i & j)
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    parity = torch.tensor([bin(v).count("1") % 2 for v in (i & j).reshape(-1).tolist()])
    assert torch.equal(torch.sign(h).reshape(-1), (1 - 2 * parity).double())


def test_rotation_is_block_diagonal_along_the_given_dim():
    x = torch.randn(3, 16, 5)
    r = Rotation(8)
    y = r(x, dim=1)
    h = hadamard(8)
    expected = torch.cat(
        [torch.einsum("aib,ij->ajb", x[:, :8], h), torch.einsum("aib,ij->ajb", x[:, 8:], h)], dim=1
    )
    assert torch.allclose(y, expected, atol=1e-6)
    assert r(x.to(torch.bfloat16), dim=1).dtype == torch.bfloat16
    assert "matrix" not in r.state_dict()  # never saved: rebuilt from the quant config


@pytest.mark.parametrize("arch", ARCHS)
def test_rotation_alone_keeps_float_logits(arch):
    """Quantisers off, rotations on: every linear and Q @ K^T compute the float product."""
    float_model = tiny_model(arch).eval()
    model = quantize_model(copy.deepcopy(float_model), _config({"size": 8}))
    rotations = [m for m in model.modules() if isinstance(m, Rotation)]
    assert rotations, "no rotation attached"
    assert any(isinstance(m, MatmulQuantizer) and m.rotation is not None for m in model.modules())
    for m in model.modules():
        if isinstance(m, FakeQuantizer):
            m.enabled = False
    batch = tiny_batch()
    with torch.no_grad():
        ref = float_model(**batch).logits
        got = model(**batch).logits
    assert (got - ref).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rotated_quantisation_differs_from_unrotated(arch):
    batch = tiny_batch()
    outs = []
    for rot in (None, {"size": 8}):
        model = quantize_model(tiny_model(arch).eval(), _config(rot))
        with torch.no_grad():
            outs.append(model(**batch).logits)
    assert not torch.equal(outs[0], outs[1])


def test_rotation_spreads_an_outlier_and_lowers_bfp_error():
    """One outlier in a block of 16: unrotated, BFP W4 flushes the other 15 values to 0."""
    x = torch.full((1, 16), 0.01)
    x[0, 0] = 1.0
    fmt = make_format({"format": "bfp", "width": 4, "block_size": 16})
    plain = fmt.quantize(x)
    assert torch.equal(plain[0, 1:], torch.zeros(15))  # 0.01 * 2^3 rounds to 0
    r = Rotation(16)
    rotated = r(fmt.quantize(r(x)))  # H is its own inverse
    assert (rotated - x).pow(2).sum() < (plain - x).pow(2).sum() / 4


def test_size_block_takes_the_format_block_size():
    model = quantize_model(tiny_model("llama"), _config({"size": "block"}))
    sizes = {m.size for m in model.modules() if isinstance(m, Rotation)}
    assert sizes == {8}


def test_overrides_set_or_drop_a_rotation():
    cfg = _config(
        {"size": 8}, overrides={"mlp": {"rotation": {"size": 16}}, "self_attn$": {"rotation": None}}
    )
    model = quantize_model(tiny_model("llama"), cfg)
    layer = model.model.layers[0]
    assert layer.mlp.down_proj.rotation.size == 16  # in_features 64
    assert layer.self_attn.q_proj.rotation.size == 8
    assert layer.self_attn.qat_matmul.rotation is None
    assert QuantConfig.from_dict(cfg).to_dict()["rotation"] == {"size": 8}


def test_sibling_inputs_share_one_rotated_quantisation():
    model = quantize_model(tiny_model("llama"), _config({"size": 8}))
    attn = model.model.layers[0].self_attn
    shared = attn.q_proj.activation_quantizer.shared
    assert shared is not None and shared is attn.k_proj.activation_quantizer.shared
    x = torch.randn(2, 5, 32)
    q1 = attn.q_proj.activation_quantizer(x)
    assert attn.k_proj.activation_quantizer(x) is q1  # a cache hit
    assert torch.equal(q1, W4_FMT().quantize(Rotation(8)(x)))


def W4_FMT():  # noqa: N802 - a constant that is built on demand
    return make_format(W4)


def test_lora_quantises_the_rotated_effective_weight():
    from peft import get_peft_model

    from qat.quant.lora import make_lora_config

    model = quantize_model(tiny_model("llama"), _config({"size": 8}))
    peft = get_peft_model(model, make_lora_config(model, 4, 8, 0.0, ["q_proj"], None))
    layer = peft.base_model.model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    base = layer.get_base_layer()
    x = torch.randn(2, 3, 32)
    w_eff = layer.effective_weight()
    r = Rotation(8)
    expected = torch.nn.functional.linear(
        W4_FMT().quantize(r(x)), W4_FMT().quantize(r(w_eff)), base.bias
    )
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_rotated_qat_trains():
    torch.manual_seed(0)
    model = quantize_model(tiny_model("llama"), _config({"size": 8}))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = tiny_batch()
    losses = []
    for _ in range(15):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_export_of_a_rotated_model_gives_bit_equal_logits(tmp_path):
    from qat.export.packed import write_packed
    from qat.runs.build import build_model

    recipe = tiny_recipe(tmp_path)
    built = build_model(recipe, ["--quant", json.dumps(_config({"size": 8}))], num_labels=2)
    model, tok = built.model, built.tokenizer
    out = write_packed(model, tmp_path / "export", tok)
    packing = json.loads((out / "config.json").read_text())["qat_packing"]
    assert packing["quant"]["rotation"] == {"size": 8}
    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    dense = loaded.bert.encoder.layer[1].output.dense
    assert isinstance(dense, QuantLinear) and dense.rotation is not None
    assert dense.weight_quantizer.rotation is None  # stored rotated: not rotated again
    batch = tok(["a gripping, funny film", "flat"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_qdec_residual_is_taken_in_the_rotated_basis():
    from qat.quant.qdec.attach import weight_residual

    model = quantize_model(tiny_model("llama"), _config({"size": 8}))
    layer = model.model.layers[0].mlp.down_proj
    w = layer.weight.detach()
    wh = Rotation(8)(w)
    assert torch.equal(weight_residual(layer), wh - W4_FMT().quantize(wh))


@pytest.mark.parametrize(
    "rotation, match",
    [
        ({"kind": "givens"}, r"quant.rotation.kind must be one of hadamard; got 'givens'"),
        ({"size": 10}, r"quant.rotation.size 10 has no Hadamard matrix here; orders that work"),
        ({"size": True}, r"quant.rotation.size must be 'block' or an integer >= 2, got True"),
        ({"sise": 8}, r"unknown key quant.rotation.sise \(did you mean quant.rotation.size\?\)"),
        ("hadamard", r"quant.rotation must be a mapping"),
    ],
)
def test_bad_rotation_specs_are_refused_in_one_line(rotation, match):
    with pytest.raises(QuantConfigError, match=match):
        QuantConfig.from_dict(_config(rotation))


def test_a_size_that_does_not_divide_names_the_layer():
    with pytest.raises(
        QuantConfigError,
        match=r"quant.rotation.size 16 does not divide the "
        r"head_dim of Q and K \(8\) of module 'model.layers.0.self_attn'",
    ):
        quantize_model(tiny_model("llama"), _config({"size": 16}))
    with pytest.raises(
        QuantConfigError,
        match=r"size 128 does not divide the input features "
        r"\(32\) of module 'model.layers.0.self_attn.q_proj'",
    ):
        quantize_model(tiny_model("llama"), _config({"size": 128}, matmul=None))


def test_cli_refuses_an_unknown_rotation_kind_before_loading(tmp_path, capsys, no_model):
    from qat.cli.train import main

    recipe = tiny_recipe(tmp_path)
    assert main([recipe, "--quant.rotation", '{"kind": "fft", "size": 8}']) == 2
    assert "quant.rotation.kind must be one of hadamard; got 'fft'" in capsys.readouterr().err


def test_cli_refuses_a_size_that_does_not_divide_before_loading(tmp_path, capsys, no_model):
    """The layer check runs on a weightless (meta) skeleton of the model's config."""
    from qat.cli.train import main

    recipe = tiny_recipe(tmp_path)
    assert main([recipe, "--quant.rotation", '{"size": 64}']) == 2
    err = capsys.readouterr().err
    assert (
        "quant.rotation.size 64 does not divide the head_dim of Q and K (16) of module "
        "'bert.encoder.layer.0.attention.self'" in err
    )
    assert main([recipe, "--quant.rotation", '{"size": 64}', "--quant.matmul", "null"]) == 2
    assert (
        "quant.rotation.size 64 does not divide the input features (32) of module "
        "'bert.encoder.layer.0.attention.self.query'" in capsys.readouterr().err
    )


def test_distillation_teacher_of_a_rotated_student_is_the_float_model():
    """The teachers switch the quantisers off (qat.training.teacher.quantizers_off): with a
    rotation the layer still rotates both operands, so the teacher stays the float model."""
    from qat.training.teacher import quantizers_off

    float_model = tiny_model("llama").eval()
    student = quantize_model(copy.deepcopy(float_model), _config({"size": 8})).eval()
    batch = tiny_batch()
    with torch.no_grad(), quantizers_off(student):
        teacher = student(**batch).logits
    with torch.no_grad():
        assert (teacher - float_model(**batch).logits).abs().max() < 1e-5
        assert not torch.allclose(student(**batch).logits, teacher, atol=1e-3)
