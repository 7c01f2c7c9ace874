"""``--device`` (issue #8 item 6): eval, perplexity, profile and export put the model and its
batches on the resolved device (the GPU when there is one, as ``qat train`` does).

This machine has no GPU, so the move itself is checked with a resolver patched to return the
``meta`` device: a forward pre-hook sees where the model's inputs and weights are, then stops
the run (a meta tensor has no values to compute metrics from).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import make_tiny_glue_dir, make_tiny_model_dir, one_error_line, tiny_recipe

import qat.analysis.profile
import qat.evaluation.evaluate
import qat.evaluation.perplexity
import qat.exporting
import qat.models
import qat.runs.build
import qat.runs.entry
from qat.models import DeviceError, resolve_device


@pytest.fixture()
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture()
def one_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_resolve_without_a_gpu(no_cuda) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(
        DeviceError,
        match=r"^--device 'cuda': no CUDA GPU is available on this "
        r"machine; use --device cpu \(or auto\)$",
    ):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="'cuda:0': no CUDA GPU"):
        resolve_device("cuda:0")


def test_resolve_with_a_gpu(one_cuda) -> None:
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device(None, use_cpu=True) == torch.device("cpu")  # the recipe's use_cpu
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"'cuda:1': this machine has 1 CUDA device\(s\)"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "cuda:0:1", "CPU", "", "tpu"])
def test_malformed_device_strings(spec: str) -> None:
    with pytest.raises(
        DeviceError, match=f"^--device {spec!r} is not one of cpu, cuda, cuda:N, auto$"
    ):
        resolve_device(spec)


@pytest.mark.parametrize("command", ["eval", "perplexity", "profile", "export"])
def test_cuda_without_a_gpu_is_one_clear_error(
    tmp_path, no_cuda, wikitext_dir, monkeypatch, capsys, command
) -> None:
    import importlib

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("model loaded despite an unusable --device")

    monkeypatch.setattr(qat.models, "load_sequence_classifier", fail)
    monkeypatch.setattr(qat.models, "load_causal_lm", fail)
    module = {
        "eval": "qat.cli.eval",
        "perplexity": "qat.cli.perplexity",
        "profile": "qat.cli.profile",
        "export": "qat.cli.export",
    }[command]
    extra = ["--out", str(tmp_path / "packed")] if command == "export" else []
    argv = [tiny_recipe(tmp_path), "--device", "cuda", *extra]
    assert importlib.import_module(module).main(argv) == 2
    line = one_error_line(capsys.readouterr().err, command)
    assert line == (
        f"qat {command}: error: --device 'cuda': no CUDA GPU is available on this "
        "machine; use --device cpu (or auto)"
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "packed").exists()


def test_eval_on_cpu_runs_and_writes(tmp_path, capsys) -> None:
    from qat.cli.eval import main

    out = tmp_path / "r.json"
    assert (
        main(
            [
                tiny_recipe(tmp_path),
                "--device",
                "cpu",
                "--max_eval_samples",
                "8",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert 0.0 <= res["metrics"]["validation"]["accuracy"] <= 1.0


class _Seen(Exception):
    """Raised by the hook once it has recorded what the model received."""


def _spy_on_forward(monkeypatch: pytest.MonkeyPatch, seen: dict[str, Any]) -> None:
    """Resolve every device to ``meta`` and hook the loaded model's forward."""
    monkeypatch.setattr(
        qat.models, "resolve_device", lambda spec=None, use_cpu=False: torch.device("meta")
    )
    real_build_model = qat.runs.entry.build_model

    def hook(module, args, kwargs):
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        seen["inputs"] = {str(t.device) for t in tensors}
        seen["params"] = {str(p.device) for p in module.parameters()}
        raise _Seen

    def build_model(source, overrides=(), **kwargs):
        seen["device_arg"] = kwargs.get("device")
        built = real_build_model(source, overrides, **kwargs)
        built.model.register_forward_pre_hook(hook, with_kwargs=True)
        return built

    monkeypatch.setattr(qat.runs.entry, "build_model", build_model)


@pytest.mark.parametrize("command", ["eval", "perplexity", "profile"])
def test_model_and_batches_go_to_the_resolved_device(
    tmp_path, wikitext_dir, monkeypatch, command
) -> None:
    seen: dict[str, Any] = {}
    _spy_on_forward(monkeypatch, seen)
    arch = "llama" if command == "perplexity" else "bert"
    recipe = tiny_recipe(tmp_path, model_name_or_path=make_tiny_model_dir(tmp_path, arch))
    with pytest.raises(_Seen):
        if command == "eval":
            qat.evaluation.evaluate.evaluate(recipe, ["--max_eval_samples", "8"], device="cpu")
        elif command == "perplexity":
            qat.evaluation.perplexity.perplexity(recipe, chunk_size=16, max_chunks=1, device="cpu")
        else:
            qat.analysis.profile.profile(recipe, num_batches=1, device="cpu")
    assert seen["inputs"] == {"meta"}, seen  # input_ids, attention_mask, ... all moved
    assert seen["params"] == {"meta"}, seen
    assert seen["device_arg"] == torch.device("meta")


def test_export_loads_on_the_resolved_device(tmp_path, monkeypatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(
        qat.models, "resolve_device", lambda spec=None, use_cpu=False: torch.device("meta")
    )

    def build_model(source, overrides=(), **kwargs):
        seen["device"] = kwargs.get("device")
        raise _Seen

    monkeypatch.setattr(qat.runs.entry, "build_model", build_model)
    with pytest.raises(_Seen):
        qat.exporting.export_model(tiny_recipe(tmp_path), tmp_path / "packed", device="cpu")
    assert seen["device"] == torch.device("meta")
    assert not Path(tmp_path / "packed").exists()


def test_cpu_training_does_not_ask_for_pinned_memory(tmp_path) -> None:
    """Trainer pins batches by default; with no accelerator torch warns on every loader."""
    import warnings

    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        TrainingArguments,
    )

    from qat.tasks.glue import get_task, load_glue, tokenize_glue
    from qat.training.trainer import QATTrainer

    model_dir = make_tiny_model_dir(tmp_path)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    data = tokenize_glue(load_glue("sst2", make_tiny_glue_dir(tmp_path)), get_task("sst2"), tok, 32)
    # no use_cpu (which drops pinning itself): a recipe on a machine without a GPU
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), report_to="none", per_device_train_batch_size=4
    )
    assert args.dataloader_pin_memory and args.device.type == "cpu"
    trainer = QATTrainer(
        model,
        args,
        quant_config=None,
        train_dataset=data["train"],
        data_collator=DataCollatorWithPadding(tok),
    )
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        next(iter(trainer.get_train_dataloader()))
    assert not [w for w in seen if "pin_memory" in str(w.message)]
    assert trainer.args.dataloader_pin_memory is False
