"""QDEC dynamic error compensation: the compensated layer's algebra, channel selection, the
residual quantiser, save / reload, the commands and their bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import BFP4, make_tiny_causal_lm_dir, tiny_model, tiny_recipe
from torch import nn

from qat.cli.generate import main as generate_main
from qat.cli.perplexity import main as perplexity_main
from qat.quant.qdec import attach as qdec_attach
from qat.quant.qdec.apply import apply_qdec
from qat.quant.qdec.attach import (
    attach_qdec,
    detach_qdec,
    enable_qdec,
    set_k_chunk,
    weight_residual,
)
from qat.quant.qdec.config import QDECConfig, QDECError
from qat.quant.qdec.files import load_qdec, save_qdec
from qat.quant.qdec.residual import (
    QDECState,
    k_for,
    pack_nibbles,
    quantize_residual,
    select_channels,
    unpack_nibbles,
)
from qat.quant.quantize import quantize_model
from qat.runs.recipe.load import load_recipe
from qat.runs.recipe.text import RecipeError

BFP3 = {"format": "bfp", "width": 3, "exponent_width": 8, "block_size": 16}


def _layer(d_in: int = 64, d_out: int = 24, activation: dict | None = None) -> nn.Sequential:
    """One quantised linear (BFP W3) inside a container, as quantize_model leaves it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out))
    quantize_model(model, {"weight": BFP3, "activation": activation, "exclude": []})
    return model


def _plain_and_parts(model: nn.Sequential, x: torch.Tensor):
    ql = model[0]
    qx = ql.quantized_input(x)
    return F.linear(qx, ql.quantized_weight(), ql.bias), qx, ql._qdec.residual()


# --- the compensated layer's algebra ------------------------------------------------------


@pytest.mark.parametrize("activation", [None, BFP4], ids=["weight-only", "W3A4"])
@pytest.mark.parametrize(
    "shape", [(3, 1, 64), (2, 5, 64), (4, 64)], ids=["decode", "prefill", "2d"]
)
def test_k_equal_d_in_is_the_layer_with_weight_q_plus_r_hat(activation, shape):
    model = _layer(activation=activation)
    attach_qdec(model, {"k_chunk": 1024})
    assert model[0]._qdec.k == 64
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x)
        _, qx, r_hat = _plain_and_parts(model, x)
        ref = F.linear(qx, model[0].quantized_weight() + r_hat, model[0].bias)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # the residual is a close 4-bit copy of W - Q(W), not zero
    with torch.no_grad():
        r = model[0].weight - model[0].quantized_weight()
    assert r.abs().max() > 0.01
    assert (r - r_hat).abs().max() < 0.2 * r.abs().max()


def test_gpt2_conv1d_layers_are_compensated_and_saved_in_their_own_layout(tmp_path):
    """GPT-2 keeps its weights as Conv1D ``[in, out]``: the residual is W - Q(W) of that
    layout, transposed to ``[out, in]``, and k counts input channels (dim 0)."""
    from qat.quant.modules import QuantConv1D

    torch.manual_seed(0)
    model = quantize_model(tiny_model("gpt2"), {"weight": BFP3, "activation": BFP4})
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantConv1D)]
    assert convs
    attach_qdec(model, {"k_chunk": 1024})
    assert all("_qdec" in m.__dict__ for _, m in convs)
    name, conv = next((n, m) for n, m in convs if m.weight.shape[0] != m.weight.shape[1])
    d_in, d_out = conv.weight.shape
    assert conv._qdec.k == d_in and conv._qdec.codes().shape == (d_in, d_out)
    x = torch.randn(2, 3, d_in, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = conv(x)
        qx = conv.quantized_input(x)
        r_hat = conv._qdec.residual()  # [out, in]
        r = (conv.weight - conv.quantized_weight()).t()
        ref = qx @ (conv.quantized_weight() + r_hat.t()) + conv.bias
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert (r - r_hat).abs().max() < 0.2 * r.abs().max()
    # save and reload: the shapes are checked in the Conv1D layout
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    save_qdec(model, tmp_path)
    torch.manual_seed(0)
    again = load_qdec(
        quantize_model(tiny_model("gpt2"), {"weight": BFP3, "activation": BFP4}), tmp_path
    )
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, logits)


def test_nibble_packing_round_trips_every_code():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 1)[:, :15]  # odd width
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 8)
    # hand-computed: codes -8, -7 -> nibbles 0, 1 -> byte 0x10; the padded tail is code 0 (8)
    assert packed[0, 0].item() == 0x10 and packed[0, 7].item() == (6 + 8) | (8 << 4)
    assert torch.equal(unpack_nibbles(packed, 15), codes)


@pytest.mark.parametrize("bits, packed", [(2, True), (4, True), (5, False), (8, False)])
def test_residuals_of_at_most_4_bits_are_held_two_a_byte(bits, packed):
    model = _layer(d_in=64, d_out=23, activation=BFP4)  # odd d_out: a padded nibble per row
    attach_qdec(model, {"k_chunk": 256, "residual_bits": bits})
    state = model[0]._qdec
    assert state.packed is packed
    assert state.codes_t.shape == ((64, 12) if packed else (64, 23))
    # the same codes held unpacked compensate bit for bit as the packed ones
    plain = QDECState(state.codes(), state.scale, state.k, QDECConfig(k_chunk=256, residual_bits=8))
    assert not plain.packed
    x = torch.randn(3, 2, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(state.compensation(x, "step"), plain.compensation(x, "step"))
        assert torch.equal(state.compensation(x, "token"), plain.compensation(x, "token"))


def test_packed_residuals_save_half_the_bytes_and_version_1_files_still_load(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _layer(d_in=64, d_out=24)
    attach_qdec(model, {"k_chunk": 128})
    save_qdec(model, tmp_path / "v2")
    saved = load_file(str(tmp_path / "v2" / "qdec.safetensors"))
    assert saved["0.codes"].dtype == torch.uint8 and saved["0.codes"].shape == (64, 12)
    meta = json.loads((tmp_path / "v2" / "qdec_config.json").read_text())
    assert meta["version"] == 3 and meta["layers"] == {"0": [64, 24]}
    # a version-1 file (int8 codes, one a byte) loads to the same residual
    v1 = tmp_path / "v1"
    v1.mkdir()
    save_file(
        {"0.codes": model[0]._qdec.codes(), "0.scale": saved["0.scale"]},
        str(v1 / "qdec.safetensors"),
    )
    (v1 / "qdec_config.json").write_text(json.dumps({**meta, "version": 1}))
    again = load_qdec(_layer(d_in=64, d_out=24), v1)
    assert again[0]._qdec.packed
    assert torch.equal(again[0]._qdec.residual(), model[0]._qdec.residual())


def test_k_zero_is_the_plain_quantised_layer():
    model = _layer(activation=BFP4)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(x)
        attach_qdec(model, {"k_chunk": 0})
        assert torch.equal(model(x), plain)
        set_k_chunk(model, 1024)
        full = model(x)
        assert not torch.equal(full, plain)
        enable_qdec(model, False)  # hooks off, residuals kept
        assert torch.equal(model(x), plain)
        enable_qdec(model, True)
        assert torch.equal(model(x), full)
        detach_qdec(model)
        assert torch.equal(model(x), plain)


def test_k_rounding():
    assert k_for(32, 576) == 18
    assert k_for(8, 64) == 0 and k_for(24, 64) == 2  # 0.5 and 1.5: half to even
    assert k_for(40, 64) == 2  # 2.5 -> 2
    assert k_for(2048, 10) == 10 and k_for(0, 4096) == 0


# --- channel selection --------------------------------------------------------------------


def test_selection_picks_the_largest_abs_x():
    x = torch.zeros(2, 1, 8)
    x[0, 0] = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 4.0, 0.05])
    x[1, 0] = torch.tensor([-9.0, 1.0, 0.0, 0.0, 2.0, -3.0, 0.5, 0.0])
    assert sorted(select_channels(x, 3)[0].tolist()) == [1, 3, 6]
    assert sorted(select_channels(x, 3)[1].tolist()) == [0, 4, 5]
    # several tokens of one sequence: channels by max |x| over the step's tokens
    xs = torch.tensor([[[1.0, 0.0, 0.0, -0.5], [0.0, -3.0, 0.1, 0.0], [0.2, 0.0, 0.0, 2.0]]])
    assert sorted(select_channels(xs, 2)[0].tolist()) == [1, 3]


def _hand_x(T: int) -> torch.Tensor:
    x = torch.full((1, T, 64), 0.01)
    x[0, 0, [5, 17, 40]] = torch.tensor([4.0, -6.0, 3.0])
    if T > 1:
        x[0, 1, [9, 17, 63]] = torch.tensor([-5.0, 1.0, 7.0])
    return x


def test_decode_step_compensates_exactly_the_top_k_channels():
    model = _layer()
    attach_qdec(model, {"k_chunk": 48})  # k = round(48 * 64 / 1024) = 3
    x = _hand_x(1)
    with torch.no_grad():
        y = model(x)
        plain, qx, r_hat = _plain_and_parts(model, x)
    s = [5, 17, 40]
    torch.testing.assert_close(y, plain + qx[..., s] @ r_hat[:, s].t(), rtol=1e-5, atol=1e-6)


def test_prefill_rules_step_and_token():
    x = _hand_x(2)
    model = _layer()
    attach_qdec(model, {"k_chunk": 48})
    with torch.no_grad():
        y = model(x)
        plain, qx, r_hat = _plain_and_parts(model, x)
    s = [63, 17, 9]  # max over both tokens: 7, 6, 5 beat 4 and 3
    torch.testing.assert_close(y, plain + qx[..., s] @ r_hat[:, s].t(), rtol=1e-5, atol=1e-6)
    detach_qdec(model)
    attach_qdec(model, {"k_chunk": 48, "prefill": "token"})
    with torch.no_grad():
        y = model(x)
    for t, s in ((0, [5, 17, 40]), (1, [9, 17, 63])):  # each token its own top 3
        ref = plain[0, t] + qx[0, t, s] @ r_hat[:, s].t()
        torch.testing.assert_close(y[0, t], ref, rtol=1e-5, atol=1e-6)


# --- the residual quantiser ---------------------------------------------------------------


def test_mse_scale_search_lowers_mse_against_max_abs():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(32, 256, generator=g) * 0.01
    r[:, 7] *= 12  # an outlier per row: max-abs wastes most of the grid on it
    r[5] = 0.0  # an all-zero row

    def mse(codes, scale):
        return float(((codes.float() * scale[:, None] - r) ** 2).mean())

    codes, scale = quantize_residual(r, 4)
    codes_max, scale_max = quantize_residual(r, 4, fractions=(1.0,))
    assert codes.dtype == torch.int8 and codes.abs().max() <= 7
    assert torch.equal(scale_max, r.abs().amax(1) / 7)
    assert mse(codes, scale) < 0.9 * mse(codes_max, scale_max)
    # per row never worse (max-abs is one of the candidates)
    row = ((codes.float() * scale[:, None] - r) ** 2).sum(1)
    row_max = ((codes_max.float() * scale_max[:, None] - r) ** 2).sum(1)
    assert bool((row <= row_max).all())
    assert scale[5] == 0 and codes[5].abs().sum() == 0
    codes2, _ = quantize_residual(r, 2)
    assert set(codes2.unique().tolist()) <= {-1, 0, 1}


# --- model level: inference only, nothing moved, save / reload ----------------------------


def test_grad_mode_is_refused_and_the_residual_is_no_parameter_or_buffer():
    model = tiny_model("llama")
    quantize_model(model, {"weight": BFP3})
    attach_qdec(model, {"k_chunk": 64})
    n = sum(1 for m in model.modules() if "_qdec" in m.__dict__)
    assert n == 14  # q k v o gate up down x 2 layers
    names = set(model.state_dict()) | {n for n, _ in model.named_buffers()}
    assert not any("qdec" in k for k in names)
    ids = torch.randint(2, 100, (1, 5))
    with pytest.raises(QDECError, match="inference-only"):
        model(input_ids=ids)
    with torch.no_grad():
        model(input_ids=ids)


def test_unquantised_model_is_refused():
    model = tiny_model("llama")
    with pytest.raises(QDECError) as e:
        attach_qdec(model, {"k_chunk": 32})
    assert str(e.value) == (
        "QDEC needs quantised weights, and this model has no linear layer "
        "with a weight quantiser; set quant.weight (e.g. {format: bfp, "
        "width: 3})"
    )
    quantize_model(model, {"activation": BFP4})  # activations only: still no weights
    with pytest.raises(QDECError, match="QDEC needs quantised weights"):
        attach_qdec(model, {"k_chunk": 32})


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            {"k_chunk": -1},
            "qdec.k_chunk must be an integer >= 0 (channels per 1024 inputs), got -1",
        ),
        (
            {"k_chunk": 2.5},
            "qdec.k_chunk must be an integer >= 0 (channels per 1024 inputs), got 2.5",
        ),
        ({"residual_bits": 1}, "qdec.residual_bits must be an integer in 2..8, got 1"),
        ({"residual_bits": 9}, "qdec.residual_bits must be an integer in 2..8, got 9"),
        ({"residual_device": "gpu"}, "qdec.residual_device must be one of cpu, same; got 'gpu'"),
        (
            {"k_chnk": 3},
            "unknown key qdec.k_chnk (did you mean qdec.k_chunk?); valid keys: "
            "k_chunk, residual_bits, residual_device, prefill",
        ),
    ],
)
def test_config_validation(bad, message):
    with pytest.raises(QDECError) as e:
        QDECConfig.from_dict(bad)
    assert str(e.value) == message


def _load_quantised(path: Path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path).eval()
    return quantize_model(model, {"weight": BFP3, "activation": BFP4})


def test_save_and_reload_keeps_residuals_and_logits_and_generate_works(
    tmp_path, monkeypatch, capsys
):
    path = Path(make_tiny_causal_lm_dir(tmp_path))
    ids = torch.randint(200, 30000, (2, 9), generator=torch.Generator().manual_seed(4))
    model = attach_qdec(_load_quantised(path), {"k_chunk": 128})
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    save_qdec(model, path)
    assert sorted(p.name for p in path.glob("qdec*")) == ["qdec.safetensors", "qdec_config.json"]
    with pytest.raises(QDECError, match="already exists"):
        save_qdec(model, path)
    # reloading must read the residuals, not recompute them
    # attach_qdec computes residuals with this name; loading must not call it
    monkeypatch.setattr(qdec_attach, "quantize_residual", None)
    again = load_qdec(_load_quantised(path), path)
    for (n, a), (_, b) in zip(model.named_modules(), again.named_modules()):
        if "_qdec" in a.__dict__:
            assert torch.equal(a._qdec.codes_t, b._qdec.codes_t), n
            assert torch.equal(a._qdec.scale, b._qdec.scale), n
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, logits)
        detach_qdec(again)
        plain_free = again(input_ids=ids).logits
    assert not torch.equal(plain_free, logits)
    assert json.loads((path / "qdec_config.json").read_text())["config"]["k_chunk"] == 128
    # the command finds the saved residuals beside the model
    recipe = tiny_recipe(
        tmp_path, model_name_or_path=str(path), quant={"weight": BFP3, "activation": BFP4}
    )
    capsys.readouterr()
    assert generate_main([recipe, "--prompt", "the tower is", "--max_new_tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "--- without QDEC ---" in out
    assert "--- with QDEC (k_chunk 128, 4-bit residual) ---" in out
    assert "qat generate: with QDEC: 5 tokens in" in out and "tokens/s" in out


def test_perplexity_with_qdec(tmp_path, capsys):
    path = Path(make_tiny_causal_lm_dir(tmp_path))
    d = tmp_path / "wikitext"
    d.mkdir()
    (d / "test.txt").write_text(
        "the tower is 324 metres tall , about as high as a building . " * 30
    )
    recipe = tiny_recipe(
        tmp_path, model_name_or_path=str(path), quant={"weight": BFP3, "exclude": ["lm_head"]}
    )
    ppl = {}
    for name, extra in (
        ("plain", []),
        ("k0", ["--qdec.k_chunk", "0"]),
        ("k1024", ["--qdec.k_chunk", "1024"]),
    ):
        out = tmp_path / f"{name}.json"
        rc = perplexity_main(
            [recipe, "--chunk_size", "32", "--max_chunks", "2", "--output", str(out), *extra]
        )
        assert rc == 0, capsys.readouterr().err
        ppl[name] = json.loads(out.read_text())
    assert ppl["plain"]["qdec"] is None
    assert ppl["k1024"]["qdec"] == {
        "k_chunk": 1024,
        "residual_bits": 4,
        "residual_device": "cpu",
        "prefill": "token",
    }
    assert ppl["k0"]["perplexity"] == pytest.approx(ppl["plain"]["perplexity"], rel=1e-6)
    assert ppl["k1024"]["perplexity"] != pytest.approx(ppl["plain"]["perplexity"], rel=1e-6)


# --- bad input through the commands: one line, exit 2, nothing written --------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--qdec.k_chunk", "-1"],
            "qdec.k_chunk must be an integer >= 0 (channels per 1024 inputs), got -1",
        ),
        (
            ["--qdec.k_chunk", "2.5"],
            "qdec.k_chunk must be an integer >= 0 (channels per 1024 inputs), got 2.5",
        ),
        (["--qdec.residual_bits", "1"], "qdec.residual_bits must be an integer in 2..8, got 1"),
        (["--qdec.residual_bits", "9"], "qdec.residual_bits must be an integer in 2..8, got 9"),
        (
            ["--quant", "null", "--qdec.k_chunk", "32"],
            "qdec needs quantised weights, but quant.weight is null "
            "(the model's weights stay float); set quant.weight, e.g. {format: bfp, width: 3}",
        ),
    ],
)
@pytest.mark.parametrize("command", ["perplexity", "generate"])
def test_bad_qdec_input_is_one_line_and_exit_2(tmp_path, capsys, command, extra, message):
    recipe = tiny_recipe(tmp_path, model_name_or_path=str(tmp_path / "never-loaded"))
    out = tmp_path / "result.json"
    capsys.readouterr()  # building the fixture model prints a progress bar
    if command == "perplexity":
        rc = perplexity_main([recipe, "--output", str(out), *extra])
    else:
        rc = generate_main([recipe, "--prompt", "hi", *extra])
    err = capsys.readouterr().err
    assert rc == 2
    where = f"{recipe}: " if "needs quantised" not in message else ""
    assert err == f"qat {command}: error: {where}{message}\n"
    assert not out.exists()


def test_recipe_section_is_validated_and_kept(tmp_path):
    recipe = tiny_recipe(tmp_path, qdec={"k_chunk": 16, "residual_bits": 3})
    r = load_recipe(recipe)
    assert r.args.qdec == QDECConfig(k_chunk=16, residual_bits=3)
    assert r.resolved["qdec"]["k_chunk"] == 16
    assert load_recipe(recipe, ["--qdec.k_chunk", "64"]).args.qdec.k_chunk == 64
    assert load_recipe(tiny_recipe(tmp_path, name="r2.yaml")).args.qdec is None
    with pytest.raises(RecipeError, match=r"qdec.residual_bits must be an integer in 2..8"):
        load_recipe(recipe, ["--qdec.residual_bits", "12"])


def test_generate_help_is_fast_and_light():
    code = (
        "import sys\nfrom qat.cli import main\nrc = main(['generate', '--help'])\n"
        "print('HEAVY', 'torch' in sys.modules)\nsys.exit(rc)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.startswith("usage: qat generate RECIPE.yaml|RUN_DIR --prompt TEXT")
    assert r.stdout.rstrip().endswith("HEAVY False")


# --- issue #21: saved residuals tied to their weights and quantiser ----------------------------

BFP4_W = {"weight": BFP4, "exclude": []}


def _saved_w3(tmp_path: Path) -> Path:
    model = attach_qdec(_layer(), {"k_chunk": 1024})
    save_qdec(model, tmp_path / "run")
    return tmp_path / "run"


def test_saved_residuals_of_another_quantiser_are_refused_and_recomputed(tmp_path):
    d = _saved_w3(tmp_path)
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(64, 24))
    quantize_model(other, BFP4_W)  # same weights, W4 instead of W3
    with pytest.raises(QDECError, match="computed from other weights or another weight quantiser"):
        load_qdec(other, d)
    cfg = apply_qdec(other, None, d)  # the commands: recompute, with the saved settings
    assert cfg.k_chunk == 1024
    fresh = attach_qdec(_layer_w4(), {"k_chunk": 1024})
    assert torch.equal(other[0]._qdec.codes_t, fresh[0]._qdec.codes_t)


def _layer_w4() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 24))
    quantize_model(model, BFP4_W)
    return model


def test_saved_residuals_of_retrained_weights_are_recomputed(tmp_path):
    d = _saved_w3(tmp_path)
    model = _layer()
    with torch.no_grad():
        model[0].weight.add_(0.01)  # a retrained run in the same folder
    with pytest.raises(QDECError, match="other weights"):
        load_qdec(model, d)
    apply_qdec(model, None, d)
    r = weight_residual_of(model)
    assert (r - model[0]._qdec.residual()).abs().max() < 0.2 * r.abs().max()
    same = load_qdec(_layer(), d)  # the model it was computed from still loads
    assert same[0]._qdec is not None


def weight_residual_of(model: nn.Sequential) -> torch.Tensor:
    return weight_residual(model[0])


@pytest.mark.parametrize(
    "text", ["{not json", "[1, 2]", '{"config": 3, "layers": {}}', "[" * 100_000]
)
def test_damaged_qdec_config_is_one_line(tmp_path, capsys, text):
    path = Path(make_tiny_causal_lm_dir(tmp_path))
    (path / "qdec_config.json").write_text(text)
    (path / "qdec.safetensors").write_bytes(b"")
    recipe = tiny_recipe(
        tmp_path, model_name_or_path=str(path), quant={"weight": BFP3, "exclude": ["lm_head"]}
    )
    capsys.readouterr()
    rc = generate_main([recipe, "--prompt", "hi", "--max_new_tokens", "2"])
    text_err = capsys.readouterr().err
    err = [line for line in text_err.splitlines() if "qat generate" in line]
    assert rc == 2 and len(err) == 1 and "Traceback" not in text_err, text_err
    assert err[0].startswith(
        f"qat generate: error: {str(path / 'qdec_config.json')!r} is not a valid QDEC config ("
    )
    assert err[0].endswith("); delete the qdec.* files to recompute the residuals")
