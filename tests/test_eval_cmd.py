"""``qat eval``: PTQ from a recipe, rebuild from full and LoRA checkpoints, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tiny import REPO, tiny_recipe

from qat.cli.base import split_options
from qat.cli.eval import main
from qat.quant.modules import QuantLinear
from qat.runs.build import build_model, resolve_source
from qat.runs.checkpoints import QAT_CONFIG_FILE
from qat.runs.recipe.load import load_recipe


def test_split_options_separates_own_options_from_overrides():
    opts, rest = split_options(
        ["--output", "x.json", "--quant.weight.width", "6", "--max_chunks=3", "--quant", "null"],
        {"output": str, "max_chunks": int},
    )
    assert opts == {"output": "x.json", "max_chunks": 3}
    assert rest == ["--quant.weight.width", "6", "--quant", "null"]


def test_ptq_from_recipe_writes_metrics_and_density(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    out = tmp_path / "res.json"
    assert main([recipe, "--quant.weight.width", "6", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["mode"] == "ptq" and res["task"] == "sst2"
    assert 0.0 <= res["metrics"]["validation"]["accuracy"] <= 1.0
    assert res["quant"]["weight"]["width"] == 6
    assert res["density"]["quantized_linears"]["bits_per_element"] == pytest.approx(6.5)
    printed = capsys.readouterr().out
    assert "vs fp32" in printed and "validation: accuracy=" in printed


def _save_full_run(tmp_path: Path) -> tuple[Path, torch.nn.Module, dict]:
    """What `qat train` leaves: weights of a quantised model, qat_config.json, recipe.yaml."""
    recipe = load_recipe(tiny_recipe(tmp_path))
    built = build_model(recipe.source, [], num_labels=2)
    model, tok = built.model, built.tokenizer
    run = tmp_path / "run"
    model.save_pretrained(run)
    tok.save_pretrained(run)
    state = {"quant": recipe.args.quant.to_dict(), "finetune": "full", "lora": None}
    (run / QAT_CONFIG_FILE).write_text(json.dumps(state))
    recipe.save(run)
    batch = tok(["a fine film", "dull and long"], return_tensors="pt", padding=True)
    return run, model, batch


def test_full_checkpoint_rebuilds_the_quantised_model(tmp_path):
    run, model, batch = _save_full_run(tmp_path)
    assert "qat_quant" in json.loads((run / "config.json").read_text())
    src = resolve_source(str(run), [])
    assert src.checkpoint == run and src.recipe.args.model_name_or_path == str(run)
    rebuilt = build_model(src, num_labels=2).model
    assert isinstance(rebuilt.bert.encoder.layer[0].attention.self.query, QuantLinear)
    with torch.no_grad():
        assert torch.equal(rebuilt(**batch).logits, model(**batch).logits)
    assert main([str(run), "--max_eval_samples", "8"]) == 0
    res = json.loads((run / "eval_qat.json").read_text())
    assert res["mode"] == "checkpoint"


def test_lora_checkpoint_attaches_adapter_on_quantised_base(tmp_path):
    from peft import get_peft_model

    from qat.quant.lora import QuantLoraLinear, make_lora_config

    recipe_path = tiny_recipe(tmp_path, finetune="lora")
    recipe = load_recipe(recipe_path)
    built = build_model(recipe_path, [], num_labels=2)
    base, tok = built.model, built.tokenizer
    cfg = make_lora_config(base, 4, 8, 0.0, None, modules_to_save=["classifier"])
    model = get_peft_model(base, cfg)
    for name, p in model.named_parameters():  # non-zero B so the adapter matters
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    run = tmp_path / "lora_run"
    model.save_pretrained(run)
    (run / QAT_CONFIG_FILE).write_text(
        json.dumps(
            {
                "quant": recipe.args.quant.to_dict(),
                "finetune": "lora",
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None},
            }
        )
    )
    recipe.save(run)
    rebuilt = build_model(str(run), [], num_labels=2).model
    assert any(isinstance(m, QuantLoraLinear) for m in rebuilt.modules())
    batch = tok(["a fine film", "dull"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(**batch).logits, model(**batch).logits)


def test_float_recipe_and_override_to_null(tmp_path):
    recipe = tiny_recipe(tmp_path)
    out = tmp_path / "f.json"
    assert main([recipe, "--quant", "null", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["quant"] is None


@pytest.mark.parametrize("case", ["missing", "no_qat_config"])
def test_bad_paths_fail_clearly(tmp_path, capsys, case):
    path = tmp_path / "nope"
    if case == "no_qat_config":
        path.mkdir()
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "qat eval: error:" in err
    assert ("does not exist" if case == "missing" else "holds no qat_config.json") in err


def test_unknown_override_fails_clearly(tmp_path, capsys):
    assert main([tiny_recipe(tmp_path), "--quant.wieght.width", "4"]) == 2
    assert "qat eval: error:" in capsys.readouterr().err


@pytest.mark.slow
def test_real_minilm_ptq(tmp_path):
    if not os.environ.get("QAT_DATA_DIR"):
        pytest.skip("needs local GLUE data (QAT_DATA_DIR)")
    out = tmp_path / "minilm.json"
    assert (
        main(
            [
                str(REPO / "recipes" / "minilm_sst2.yaml"),
                "--max_eval_samples",
                "8",
                "--per_device_eval_batch_size",
                "8",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["density"]["quantized_linears"]["params"] == 10764288
    assert res["density"]["quantized_linears"]["bits_per_element"] == pytest.approx(4.5)
    assert 0.0 <= res["metrics"]["validation"]["accuracy"] <= 1.0
