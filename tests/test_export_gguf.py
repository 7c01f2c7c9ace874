"""``--to gguf``: a tiny Llama (dims multiples of 32) written with gguf's GGUFWriter and read back
with gguf.GGUFReader: every tensor, dequantised by the gguf package, equals qat's quantised
weight bit for bit (q/k rows in llama.cpp's interleaved RoPE order)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import lm_recipe, make_tiny_causal_lm_dir, tiny_model

from qat import QuantConfig, export_model, quantize_model
from qat.errors import ExportError
from qat.export.gguf import rope_permute, write_gguf

gguf = pytest.importorskip("gguf")
from gguf import quants  # noqa: E402


def _model(tmp_path, **quant):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = make_tiny_causal_lm_dir(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(src)
    quantize_model(model, QuantConfig(**quant))
    return model, AutoTokenizer.from_pretrained(src)


def _read(path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        data = quants.dequantize(np.array(t.data), t.tensor_type)
        out[t.name] = (data.reshape([int(d) for d in reversed(t.shape)]), t.tensor_type)
    return out, reader


@pytest.mark.parametrize(
    "fmt,ggml", [("ggml_q4_0", "Q4_0"), ("ggml_q8_0", "Q8_0"), ("mxfp4", "MXFP4")]
)
def test_gguf_tensors_read_back_equal_qat_weights(tmp_path, fmt, ggml):
    act = {"format": "ggml_q8_0"} if fmt == "ggml_q4_0" else None
    model, tok = _model(tmp_path, weight={"format": fmt}, activation=act)
    out = write_gguf(model, tmp_path / "g", tok, embeddings="q8_0")
    tensors, reader = _read(out / "model.gguf")
    cfg = model.config
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.attention.head_count_kv"].contents() == 1
    assert reader.fields["llama.rope.freq_base"].contents() == 10000.0
    assert reader.fields["llama.rope.dimension_count"].contents() == 16
    assert reader.fields["tokenizer.ggml.model"].contents() == "bert"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == cfg.vocab_size
    layer = model.model.layers[1]
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    for hf, name in (
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("mlp.down_proj", "ffn_down"),
    ):
        mod = layer.get_submodule(hf)
        want = mod.quantized_weight().detach().numpy()
        if name in heads:
            want = rope_permute(want, heads[name])
        got, kind = tensors[f"blk.1.{name}.weight"]
        assert kind.name == ggml
        assert np.array_equal((got + 0.0).view(np.int32), (want + 0.0).view(np.int32)), name
    emb, kind = tensors["token_embd.weight"]
    assert kind.name == "Q8_0"
    want = quants.dequantize(
        quants.quantize(
            model.model.embed_tokens.weight.detach().numpy(), gguf.GGMLQuantizationType.Q8_0
        ),
        gguf.GGMLQuantizationType.Q8_0,
    )
    assert np.array_equal(emb, want)
    norm, kind = tensors["blk.0.attn_norm.weight"]
    assert kind.name == "F32"
    assert np.array_equal(norm, model.model.layers[0].input_layernorm.weight.detach().numpy())
    out_w, kind = tensors["output.weight"]  # lm_head excluded from quant: --gguf_embeddings
    assert kind.name == "Q8_0" and out_w.shape == (cfg.vocab_size, cfg.hidden_size)


def test_rope_permute_interleaves_the_halves_of_each_head():
    rows = np.arange(8)[:, None]  # 2 heads of 4 rows: [a0 a1 b0 b1] -> [a0 b0 a1 b1]
    assert rope_permute(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize(
    "quant,match",
    [
        ({"weight": {"format": "nvfp4"}}, "no GGML type; formats with one: ggml_q4_0"),
        (
            {"weight": {"format": "ggml_q4_0"}, "activation": {"format": "mxfp4"}},
            "Q8_0 blocks, not activation format",
        ),
        ({"weight": {"format": "ggml_q4_0"}, "matmul": {"format": "mxfp4"}}, "quant.matmul"),
    ],
)
def test_formats_llama_cpp_cannot_run_fail_clearly(tmp_path, quant, match):
    model, tok = _model(tmp_path, **quant)
    with pytest.raises(ExportError, match=match):
        export_model(model, tmp_path / "g", tok, to="gguf")
    assert not (tmp_path / "g").exists()


def test_unknown_architecture_and_a_classifier_fail_clearly(tmp_path):
    from transformers import OPTForCausalLM

    model = OPTForCausalLM(tiny_model("opt").config)
    quantize_model(model, QuantConfig(weight={"format": "ggml_q4_0"}))
    with pytest.raises(ExportError, match="not one the GGUF writer knows; known: LlamaForCausalLM"):
        export_model(model, tmp_path / "g", to="gguf")
    classifier = tiny_model("llama")
    with pytest.raises(ExportError, match="--to gguf writes decoders; this source builds a seq"):
        export_model(classifier, tmp_path / "g", to="gguf")
    assert not (tmp_path / "g").exists()


def test_reduction_dim_not_a_multiple_of_32_fails_before_writing(tmp_path):
    model, tok = _model(tmp_path, weight={"format": "ggml_q8_0"})
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight = torch.nn.Parameter(torch.zeros(32, 48))
    with pytest.raises(ExportError, match="reduction dim 48 is not a multiple"):
        write_gguf(model, tmp_path / "g", tok)
    assert not (tmp_path / "g").exists()


def test_gguf_source_tokenizer_fields_are_copied(tmp_path):
    model, tok = _model(tmp_path, weight={"format": "ggml_q8_0"})
    first = write_gguf(model, tmp_path / "a", tok) / "model.gguf"
    second = write_gguf(model, tmp_path / "b", None, source_gguf=first) / "model.gguf"
    a, b = gguf.GGUFReader(str(first)), gguf.GGUFReader(str(second))
    keys = [k for k in a.fields if k.startswith("tokenizer.")]
    assert "tokenizer.ggml.tokens" in keys and "tokenizer.ggml.bos_token_id" in keys
    for k in keys:
        fa, fb = a.fields[k], b.fields[k]
        assert fa.types == fb.types, k
        if len(fa.data) > 1 or fa.types[0] == gguf.GGUFValueType.ARRAY:
            assert [fa.contents(i) for i in range(len(fa.data))] == [
                fb.contents(i) for i in range(len(fb.data))
            ], k
        else:
            assert fa.contents() == fb.contents(), k


def test_export_command_writes_gguf(tmp_path, capsys):
    from qat.cli.export import main

    recipe = lm_recipe(
        tmp_path,
        quant={
            "weight": {"format": "ggml_q4_0"},
            "activation": {"format": "ggml_q8_0"},
            "exclude": ["lm_head"],
        },
    )
    out = tmp_path / "g"
    assert main([recipe, "--to", "gguf", "--out", str(out), "--gguf_embeddings", "f32"]) == 0
    assert "model.gguf" in capsys.readouterr().out
    tensors, _ = _read(out / "model.gguf")
    assert tensors["token_embd.weight"][1].name == "F32"
    assert tensors["blk.0.ffn_up.weight"][1].name == "Q4_0"


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--to", "gguf"], "has no GGML type; formats with one: ggml_q4_0 (Q4_0)"),
        (
            ["--to", "gguf", "--quant.weight", "{format: ggml_q4_0}"],
            "llama.cpp quantises the input of a Q4_0 matmul to Q8_0 blocks",
        ),
        (
            ["--to", "gguf", "--quant", "{weight: {format: ggml_q4_0}}", "--gguf_embeddings", "q4"],
            "--gguf_embeddings must be one of f16, q8_0, f32; got 'q4'",
        ),
        (
            ["--to", "gguf", "--quant", "{weight: {format: ggml_q4_0}, rotation: {size: 16}}"],
            "--to gguf: llama.cpp does not rotate a layer's input",
        ),
        (
            [
                "--to",
                "compressed-tensors",
                "--quant",
                "{weight: {format: nvfp4}, overrides: {mlp: {rotation: {size: 16}}}}",
            ],
            "--to compressed-tensors: vLLM does not rotate a layer's input",
        ),
    ],
)
def test_bad_gguf_export_is_one_line_before_loading(tmp_path, capsys, no_model, argv, match):
    from qat.cli.export import main

    recipe = lm_recipe(tmp_path)  # W4A4 BFP
    capsys.readouterr()
    assert main([recipe, "--out", str(tmp_path / "g"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1


def test_a_trained_runs_export_takes_the_tokenizer_of_the_gguf_it_started_from(tmp_path):
    """A run folder replaces the model path (and drops gguf_file); its recipe.yaml still names
    the GGUF it started from, whose tokenizer keys (llama.cpp's pre-tokenizer among them) the
    export copies. A recipe's own gguf_file wins; a base that moved falls back to None."""
    from types import SimpleNamespace

    from qat.exporting import source_gguf

    base = tmp_path / "base"
    base.mkdir()
    (base / "m.gguf").write_bytes(b"GGUF")
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(f"model_name_or_path: {base}\ngguf_file: m.gguf\n")

    def src(gguf_file=None, model=str(run), checkpoint=run):
        args = SimpleNamespace(gguf_file=gguf_file, model_name_or_path=model)
        return SimpleNamespace(args=args, checkpoint=checkpoint)

    assert source_gguf(src()) == base / "m.gguf"
    assert source_gguf(src("m.gguf", str(base), None)) == base / "m.gguf"
    assert source_gguf(src(checkpoint=None)) is None
    (base / "m.gguf").unlink()
    assert source_gguf(src()) is None
    (run / "recipe.yaml").write_text(
        f"model_name_or_path: {tmp_path / 'gone'}\ngguf_file: m.gguf\n"
    )
    assert source_gguf(src()) is None


def test_a_quantised_tied_head_is_written_as_its_own_output_tensor(tmp_path):
    """A tied lm_head quantised with the rest (``exclude: []``) is written as a quantised
    ``output.weight``: without one llama.cpp computes the logits with ``token_embd`` (F16), a
    float head the trained model never had. An excluded (float) tied head still has none."""
    from qat.cli.export import main
    from qat.runs.build import build_model

    quant = {"weight": {"format": "ggml_q8_0"}, "activation": {"format": "ggml_q8_0"}}
    tied = make_tiny_causal_lm_dir(tmp_path, tied=True)
    recipe = lm_recipe(tmp_path, model_name_or_path=tied, quant={**quant, "exclude": []})
    assert main([recipe, "--to", "gguf", "--out", str(tmp_path / "q")]) == 0
    model = build_model(recipe, head="causal_lm").model
    head = model.lm_head
    assert head.weight is model.model.embed_tokens.weight and head.weight_quantizer is not None
    tensors, _ = _read(tmp_path / "q" / "model.gguf")
    got, kind = tensors["output.weight"]
    want = head.quantized_weight().detach().numpy()
    assert kind.name == "Q8_0" and got.shape == want.shape
    assert np.array_equal((got + 0.0).view(np.int32), (want + 0.0).view(np.int32))
    assert tensors["token_embd.weight"][1].name == "F16"
    assert (
        main([recipe, "--to", "gguf", "--out", str(tmp_path / "f"), "--quant.exclude", "[lm_head]"])
        == 0
    )
    assert "output.weight" not in _read(tmp_path / "f" / "model.gguf")[0]
