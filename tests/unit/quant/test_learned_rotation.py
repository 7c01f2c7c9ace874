"""Learned rotations and smoothing scales (``quant.rotation.learned``): they train in their own
optimiser group, stay orthonormal, never change the float function, bake into an ordinary
model equal to the trained one, survive run folders and resume, and are refused where the
weights do not train."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from tiny import lm_recipe, make_tiny_model_dir, tiny_recipe

from qat.quant.ste import FakeQuantizer
from qat.quant.transforms.layout import model_layout
from qat.quant.transforms.learned import ATTR, bake, learned_parameters
from qat.training.trainer import QATTrainer

W4 = {"format": "bfp", "width": 4, "exponent_width": 8, "block_size": 16}
LEARNED = {"rotation": True, "smooth": True, "lr": 0.05}


def _quant(**learned):
    return {
        "weight": {**W4},
        "activation": {**W4},
        "matmul": {**W4, "block_size": 12},
        "rotation": {
            "residual": "hadamard",
            "heads": "hadamard",
            "online": {"size": "full"},
            "learned": {**LEARNED, **learned},
        },
    }


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=48,  # 48 = 12 x 4: a non-power-of-two width
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _quantizers(model, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, FakeQuantizer):
            m.enabled = on


def _train(tmp_path, steps: int = 6):
    import datasets

    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(2, 64, (16,), generator=g).tolist() for _ in range(8)]
    data = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    args = transformers.TrainingArguments(
        str(tmp_path / "t"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
    )
    original = _model()
    trainer = QATTrainer(
        model=copy.deepcopy(original), args=args, train_dataset=data, quant_config=_quant()
    )
    trainer.train()
    return original, trainer


IDS = torch.randint(2, 60, (2, 12), generator=torch.Generator().manual_seed(2))


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("learned"))


def test_learned_rotations_train_in_their_own_group_and_stay_orthonormal(trained):
    _, trainer = trained
    model = trainer.model
    owner = getattr(model, ATTR)
    group = [g for g in trainer.optimizer.param_groups if g.get("initial_lr") == LEARNED["lr"]]
    assert len(group) == 1 and group[0]["weight_decay"] == 0.0
    assert {id(p) for p in group[0]["params"]} == {id(p) for p in learned_parameters(model)}
    for r in [owner.r1, *owner.r2]:
        q = r.matrix().detach()
        eye = torch.eye(q.shape[0])
        assert (q @ q.T - eye).abs().max() < 1e-5  # orthonormal after the steps
        assert (q - eye).abs().max() > 1e-3  # and it did move
    assert owner.smooth.detach().abs().max() > 1e-3


def test_learned_transforms_never_change_the_float_function():
    """Whatever the rotations and scales, the float model is the fused one (its norms are
    weight-free): only what the quantisers see changes. (Training also moves the norm
    weights, which then act in the learned basis: the bake below keeps that.)"""
    from qat.quant.quantize import quantize_model

    original = _model()
    model = quantize_model(copy.deepcopy(original), _quant()).eval()
    _quantizers(model, False)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in learned_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        assert _rel(model(IDS).logits, original(IDS).logits) < 1e-4
        _quantizers(model, True)
        moved = model(IDS).logits
        for p in learned_parameters(model):
            p.zero_()
        assert _rel(model(IDS).logits, moved) > 1e-3  # what the quantisers see did change


def test_the_baked_model_equals_the_trained_one(trained):
    _, trainer = trained
    model = copy.deepcopy(trainer.model).eval()
    with torch.no_grad():
        quantised = model(IDS).logits
        _quantizers(model, False)
        trained_float = model(IDS).logits
        bake(model, model_layout(model))
        assert not hasattr(model, ATTR) and not learned_parameters(model)
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        assert _rel(model(IDS).logits, trained_float) < 1e-4
        _quantizers(model, True)
        # quantised, a rounding may flip a few values at most
        assert _rel(model(IDS).logits, quantised) < 1e-2


def test_a_learned_run_folder_is_rebuilt_and_baked(tmp_path):
    from qat.cli.perplexity import main as perplexity_main
    from qat.cli.train import main as train_main

    quant = _quant()
    quant["matmul"] = {**W4}  # tiny LM: head_dim 16
    recipe = lm_recipe(
        tmp_path, quant=quant, max_steps=3, max_eval_samples=5, do_train=True, do_eval=True
    )
    assert train_main([recipe]) == 0
    run = tmp_path / "out"
    from safetensors import safe_open

    with safe_open(str(run / "model.safetensors"), "pt") as f:
        assert any(k.startswith(f"{ATTR}.") for k in f.keys())  # saved unbaked, for resume
    ev = json.loads((run / "eval_results.json").read_text())
    assert perplexity_main([str(run), "--chunk_size", "32", "--max_chunks", "5"]) == 0
    ppl = json.loads((run / "perplexity.json").read_text())
    assert ev["eval_loss"] == pytest.approx(ppl["mean_loss"], rel=1e-4)
    from qat.runs.build import build_model

    model = build_model(str(run), head="causal_lm").model
    assert not hasattr(model, ATTR)  # baked: an ordinary fused model


def test_resume_restores_the_learned_transforms(tmp_path):
    """Four steps straight equal two, a checkpoint, and two more resumed from it."""
    import shutil

    from safetensors.torch import load_file

    from qat.cli.train import main as train_main

    quant = _quant()
    quant["matmul"] = {**W4}
    common = dict(quant=quant, max_steps=4, save_strategy="steps", save_steps=2, do_train=True)
    straight = lm_recipe(tmp_path, name="a.yaml", output_dir=str(tmp_path / "a"), **common)
    assert train_main([straight]) == 0
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a/checkpoint-2", tmp_path / "b/checkpoint-2")
    resumed = lm_recipe(tmp_path, name="b.yaml", output_dir=str(tmp_path / "b"), **common)
    assert train_main([resumed, "--resume_from_checkpoint", "true"]) == 0
    a, b = load_file(tmp_path / "a/model.safetensors"), load_file(tmp_path / "b/model.safetensors")
    keys = [k for k in a if k.startswith(ATTR)]
    assert keys and a.keys() == b.keys()
    two = load_file(tmp_path / "a/checkpoint-2/model.safetensors")
    assert not torch.allclose(two[keys[0]], a[keys[0]])  # the last two steps moved them
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


@pytest.mark.parametrize("finetune", ["classifier", "lora"])
def test_learned_rotation_needs_full_finetuning(tmp_path, capsys, no_model, finetune):
    from qat.cli.train import main

    recipe = tiny_recipe(tmp_path, finetune=finetune, quant=_quant())
    assert main([recipe]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("qat train")]
    assert len(err) == 1
    want = "quant.rotation.learned trains rotations and smoothing scales, which finetune"
    assert f"{want} {finetune} cannot" in err[0]


def test_learned_rotation_of_a_layernorm_model_is_refused_before_loading(
    tmp_path, capsys, no_model
):
    from qat.cli.train import main

    recipe = tiny_recipe(
        tmp_path, model_name_or_path=make_tiny_model_dir(tmp_path, "opt"), quant=_quant()
    )
    assert main([recipe]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("qat train")]
    assert len(err) == 1 and "learned transforms are implemented for RMSNorm decoders" in err[0]
