"""Non-finite losses and quantiser outputs: found, named, and stopped or skipped.

Faults are injected by a test callback that, for one optimizer step only, replaces one
quantiser's forward with one that writes an inf into its output: the model is healthy before
and after, as with a real overflow in one unlucky batch.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from tiny import W4A4_BFP, make_tiny_glue_dir, make_tiny_model_dir, tiny_recipe, tree_hashes
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainerCallback,
    TrainingArguments,
)

from qat.cli.train import main
from qat.quant.quantize import quantize_model
from qat.tasks.glue import get_task, load_glue, tokenize_glue
from qat.training.nonfinite import NonFiniteError, find_first_nonfinite
from qat.training.run import last_complete_checkpoint
from qat.training.trainer import QATTrainer

BAD = "bert.encoder.layer.1.output.dense.weight_quantizer"


def _overflowing(x: torch.Tensor) -> torch.Tensor:
    """A quantiser gone wrong: finite in, one inf out."""
    out = x.clone()
    out.view(-1)[0] = math.inf
    return out


class InjectFault(TrainerCallback):
    """Makes ``BAD`` emit an inf during optimizer step ``step`` (1-based) only, and records the
    trainable parameters around that step and the file hashes of every saved checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}
        self.saved: dict[str, dict[str, str]] = {}

    def on_step_begin(self, args, state, control, model=None, **kw):
        if state.global_step + 1 == self.step:
            model.get_submodule(BAD).forward = _overflowing
            self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == self.step:
            del model.get_submodule(BAD).forward
            self.after = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_save(self, args, state, control, **kw):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.saved[ckpt.name] = tree_hashes(ckpt)


def _trainer(tmp_path: Path, policy: str, inject: InjectFault, max_steps: int) -> QATTrainer:
    model_dir = make_tiny_model_dir(tmp_path)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    task = get_task("sst2")
    data = tokenize_glue(load_glue("sst2", make_tiny_glue_dir(tmp_path)), task, tok, 32)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        seed=0,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    return QATTrainer(
        model,
        args,
        quant_config=W4A4_BFP,
        on_nonfinite=policy,
        train_dataset=data["train"],
        processing_class=tok,
        data_collator=DataCollatorWithPadding(tok),
        callbacks=[inject],
    )


def _batch(tok, n: int = 4) -> dict[str, torch.Tensor]:
    enc = tok(["a gripping , funny film"] * n, return_tensors="pt")
    return {**enc, "labels": torch.zeros(n, dtype=torch.long)}


def test_find_first_nonfinite_names_the_quantiser_in_forward_order(tmp_path: Path) -> None:
    model_dir = make_tiny_model_dir(tmp_path)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = quantize_model(
        AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2), W4A4_BFP
    )
    batch = _batch(tok)
    assert find_first_nonfinite(model, batch) is None
    model.get_submodule(BAD).forward = _overflowing
    fault = find_first_nonfinite(model, batch)
    # Everything downstream (the linear, the layer, the model) is non-finite too; the first
    # module to return a non-finite value is the quantiser, and its input was finite.
    assert fault is not None and fault.module == BAD
    assert fault.kind == "quantiser" and fault.inf == 1 and fault.inputs_finite
    assert BAD in fault.describe() and "inputs were finite" in fault.describe()
    # Non-finite weights upstream: the first module to use them is named, even when not a
    # quantiser, and no hooks are left behind.
    del model.get_submodule(BAD).forward
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[tok.cls_token_id, 0] = math.nan
    fault = find_first_nonfinite(model, batch)
    assert fault.module == "bert.embeddings.word_embeddings" and fault.nan > 0
    assert not any(m._forward_hooks for m in model.modules())


def test_stop_names_step_and_layer_and_keeps_last_checkpoint_intact(tmp_path: Path) -> None:
    inject = InjectFault(step=5)
    trainer = _trainer(tmp_path, "stop", inject, max_steps=8)
    with pytest.raises(
        NonFiniteError,
        match=rf"at step 5; first offending layer: {BAD} "
        r"\(quantiser; output has 1 inf; its inputs",
    ):
        trainer.train()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert last_complete_checkpoint(str(out)) == str(out / "checkpoint-4")
    assert tree_hashes(out / "checkpoint-4") == inject.saved["checkpoint-4"]
    # Stopped before the optimizer step: the live weights are still those of step 4.
    for name, p in trainer.model.named_parameters():
        assert torch.isfinite(p).all(), name
        torch.testing.assert_close(p, inject.before[name], rtol=0, atol=0)


def test_skip_drops_the_step_warns_and_continues(tmp_path: Path, caplog) -> None:
    inject = InjectFault(step=3)
    trainer = _trainer(tmp_path, "skip", inject, max_steps=5)
    trainer.train()
    assert trainer.state.global_step == 5
    assert f"at step 3, first offending layer: {BAD}" in caplog.text
    assert "skipping this optimizer step" in caplog.text
    # Step 3 changed nothing; the steps around it trained; nothing is non-finite.
    for name in inject.before:
        torch.testing.assert_close(inject.after[name], inject.before[name], rtol=0, atol=0)
    trained = trainer.model.get_parameter("classifier.weight")
    assert not torch.equal(trained, inject.after["classifier.weight"])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_cli_stops_a_diverging_run_with_exit_code_1(tmp_path: Path, capsys) -> None:
    """A learning rate of 1e38 overflows the weights for real; the CLI says where and when."""
    recipe = tiny_recipe(tmp_path, max_steps=6, learning_rate=1e38)
    assert main([recipe]) == 1
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("qat train: error:"))
    assert re.match(
        r"qat train: error: non-finite training loss \((nan|inf|-inf)\) at step "
        r"\d+; first offending layer: \S+ \(",
        line,
    ), line
