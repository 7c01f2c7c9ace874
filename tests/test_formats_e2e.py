"""Every registered format trains end to end: a tiny OPT, W/A/matmul all in that format,
QATTrainer steps, finite loss, weights move. LO-BCQ also from a fitted codebook file in a
recipe, used for weights and activations."""

import pytest
import torch
from datasets import Dataset
from tiny import tiny_model
from transformers import TrainingArguments

from qat.formats import FORMATS
from qat.quant.modules import QuantLinear
from qat.training.trainer import QATTrainer


def tiny_dataset(n=16, seq=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 100, (n, seq), generator=g)
    return Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": [[1] * seq] * n,
            "labels": [i % 2 for i in range(n)],
        }
    )


def train_two_steps(tmp_path, spec):
    model = tiny_model("opt")
    before = model.model.decoder.layers[0].fc1.weight.detach().clone()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
    )
    trainer = QATTrainer(
        model=model,
        args=args,
        train_dataset=tiny_dataset(),
        quant_config={"weight": spec, "activation": spec, "matmul": spec},
    )
    result = trainer.train()
    fc1 = trainer.model.model.decoder.layers[0].fc1
    assert isinstance(fc1, QuantLinear) and fc1.weight_quantizer.fmt.name == spec["format"]
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(fc1.weight, before)
    return trainer


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_format_trains_end_to_end(tmp_path, name):
    train_two_steps(tmp_path, {"format": name})


def test_lobcq_from_fitted_codebook_file_in_a_recipe(tmp_path):
    from qat.formats.fit.lobcq import fit_lobcq, save_codebooks
    from qat.runs.recipe.load import load_recipe

    torch.manual_seed(0)
    codebooks, history = fit_lobcq(torch.randn(64 * 256), num_codebooks=4, iters=3)
    path = tmp_path / "cb.json"
    save_codebooks(str(path), codebooks, 8, 64)
    spec = {"format": "lobcq", "num_codebooks": 4, "codebook_file": str(path)}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model_name_or_path: x\ntask_name: sst2\nquant:\n  weight: {spec}\n"
        f"  activation: {spec}\n  matmul: null\n"
    )
    quant = load_recipe(recipe).args.quant
    assert quant.weight == spec and quant.activation == spec
    trainer = train_two_steps(tmp_path / "run", quant.weight)
    fmt = trainer.model.model.decoder.layers[0].fc1.activation_quantizer.fmt
    assert fmt.codebook_file == str(path) and fmt.bits_per_element == 4 + 2 / 8 + 8 / 64
