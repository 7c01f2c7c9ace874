"""One recipe, three entry points, one result: ``qat train`` (the command's ``main``, in this
process), ``qat.train(recipe)`` and ``QATTrainer(model_name, args=QATConfig(**recipe))``
(its data built by the same library functions) end with bit-identical weights, for a GLUE
classifier and a decoder, full fine-tuning and LoRA, and for ``trainer: sft``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import lm_recipe, tiny_recipe

import qat
from qat.cli.train import main as train_main

CASES = [
    ("classifier", "full"),
    ("classifier", "lora"),
    ("decoder", "full"),
    ("decoder", "lora"),
    ("sft", "lora"),
]


def _recipe(tmp_path: Path, kind: str, finetune: str) -> str:
    keys = {"finetune": finetune, "max_steps": 3}
    if finetune == "lora":
        keys["lora"] = {"r": 4, "alpha": 8}
    if kind == "classifier":
        return tiny_recipe(tmp_path, **keys)
    if kind == "sft":
        keys["trainer"] = "sft"
    return lm_recipe(tmp_path, **keys)


def _python_run(recipe: str, out: Path, kind: str) -> None:
    """The recipe's keys as a QATConfig, the model by name, the data as qat train builds it."""
    from qat.models import load_tokenizer

    keys = {**yaml.safe_load(Path(recipe).read_text()), "output_dir": str(out)}
    args = qat.QATConfig(**keys)
    name = keys["model_name_or_path"]
    tokenizer = load_tokenizer(name)
    if kind == "classifier":
        from transformers import DataCollatorWithPadding

        from qat.tasks.glue import get_task, glue_splits

        raw = glue_splits(
            get_task(args.task_name),
            args.data_dir,
            train_samples=args.max_train_samples,
            eval_samples=args.max_eval_samples,
            seed=args.seed,
        )
        train = raw.tokenize(tokenizer, args.max_length)["train"]
        trainer = qat.QATTrainer(
            name, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer)
        )
    else:
        from qat.tasks.registry import get_task

        train, _, collator = get_task(args.task_name).data(args, tokenizer)
        if kind == "sft":
            trainer = qat.QATSFTTrainer(name, args=args, train_dataset=train)
        else:
            trainer = qat.QATTrainer(name, args=args, train_dataset=train, data_collator=collator)
    trainer.train()
    trainer.save_model()


def _weights(run: Path, finetune: str) -> dict[str, torch.Tensor]:
    return load_file(
        run / ("adapter_model.safetensors" if finetune == "lora" else "model.safetensors")
    )


@pytest.mark.parametrize("kind,finetune", CASES)
def test_the_three_entry_points_train_the_same_weights(
    tmp_path, committed_wikitext, kind, finetune
):
    recipe = _recipe(tmp_path, kind, finetune)
    cli, lib, py = tmp_path / "cli", tmp_path / "lib", tmp_path / "py"
    assert train_main([recipe, "--output_dir", str(cli)]) == 0
    qat.train(recipe, {"output_dir": str(lib)})
    _python_run(recipe, py, kind)
    ref = _weights(cli, finetune)
    assert ref and any("lora_B" in k for k in ref) == (finetune == "lora")
    start = yaml.safe_load(Path(recipe).read_text())["model_name_or_path"]
    if finetune == "full":  # training moved the weights: the comparison is not of a no-op
        before = load_file(Path(start) / "model.safetensors")  # a base model: no "bert." prefix
        same = {k: next(r for r in ref if r.endswith(k)) for k in before}
        assert all(before[k].shape == ref[r].shape for k, r in same.items())
        assert sum(not torch.equal(before[k], ref[r]) for k, r in same.items()) > len(same) // 2
    for run in (lib, py):
        got = _weights(run, finetune)
        assert got.keys() == ref.keys()
        for key in ref:
            assert torch.equal(got[key], ref[key]), (run.name, key)


def test_qat_train_honours_trainer_sft(tmp_path, committed_wikitext):
    """qat.train(recipe) ran QATTrainer whatever the recipe's trainer said (only
    the command read it); both now take it from the library's trainer table."""
    recipe = lm_recipe(tmp_path, trainer="sft", max_steps=1)
    qat.train(recipe, {"output_dir": str(tmp_path / "lib")})
    args = torch.load(tmp_path / "lib" / "training_args.bin", weights_only=False)
    assert type(args).__name__ == "QATSFTConfig" and args.trainer == "sft"
    assert args.quant.weight["width"] == 4  # qat's keys travel in TRL's config
