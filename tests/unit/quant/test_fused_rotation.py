"""Fused rotations (``quant.rotation: {residual, heads, online}``): every Hadamard order is
orthonormal; the fused float model equals the original on every architecture it fits (a
non-power-of-two width too); what it buys a block format; run folders rebuild the same model;
fused-only models export like any model; bad input is one line before loading."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import transformers
from tiny import _copy_tokenizer, lm_recipe, tiny_model, tiny_recipe

from qat.quant.modules import MatmulQuantizer, QuantLinear
from qat.quant.quantize import quantize_model
from qat.quant.ste import FakeQuantizer
from qat.quant.transforms import fuse as fuse_mod
from qat.quant.transforms.fuse import MARK, fuse_rotation
from qat.quant.transforms.hadamard import (
    SUPPORTED_ORDERS_TEXT,
    hadamard_matrix,
    hadamard_order_supported,
    random_orthogonal,
)
from qat.quant.transforms.layout import FuseError

W4 = {"format": "bfp", "width": 4, "exponent_width": 8, "block_size": 16}
R1R2 = {"residual": "hadamard", "heads": "hadamard"}  # the recipe form
FULL = {"kind": "hadamard", "size": "full"}
FUSED = {"residual": FULL, "heads": FULL, "seed": 0}  # normalised (check_rotation_spec)
ORDERS = [n for n in range(2, 257) if hadamard_order_supported(n)] + [576, 1536, 1792]


@pytest.mark.parametrize("n", ORDERS)
def test_every_supported_hadamard_order_is_orthonormal(n):
    h = hadamard_matrix(n, torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    # a Hadamard matrix: every entry +-1 / sqrt(n)
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5), rtol=0, atol=1e-15)


def test_the_orders_are_the_paley_ones_and_the_rest_are_named():
    """Paley I gives p + 1 (p = 3 mod 4), Paley II 2(p + 1) (p = 1 mod 4), times 2^k: 12
    (11), 20 (19), 28 (13), 36 (17); 52 needs p = 51 or 25, neither prime, and 100 likewise."""
    assert [n for n in (12, 20, 28, 36, 44, 52, 100, 576) if hadamard_order_supported(n)] == [
        12,
        20,
        28,
        36,
        44,
        576,
    ]
    assert "2^k x m for a Paley order m (m = 12, 20, 28, 36, 44" in SUPPORTED_ORDERS_TEXT
    with pytest.raises(ValueError, match="no Hadamard matrix of order 52"):
        hadamard_matrix(52)


def test_random_orthogonal_is_seeded_and_orthonormal():
    a, b = random_orthogonal(52, 3), random_orthogonal(52, 3)
    assert torch.equal(a, b) and not torch.equal(a, random_orthogonal(52, 4))
    assert torch.allclose(a @ a.T, torch.eye(52, dtype=torch.float64), atol=1e-12)


# --- the fused float model equals the original -------------------------------------------


def _lm(arch: str, **dims):
    torch.manual_seed(0)
    if arch in ("llama", "qwen2"):
        cls = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
        cfg = cls(
            vocab_size=64,
            hidden_size=dims.get("hidden", 32),
            intermediate_size=dims.get("ffn", 64),
            num_hidden_layers=2,
            num_attention_heads=dims.get("heads", 4),
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
        return transformers.AutoModelForCausalLM.from_config(cfg)
    cfg = transformers.OPTConfig(
        vocab_size=64,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=dims.get("proj", 32),
    )
    return transformers.OPTForCausalLM(cfg)


def _randomise_norms(model):
    """Norm weights far from 1 and LayerNorm shifts far from 0, so folding them matters."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if "Norm" in type(m).__name__ and getattr(m, "weight", None) is not None:
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            if getattr(m, "bias", None) is not None:
                m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.5
    return model.eval()


MODELS = {
    "llama": lambda: _lm("llama"),
    "llama-48": lambda: _lm("llama", hidden=48, ffn=96),  # 48 = 12 x 4, head_dim 12
    "qwen2-bias": lambda: _lm("qwen2"),
    "opt": lambda: _lm("opt"),
    "opt-project": lambda: _lm("opt", proj=16),
    "llama-classifier": lambda: tiny_model("llama"),
    "opt-classifier": lambda: tiny_model("opt"),
}


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("kind", ["hadamard", "random_hadamard", "random"])
def test_fused_float_model_equals_the_original(name, kind):
    model = _randomise_norms(MODELS[name]())
    ids = torch.randint(2, 60, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
        fused = copy.deepcopy(model)
        part = {"kind": kind, "size": "full"}
        fuse_rotation(fused, {"residual": part, "heads": part, "seed": 5, "learned": None})
        got = fused(ids).logits
    assert _rel(got, ref) < 1e-4
    # and the weights really moved: norms weight-free, embeddings rotated
    norms = [m for m in fused.modules() if "Norm" in type(m).__name__]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    emb = fused.get_input_embeddings().weight
    if name != "opt-project":  # there the token embedding is not on the stream
        assert not torch.allclose(emb, model.get_input_embeddings().weight, atol=1e-2)
    assert getattr(fused.config, MARK)["residual"] == part


def test_layernorm_models_need_a_rotation_that_fixes_the_ones_vector(monkeypatch):
    """The check above is not blind: LayerNorm subtracts the mean, which commutes with the
    rotation only when it maps the ones vector to itself; a plain Hadamard does not."""
    model = _randomise_norms(_lm("opt"))
    ids = torch.randint(2, 60, (2, 12), generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(fuse_mod, "fixing_ones", lambda r: r)
    with torch.no_grad():
        ref = model(ids).logits
        fuse_rotation(model, FUSED)
        assert _rel(model(ids).logits, ref) > 1e-2


def test_online_parts_go_where_a_rotation_cannot_be_fused_and_keep_the_float_function():
    model = _randomise_norms(_lm("llama", hidden=48, ffn=96))
    ids = torch.randint(2, 60, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    spec = {"weight": W4, "activation": W4, "matmul": {**W4, "block_size": 12}}
    q = quantize_model(model, {**spec, "rotation": {**R1R2, "online": {"size": "full"}}})
    layer = q.model.layers[0]
    assert layer.mlp.down_proj.rotation.size == 96  # 96 = 12 x 8, the whole MLP width
    assert layer.self_attn.qat_matmul.rotation.size == 12  # Q and K along head_dim
    assert layer.mlp.up_proj.rotation is None and layer.self_attn.o_proj.rotation is None
    for m in q.modules():
        if isinstance(m, FakeQuantizer):
            m.enabled = False
    with torch.no_grad():
        assert _rel(q(ids).logits, ref) < 1e-4


def _outlier_llama():
    """A tiny Llama whose residual stream carries two channels 30x the rest (what rotations
    are for): W4A4's activation blocks lose the small channels to the outliers' scale."""
    model = _lm("llama", hidden=64, ffn=128).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :2] *= 30
    return model


def test_fused_rotation_lowers_w4a4_error_on_a_stream_with_outliers():
    ids = torch.randint(2, 60, (4, 32), generator=torch.Generator().manual_seed(3))
    w4a4 = {"weight": W4, "activation": W4}
    errors = {}
    with torch.no_grad():
        ref = _outlier_llama()(ids).logits
        for name, rot in (("plain", None), ("fused", R1R2)):
            q = quantize_model(_outlier_llama(), {**w4a4, "rotation": rot})
            errors[name] = (q(ids).logits - ref).pow(2).mean().item()
    assert errors["fused"] < 0.7 * errors["plain"], errors  # measured: 0.56


# --- run folders: the fused weights are saved, marked, never fused twice -------------------


def test_a_fused_run_folder_rebuilds_the_trained_model(tmp_path):
    from qat.cli.perplexity import main as perplexity_main
    from qat.cli.train import main as train_main

    quant = {"weight": {**W4}, "activation": {**W4}, "matmul": {**W4}, "exclude": ["lm_head"]}
    quant["rotation"] = {**R1R2, "online": {"size": 16}}  # copies: no YAML aliases
    recipe = lm_recipe(
        tmp_path, quant=quant, max_steps=3, max_eval_samples=5, do_train=True, do_eval=True
    )
    assert train_main([recipe]) == 0
    run = tmp_path / "out"
    config = json.loads((run / "config.json").read_text())
    assert config[MARK] == {**FUSED, "folded": True}
    assert config["tie_word_embeddings"] is False  # lm_head reads the rotated stream itself
    ev = json.loads((run / "eval_results.json").read_text())
    assert perplexity_main([str(run), "--chunk_size", "32", "--max_chunks", "5"]) == 0
    ppl = json.loads((run / "perplexity.json").read_text())
    # fused twice, the quantised model (not its float function) would differ
    assert ev["eval_loss"] == pytest.approx(ppl["mean_loss"], rel=1e-5)


def test_a_model_fused_otherwise_is_refused():
    model = _lm("llama")
    fuse_rotation(model, FUSED)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fuse_rotation(model, FUSED)  # the same fusion again: nothing happens
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(FuseError, match="already fused with .* cannot be fused again"):
        fuse_rotation(model, {"residual": {"kind": "random", "size": "full"}, "heads": None})


# --- exports --------------------------------------------------------------------------------


def test_fused_model_exports_to_gguf_as_an_ordinary_model(tmp_path):
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    from qat.cli.export import main as export_main

    quant = {
        "weight": {"format": "ggml_q4_0"},
        "activation": {"format": "ggml_q8_0"},
        "exclude": ["lm_head"],
        "rotation": R1R2,
    }
    recipe = lm_recipe(tmp_path, quant=quant)
    out = tmp_path / "g"
    assert export_main([recipe, "--to", "gguf", "--out", str(out), "--gguf_embeddings", "f32"]) == 0
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    tensors = {
        t.name: quants.dequantize(t.data, t.tensor_type).reshape(
            [int(d) for d in reversed(t.shape)]
        )
        for t in reader.tensors
    }
    from qat.runs.build import build_model

    model = build_model(recipe, head="causal_lm").model
    assert "output.weight" in tensors  # untied: the head reads the rotated stream
    emb = model.model.embed_tokens.weight.detach().numpy()
    assert (tensors["token_embd.weight"] == emb).all()
    assert (tensors["blk.0.attn_norm.weight"] == 1).all()


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
def test_fused_model_exports_to_compressed_tensors_and_decompresses_to_the_same_logits(tmp_path):
    """The vLLM export of a fused MXFP4 model, loaded back through transformers'
    compressed-tensors quantizer: its linears are qat's quantised fused weights bit for bit,
    and it computes qat's model up to the bfloat16 rounding of the other tensors."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from qat import export_model

    model = _lm("llama", hidden=64, ffn=128)
    quantize_model(model, {"weight": {"format": "mxfp4"}, "rotation": R1R2})
    out = export_model(model, tmp_path / "ct", to="compressed-tensors").out
    loaded = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(run_compressed=False)
    ).eval()
    ids = torch.randint(2, 60, (2, 12), generator=torch.Generator().manual_seed(2))
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 14  # 2 layers x 7
    for name, m in linears:  # the fused weights as qat quantises them, exact in bfloat16
        want = m.weight_quantizer.fmt.quantize(m.weight.detach())
        assert torch.equal(loaded.get_submodule(name).weight.float(), want), name
    with torch.no_grad():  # the rest is written in bfloat16: logits agree to its rounding
        want, got = model.eval()(ids).logits, loaded.float()(ids).logits
    assert _rel(got, want) < 1e-2
    assert not loaded.config.tie_word_embeddings


@pytest.mark.parametrize("target", ["gguf", "compressed-tensors"])
def test_online_parts_are_refused_by_engine_exports_before_loading(
    tmp_path, capsys, no_model, target
):
    from qat.cli.export import main as export_main

    recipe = lm_recipe(tmp_path)
    rotation = "rotation: {residual: hadamard, online: {size: 16}}"
    quant = f"{{weight: {{format: ggml_q4_0}}, activation: {{format: ggml_q8_0}}, {rotation}}}"
    if target != "gguf":
        quant = f"{{weight: {{format: mxfp4}}, {rotation}}}"
    capsys.readouterr()
    assert (
        export_main([recipe, "--to", target, "--out", str(tmp_path / "x"), "--quant", quant]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not rotate a layer's input" in err[0]


# --- bad input: one line, exit 2, before any model loads -----------------------------------


def _llama_dir(tmp_path, hidden: int, heads: int):
    out = tmp_path / f"llama-{hidden}"
    cfg = transformers.LlamaConfig(
        vocab_size=30522,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=1,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    _copy_tokenizer(out)
    return str(out)


@pytest.mark.parametrize(
    "rotation, match",
    [
        (
            {"residual": "hadamrd"},
            "quant.rotation.residual must be one of hadamard, random_hadamard, random; "
            "got 'hadamrd'",
        ),
        (
            {"resid": "hadamard"},
            "unknown key quant.rotation.resid (did you mean quant.rotation.residual?)",
        ),
        (
            {"residual": "hadamard", "size": 16},
            "quant.rotation.size belongs to the online block rotation",
        ),
        (
            {"residual": "hadamard", "online": {"size": 10}},
            "quant.rotation.online.size 10 has no Hadamard matrix here",
        ),
        ({"heads": None, "seed": 1}, "quant.rotation rotates nothing"),
    ],
)
def test_bad_fused_specs_are_one_line(tmp_path, capsys, no_model, rotation, match):
    from qat.cli.train import main

    recipe = lm_recipe(tmp_path)
    assert main([recipe, "--quant.rotation", json.dumps(rotation)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("qat train")]
    assert len(err) == 1 and match in err[0], err


def test_post_norm_models_are_refused_before_loading(tmp_path, capsys, no_model):
    from qat.cli.train import main

    recipe = tiny_recipe(tmp_path)  # BERT
    assert main([recipe, "--quant.rotation", json.dumps(R1R2)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("qat train")]
    assert len(err) == 1
    assert "bert is a post-norm model (LayerNorm after the residual add)" in err[0]


def test_a_width_with_no_known_hadamard_is_refused_before_loading(tmp_path, capsys, no_model):
    from qat.cli.train import main

    model_dir = _llama_dir(tmp_path, hidden=52, heads=2)  # 52 = 4 x 13: no Paley order here
    recipe = lm_recipe(tmp_path, model_name_or_path=model_dir)
    assert main([recipe, "--quant.rotation", json.dumps(R1R2)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("qat train")]
    assert len(err) == 1
    assert "quant.rotation.residual: hadamard needs a Hadamard matrix of order 52" in err[0]
    assert "use random" in err[0]


def test_random_fuses_a_width_with_no_hadamard(tmp_path):
    model_dir = _llama_dir(tmp_path, hidden=52, heads=2)
    model = _randomise_norms(transformers.AutoModelForCausalLM.from_pretrained(model_dir))
    ids = torch.randint(2, 1000, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
        part = {"kind": "random", "size": "full"}
        fuse_rotation(model, {"residual": part, "heads": part, "seed": 1})
        assert _rel(model(ids).logits, ref) < 1e-4
    assert math.isfinite(ref.abs().max().item())
    assert not any(isinstance(m, (QuantLinear, MatmulQuantizer)) for m in model.modules())
