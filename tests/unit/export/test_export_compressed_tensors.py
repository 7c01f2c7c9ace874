"""``--to compressed-tensors``: a tiny Llama written as nvfp4/mxfp4-pack-quantized and loaded back
through transformers' compressed-tensors quantizer (its ModelCompressor decompresses with the
format's own compressor) equals qat's fake-quantised weights bit for bit."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from tiny import lm_recipe, make_tiny_causal_lm_dir

from qat import QuantConfig, export_model, quantize_model
from qat.errors import ExportError
from qat.export.compressed_tensors import write_compressed_tensors
from qat.formats import make_format
from qat.quant.modules import QuantLinear

pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")


def _model(tmp_path, weight: str | None, act: str | None = None, **quant):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        make_tiny_causal_lm_dir(tmp_path), torch_dtype=torch.bfloat16
    )
    spec = {"weight": weight and {"format": weight}, "activation": act and {"format": act}, **quant}
    quantize_model(model, QuantConfig(**spec))
    return model


def _decompressed(out, act_scales: bool):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model, info = AutoModelForCausalLM.from_pretrained(
        out,
        quantization_config=CompressedTensorsConfig(run_compressed=False),
        output_loading_info=True,
    )
    # Every tensor name and shape as the loader expects; a loader that dequantises to a float
    # model drops activation quantisation, so it has no use for input_global_scale.
    unexpected = info.pop("unexpected_keys")
    assert all(k.endswith(".input_global_scale") for k in unexpected) and (
        bool(unexpected) == act_scales
    )
    assert not any(info.values()), info
    return model.state_dict()


def _ct_expects_input_global_scale(out) -> bool:
    """Whether compressed-tensors' own initialisation of this config (what a runtime loader
    does before reading the checkpoint) registers ``input_global_scale`` on a linear."""
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(out)
    qcfg = QuantizationConfig.model_validate(config.quantization_config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    apply_quantization_config(model, qcfg)
    return hasattr(model.model.layers[0].self_attn.q_proj, "input_global_scale")


@pytest.mark.parametrize(
    "fmt,act", [("nvfp4", None), ("mxfp4", None), ("mxfp4", "mxfp4"), ("nvfp4", "nvfp4")]
)
def test_decompressed_weights_equal_qat_quantised_weights(tmp_path, fmt, act):
    model = _model(tmp_path, fmt, act)
    linears = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear) and m.weight_quantizer is not None
    }
    amax = {n: 3.0 for n in linears} if act == "nvfp4" else None
    out = write_compressed_tensors(model, tmp_path / "ct", input_amax=amax)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == f"{fmt}-pack-quantized" and cfg["ignore"] == ["lm_head"]
    group = cfg["config_groups"]["group_0"]
    assert (group["input_activations"] is None) == (act is None)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        name = "model.layers.0.mlp.down_proj"
        assert f.get_tensor(f"{name}.weight_packed").dtype == torch.uint8
        assert f.get_tensor(f"{name}.weight_packed").shape == (32, 32)  # [out, in / 2]
        scale = f.get_tensor(f"{name}.weight_scale")
        assert scale.dtype == (torch.float8_e4m3fn if fmt == "nvfp4" else torch.uint8)
        assert scale.shape == (32, 64 // (16 if fmt == "nvfp4" else 32))
        keys = set(f.keys())
    assert (f"{name}.weight_global_scale" in keys) == (fmt == "nvfp4")
    assert (f"{name}.input_global_scale" in keys) == (act == "nvfp4")
    if act == "nvfp4":
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert f.get_tensor(f"{name}.input_global_scale").tolist() == [2688 / 3.0]
    assert _ct_expects_input_global_scale(out) == (act == "nvfp4")
    state = _decompressed(out, act == "nvfp4")
    for n, m in linears.items():
        want = m.quantized_weight().detach()
        got = state[f"{n}.weight"]
        assert got.dtype == want.dtype == torch.bfloat16
        # Bits, with -0 read as +0 (the checkpoint has one code for zero, as vLLM's).
        assert torch.equal((got + 0.0).view(torch.int16), (want + 0.0).view(torch.int16)), n
    assert torch.equal(state["lm_head.weight"], model.lm_head.weight)


@pytest.mark.parametrize(
    "quant,match",
    [
        ({"weight": {"format": "int", "width": 4}}, "nvfp4.*mxfp4"),
        ({"weight": {"format": "mxfp4", "block_size": 16}}, "mxfp4 with block_size 32"),
        (
            {"weight": {"format": "nvfp4"}, "activation": {"format": "mxfp4"}},
            "nvfp4 activations .* or float",
        ),
        ({"weight": {"format": "mxfp4"}, "matmul": {"format": "mxfp4"}}, "quant.matmul"),
    ],
)
def test_formats_vllm_cannot_run_fail_clearly(tmp_path, quant, match):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_causal_lm_dir(tmp_path))
    quantize_model(model, QuantConfig(**quant))
    with pytest.raises(ExportError, match=match):
        export_model(model, tmp_path / "ct", to="compressed-tensors")
    assert not (tmp_path / "ct").exists()


def test_nvfp4_activations_need_a_calibrated_range(tmp_path):
    model = _model(tmp_path, "nvfp4", "nvfp4")
    with pytest.raises(ExportError, match="input_global_scale"):
        write_compressed_tensors(model, tmp_path / "ct")


def test_export_command_calibrates_nvfp4_activations(tmp_path, capsys):
    from qat.cli.export import main

    recipe = lm_recipe(
        tmp_path,
        quant={
            "weight": {"format": "nvfp4"},
            "activation": {"format": "nvfp4"},
            "exclude": ["lm_head"],
        },
    )
    out = tmp_path / "ct"
    assert (
        main(
            [recipe, "--to", "compressed-tensors", "--out", str(out), "--calibration_samples", "4"]
        )
        == 0
    )
    assert "model.safetensors" in capsys.readouterr().out
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        g = f.get_tensor("model.layers.0.self_attn.q_proj.input_global_scale")
    assert g.dtype == torch.float32 and g.shape == (1,) and 0 < g.item() < 2688 / 1e-3


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--to", "onnx"], "--to must be one of packed, compressed-tensors, gguf; got 'onnx'"),
        (["--to", "compressed-tensors"], "has no compressed-tensors type; formats with one: nvfp4"),
        (
            ["--to", "compressed-tensors", "--quant.weight", "{format: mxfp4}"],
            "vLLM runs mxfp4 weights with mxfp4 activations",
        ),
    ],
)
def test_bad_export_target_is_one_line_before_loading(tmp_path, capsys, no_model, argv, match):
    from qat.cli.export import main

    recipe = lm_recipe(tmp_path)  # W4A4 BFP
    capsys.readouterr()  # the tiny model's own save messages
    assert main([recipe, "--out", str(tmp_path / "ct"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1


NVFP4_W4A4 = {
    "weight": {"format": "nvfp4"},
    "activation": {"format": "nvfp4"},
    "exclude": ["lm_head"],
}


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--to", "compressed-tensors", "--calibration_samples", "0"], "must be >= 1, got 0"),
        (["--to", "compressed-tensors", "--calibration_samples", "-3"], "must be >= 1, got -3"),
        (
            ["--calibration_samples", "4"],
            "--calibration_samples applies to --to compressed-tensors",
        ),
        (
            ["--to", "gguf", "--calibration_samples", "4"],
            "applies to --to compressed-tensors, not gguf",
        ),
        (["--gguf_embeddings", "f32"], "--gguf_embeddings applies to --to gguf, not packed"),
        (["--to", "gguf", "--gguf_embeddings", ""], "--gguf_embeddings must be one of f16"),
    ],
)
def test_export_options_are_checked_before_loading(tmp_path, capsys, no_model, argv, match):
    """A calibration count of 0 is not the default 32, a negative one is named before anything
    loads, and an option of another target is refused rather than ignored."""
    from qat.cli.export import main

    recipe = lm_recipe(tmp_path, quant=NVFP4_W4A4)
    capsys.readouterr()
    assert main([recipe, "--out", str(tmp_path / "ct"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "ct").exists()


def test_mse_weights_with_plain_mxfp4_activations_export_and_decompress_exactly(tmp_path):
    """``scale: mse`` chooses a weight's scales; its codes are stored, so vLLM runs exactly
    them: with plain mxfp4 activations (what vLLM runs) the pair is the mxfp4 scheme."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        make_tiny_causal_lm_dir(tmp_path), torch_dtype=torch.bfloat16
    )
    mse = {"format": "mxfp4", "scale": "mse"}
    quantize_model(model, QuantConfig(weight=mse, activation={"format": "mxfp4"}))
    out = export_model(model, tmp_path / "ct", to="compressed-tensors").out
    group = json.loads((out / "config.json").read_text())["quantization_config"]
    assert group["config_groups"]["group_0"]["input_activations"]["strategy"] == "group"
    state = _decompressed(out, False)
    down = model.model.layers[0].mlp.down_proj
    want = down.quantized_weight().detach()
    assert not torch.equal(want, make_format({"format": "mxfp4"}).quantize(down.weight.detach()))
    got = state["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal((got + 0.0).view(torch.int16), (want + 0.0).view(torch.int16))


@pytest.mark.parametrize(
    "weight,activation,match",
    [
        ("{format: mxfp4, scale: mse}", "{format: mxfp4, scale: mse}", "the max scale rule"),
        ("{format: mxfp4}", "{format: mxfp4, scale: mse}", "the max scale rule"),
        ("{format: mxfp4}", "{format: mxfp4, block_size: 16}", "with mxfp4 activations (W4A4)"),
    ],
)
def test_activations_vllm_quantises_otherwise_are_refused_before_loading(
    tmp_path, capsys, no_model, weight, activation, match
):
    """vLLM quantises a layer's input itself, by the max rule: an ``mse`` activation (even
    beside an equal ``mse`` weight) or another block is refused in one line."""
    from qat.cli.export import main

    recipe = lm_recipe(tmp_path)
    capsys.readouterr()
    quant = ["--quant.matmul", "null", "--quant.weight", weight, "--quant.activation", activation]
    argv = ["--to", "compressed-tensors", *quant]
    assert main([recipe, "--out", str(tmp_path / "ct"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err


_DEFAULT_LOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])  # transformers' defaults, no qat
with torch.no_grad():
    logits = model(torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])).logits
print(json.dumps({"qat": "qat" in sys.modules, "dtype": str(model.dtype),
                  "finite": bool(torch.isfinite(logits).all()), "last": logits[0, -1].tolist()}))
"""


def test_a_float32_model_exports_what_the_default_loader_runs_without_qat(tmp_path):
    """A float32 model's export is written in bfloat16 (the dtype compressed-tensors decompresses
    fp4 weights to): ``AutoModelForCausalLM.from_pretrained(dir)`` and a forward work in a fresh
    interpreter that never imports qat, and give the logits of qat's model run in bfloat16."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_causal_lm_dir(tmp_path))
    assert model.dtype == torch.float32
    quantize_model(model, QuantConfig(weight={"format": "mxfp4"}))
    out = export_model(model, tmp_path / "ct", to="compressed-tensors").out
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", _DEFAULT_LOAD, str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["dtype"] == "torch.bfloat16" and got["finite"] and not got["qat"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with torch.no_grad():
        ref = model.to(torch.bfloat16)(torch.tensor([[101, 2023, 2003, 1037, 3231, 102]]))
    want = ref.logits[0, -1].float()
    assert torch.allclose(torch.tensor(got["last"]), want, atol=0.05 * want.abs().max().item())


def test_a_quantised_tied_head_is_untied_in_the_config(tmp_path):
    """A tied lm_head quantised with the rest is its own packed tensor: the config says
    tie_word_embeddings false (vLLM's loader skips lm_head.* of a tied model), and the
    loaded head is qat's quantised one while the embeddings stay float."""
    from transformers import AutoModelForCausalLM

    tied = make_tiny_causal_lm_dir(tmp_path, tied=True)
    model = AutoModelForCausalLM.from_pretrained(tied, torch_dtype=torch.bfloat16)
    quantize_model(model, QuantConfig(weight={"format": "mxfp4"}, exclude=[]))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = export_model(model, tmp_path / "ct", to="compressed-tensors").out
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert "lm_head" not in config["quantization_config"]["ignore"]
    state = _decompressed(out, False)
    want = model.lm_head.quantized_weight().detach()
    got = state["lm_head.weight"]
    assert torch.equal((got + 0.0).view(torch.int16), (want + 0.0).view(torch.int16))
    assert torch.equal(state["model.embed_tokens.weight"], model.model.embed_tokens.weight)
