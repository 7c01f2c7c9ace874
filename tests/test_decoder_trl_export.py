"""Decoders inside TRL (``trainer: sft`` / ``QATSFTTrainer``) and the packed export of a causal
LM: it reloads with ``from_pretrained`` and generates with the fake-quantised model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import lm_recipe, make_tiny_causal_lm_dir

from qat.cli.export import main as export_main
from qat.cli.train import main as train_main

pytest.importorskip("trl")


pytestmark = pytest.mark.usefixtures("committed_wikitext")


def test_sft_recipe_inserts_quantisers_and_saves_the_quant_config(tmp_path):
    recipe = lm_recipe(tmp_path, trainer="sft", max_steps=2, save_strategy="steps", save_steps=2)
    assert train_main([recipe]) == 0
    out = tmp_path / "out"
    for folder in (out, out / "checkpoint-2"):
        state = json.loads((folder / "qat_config.json").read_text())
        assert state["quant"]["activation"]["format"] == "bfp"
        assert state["quant"]["exclude"] == ["lm_head"]
    losses = [
        h
        for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
        if "loss" in h
    ]
    assert len(losses) == 2 and "mean_token_accuracy" in losses[0]  # TRL's own metric: TRL ran


def test_qat_sft_trainer_wraps_trl(tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainingArguments
    from trl import SFTConfig, SFTTrainer

    from qat.integrations.trl import QATSFTTrainer
    from qat.models import load_tokenizer
    from qat.quant.lora import QuantLoraLinear
    from qat.quant.modules import QuantLinear
    from qat.runs.recipe.arguments import LoraArguments

    path = make_tiny_causal_lm_dir(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.randint(1000, 2000, (4, 16)).numpy()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(
        output_dir=str(tmp_path / "o"),
        use_cpu=True,
        report_to="none",
        learning_rate=1e-3,
        max_steps=1,
        save_strategy="no",
    )
    quant = {"weight": {"format": "bfp", "width": 4, "block_size": 16}, "exclude": ["lm_head"]}
    trainer = QATSFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=load_tokenizer(path),
        quant_config=quant,
        finetune="lora",
        lora=LoraArguments(r=4),
    )
    assert isinstance(trainer, SFTTrainer) and isinstance(trainer.args, SFTConfig)
    assert trainer.args.learning_rate == 1e-3  # the recipe's value, not TRL's default
    mods = list(trainer.model.modules())
    assert sum(isinstance(m, QuantLinear) for m in mods) == 14  # 7 linears x 2 layers
    assert sum(isinstance(m, QuantLoraLinear) for m in mods) == 14
    trainer.train()
    trainer.save_model()
    state = json.loads((tmp_path / "o" / "qat_config.json").read_text())
    assert state["finetune"] == "lora" and state["lora"]["r"] == 4
    assert state["quant"]["weight"]["width"] == 4


FORMATS = {
    "bfp_w4a4": {
        "weight": {"format": "bfp", "width": 4, "block_size": 16},
        "activation": {"format": "bfp", "width": 4, "block_size": 16},
        "matmul": {"format": "bfp", "width": 4, "block_size": 16},
    },
    "mxfp4_w4a4": {"weight": {"format": "mxfp4"}, "activation": {"format": "mxfp4"}},
    "bof4s_opq_a4": {
        "weight": {"format": "bof4s", "block_size": 32, "outliers": "opq"},
        "activation": {"format": "bfp", "width": 4, "block_size": 16},
    },
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_decoder_export_round_trip_with_generate(tmp_path, name, capsys):
    from transformers import AutoModelForCausalLM

    from qat.runs.build import build_model

    quant = {**FORMATS[name], "exclude": ["lm_head"]}
    recipe = lm_recipe(tmp_path, quant=quant)
    out = tmp_path / "export"
    assert export_main([recipe, "--out", str(out), "--device", "cpu"]) == 0
    built = build_model(recipe, head="causal_lm", device=torch.device("cpu"))
    ref, tok = built.model, built.tokenizer
    packed = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(packed).__name__ == "LlamaForCausalLM"
    ids = tok("the tower is tall and old", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(packed(input_ids=ids).logits, ref(input_ids=ids).logits)
        kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        gen = packed.generate(ids, **kw)
        assert gen.shape[1] == ids.shape[1] + 6
        assert torch.equal(gen, ref.generate(ids, **kw))


def test_lora_decoder_run_exports_and_generates(tmp_path):
    """QAT LoRA on a decoder (a CAUSAL_LM adapter on W + BA), then the run folder exported:
    the merged, packed model has the logits of the quantised base + adapter."""
    from transformers import AutoModelForCausalLM

    from qat.runs.build import build_model

    recipe = lm_recipe(tmp_path, finetune="lora", lora={"r": 4, "alpha": 8}, max_steps=2)
    assert train_main([recipe]) == 0
    run_dir = tmp_path / "out"
    assert json.loads((run_dir / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    out = tmp_path / "export"
    assert export_main([str(run_dir), "--out", str(out), "--device", "cpu"]) == 0
    built = build_model(str(run_dir), head="causal_lm", device=torch.device("cpu"))
    ref, tok = built.model, built.tokenizer
    packed = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tok("the tower is tall", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            packed(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )  # merging W + BA rounds once
        assert (
            packed.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0).shape[1]
            == ids.shape[1] + 4
        )


@pytest.mark.parametrize("head_quantised", [True, False])
def test_sft_and_qat_trainers_compute_the_same_loss(tmp_path, head_quantised):
    """Issue #21: TRL's fused head multiplies by lm_head.weight directly; with a quantised head
    QATSFTTrainer must still score the quantised model, as QATTrainer does."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainingArguments
    from trl import SFTTrainer

    from qat.integrations.trl import QATSFTTrainer
    from qat.models import load_tokenizer
    from qat.training.trainer import QATTrainer

    path = make_tiny_causal_lm_dir(tmp_path)
    ids = torch.randint(1000, 2000, (2, 16), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.numpy(), "labels": ids.numpy()})
    quant = {
        "weight": {"format": "bfp", "width": 3, "block_size": 16},
        "activation": {"format": "bfp", "width": 3, "block_size": 16},
        "exclude": [] if head_quantised else ["lm_head"],
    }
    losses = {}
    for name, cls in (("qat", QATTrainer), ("sft", QATSFTTrainer)):
        args = TrainingArguments(
            output_dir=str(tmp_path / name),
            use_cpu=True,
            report_to="none",
            max_steps=1,
            save_strategy="no",
        )
        trainer = cls(
            model=AutoModelForCausalLM.from_pretrained(path),
            args=args,
            train_dataset=data,
            processing_class=load_tokenizer(path),
            quant_config=quant,
        )
        trainer.model.eval()
        batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad():
            losses[name] = trainer.compute_loss(trainer.model, dict(batch)).item()
            if name == "sft" and head_quantised:  # TRL's own path: a float head's loss
                fused = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch)).item()
    assert losses["sft"] == pytest.approx(losses["qat"], rel=1e-5)
    if head_quantised:
        assert abs(fused - losses["qat"]) > 1e-3  # the bypass this guards against is real
