"""Knowledge distillation during QAT (``distill:``): the KL / JSD maths against hand-computed
values, the token mask, the teachers (LoRA: the student itself with adapters and quantisers
off, no second weight copy; full: a frozen float copy), a tiny decoder run under QATTrainer
and under TRL logging ``task_loss`` / ``distill_loss``, and every bad input as one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny import (
    lm_recipe,
    make_tiny_causal_lm_dir,
    make_tiny_model_dir,
    one_error_line,
    tiny_recipe,
)

from qat.runs.recipe.arguments import DistillArguments
from qat.training.distill import distill_loss_sum, divergence

W4 = {
    "weight": {"format": "bfp", "width": 4, "block_size": 16},
    "activation": {"format": "bfp", "width": 4, "block_size": 16},
    "exclude": ["lm_head"],
}


pytestmark = pytest.mark.usefixtures("committed_wikitext")


# --- the maths ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_divergence_of_equal_logits_is_exactly_zero(kind, temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 50) * 4
    out = divergence(logits, logits.clone(), kind, temperature)
    assert out.shape == (3, 5) and torch.equal(out, torch.zeros(3, 5))


def _softmax(row: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def test_kl_and_jsd_equal_hand_computed_values():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[0.5, 2.5, 1.0], [2.0, 0.0, 1.0]]
    t = 2.0
    kl, jsd = [], []
    for s_row, t_row in zip(student, teacher):
        p, q = _softmax(t_row, t), _softmax(s_row, t)  # teacher p, student q
        m = [(a + b) / 2 for a, b in zip(p, q)]
        kl.append(t * t * sum(a * math.log(a / b) for a, b in zip(p, q)))
        jsd.append(
            t
            * t
            * 0.5
            * (
                sum(a * math.log(a / c) for a, c in zip(p, m))
                + sum(b * math.log(b / c) for b, c in zip(q, m))
            )
        )
    s, te = torch.tensor(student), torch.tensor(teacher)
    assert divergence(s, te, "kl", t).tolist() == pytest.approx(kl, rel=1e-5)
    assert divergence(s, te, "jsd", t).tolist() == pytest.approx(jsd, rel=1e-5)
    assert all(v > 0 for v in kl + jsd)
    # JSD is symmetric, KL is not
    assert divergence(te, s, "jsd", t).tolist() == pytest.approx(jsd, rel=1e-5)
    assert divergence(te, s, "kl", t).tolist() != pytest.approx(kl, rel=1e-3)


def test_a_class_the_teacher_rules_out_costs_nothing_and_stays_finite():
    teacher = torch.tensor([[0.0, -math.inf, 1.0]])
    student = torch.tensor([[0.3, 5.0, 1.0]], requires_grad=True)
    for kind in ("kl", "jsd"):
        out = divergence(student, teacher, kind)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(student.grad).all()


def test_masked_tokens_do_not_change_the_loss():
    """Only positions whose shifted label is not -100 count: changing the logits anywhere else
    (prompt, padding, the last position) leaves the sum and the count bit for bit unchanged."""
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    labels = torch.tensor([[-100, -100, 4, 5, 6, -100], [-100, 1, 2, -100, -100, -100]])
    total, count = distill_loss_sum(student, teacher, labels, causal=True, kind="kl")
    assert int(count) == 5
    counted = labels[:, 1:] != -100  # position i predicts token i + 1
    masked = torch.ones(2, 6, dtype=torch.bool)
    masked[:, :-1] = ~counted
    s2, t2 = student.clone(), teacher.clone()
    s2[masked] = torch.randn(int(masked.sum()), 11) * 10
    t2[masked] = torch.randn(int(masked.sum()), 11) * 10
    total2, count2 = distill_loss_sum(s2, t2, labels, causal=True, kind="kl")
    assert torch.equal(total, total2) and torch.equal(count, count2)
    # and a counted position does matter
    s2[0, 2, 0] += 3.0  # (a shift of the whole row would leave its softmax as it is)
    assert not torch.equal(distill_loss_sum(s2, t2, labels, causal=True)[0], total)
    expected = divergence(student[:, :-1][counted], teacher[:, :-1][counted]).sum()
    assert torch.allclose(total, expected)


def test_classifier_rows_are_every_example():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    total, count = distill_loss_sum(s, t, torch.tensor([0, 1, 2, 0]), causal=False, kind="jsd")
    assert int(count) == 4 and torch.allclose(total, divergence(s, t, "jsd").sum())


# --- teachers --------------------------------------------------------------------------------


def _trainer(
    tmp_path,
    finetune="full",
    quant=W4,
    distill=None,
    steps=1,
    cls=None,
    gradient_accumulation_steps=1,
    **kw,
):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainingArguments

    from qat.runs.recipe.arguments import LoraArguments
    from qat.training.trainer import QATTrainer

    path = make_tiny_causal_lm_dir(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(path)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (8, 16), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # a masked "prompt"
    data = Dataset.from_dict({"input_ids": ids.numpy(), "labels": labels.numpy()})
    args = TrainingArguments(
        output_dir=str(tmp_path / "o"),
        use_cpu=True,
        report_to="none",
        learning_rate=1e-2,
        max_steps=steps,
        save_strategy="no",
        per_device_train_batch_size=4,
        logging_steps=1,
        gradient_accumulation_steps=gradient_accumulation_steps,
        disable_tqdm=True,
    )
    return (cls or QATTrainer)(
        model=model,
        args=args,
        train_dataset=data,
        quant_config=quant,
        finetune=finetune,
        lora=LoraArguments(r=4) if finetune == "lora" else None,
        distill=distill or DistillArguments(),
        **kw,
    )


def _batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def _float_logits(tmp_path, batch):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(make_tiny_causal_lm_dir(tmp_path)).eval()
    with torch.no_grad():
        return ref(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits


def _storages(module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def test_lora_teacher_is_the_student_with_adapters_and_quantisers_off(tmp_path):
    from qat.quant.ste import FakeQuantizer
    from qat.training.teacher import AdapterOffTeacher

    trainer = _trainer(tmp_path, finetune="lora", steps=2)
    teacher = trainer.teacher
    assert isinstance(teacher, AdapterOffTeacher) and teacher.model is trainer.model
    assert not hasattr(trainer, "teacher_model")
    # no second weight copy: the teacher's parameters are the student's, storage for storage
    assert [p.data_ptr() for p in teacher.model.parameters()] == [
        p.data_ptr() for p in trainer.model.parameters()
    ]
    assert _storages(teacher.model) == _storages(trainer.model)
    trainer.train()  # the adapters move away from zero
    batch = _batch(trainer)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    got = teacher.logits(trainer.model, inputs)
    assert not got.requires_grad
    assert torch.allclose(got, _float_logits(tmp_path, batch), atol=1e-5)
    # everything is switched back on for the student
    assert all(m.enabled for m in trainer.model.modules() if isinstance(m, FakeQuantizer))
    with torch.no_grad():
        student = trainer.model(**inputs).logits
    assert not torch.allclose(student, got, atol=1e-3)


def test_full_teacher_is_a_frozen_float_copy_of_the_initial_weights(tmp_path):
    from qat.quant.ste import FakeQuantizer
    from qat.training.teacher import FrozenTeacher

    trainer = _trainer(tmp_path, finetune="full", steps=2)
    teacher = trainer.teacher
    assert isinstance(teacher, FrozenTeacher) and not teacher.model.training
    assert not _storages(teacher.model) & _storages(trainer.model)
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert not any(m.enabled for m in teacher.model.modules() if isinstance(m, FakeQuantizer))
    trainer.train()
    batch = _batch(trainer)
    got = teacher.logits(trainer.model, {k: v for k, v in batch.items() if k != "labels"})
    assert torch.allclose(got, _float_logits(tmp_path, batch), atol=1e-5)  # still the start


@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize("loss", ["kl", "jsd"])
def test_distill_term_is_exactly_zero_without_quantisers(tmp_path, finetune, loss):
    """A float student that has not trained is its own teacher: the term is 0, not ~1e-9."""
    trainer = _trainer(
        tmp_path,
        finetune=finetune,
        quant=None,
        distill=DistillArguments(loss=loss, temperature=2.0),
    )
    batch = _batch(trainer)
    trainer.model.train()
    loss_value = trainer.compute_loss(trainer.model, batch)
    task, distill = trainer._distill_step
    assert float(distill) == 0.0 and torch.equal(loss_value.detach(), task)


def test_loss_is_task_plus_weight_times_distill_on_the_same_batch(tmp_path):
    from transformers import Trainer

    trainer = _trainer(tmp_path, distill=DistillArguments(loss="jsd", temperature=1.5, weight=0.25))
    seen = []
    logits_of = trainer.teacher.logits

    def spy(model, inputs):
        seen.append(dict(inputs))
        return logits_of(model, inputs)

    trainer.teacher.logits = spy
    batch = _batch(trainer)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    assert len(seen) == 1 and "labels" not in seen[0]
    assert torch.equal(seen[0]["input_ids"], batch["input_ids"])
    task, out = Trainer.compute_loss(trainer, trainer.model, dict(batch), return_outputs=True)
    with torch.no_grad():
        teacher = _float_logits(tmp_path, batch)
    total, count = distill_loss_sum(
        out.logits, teacher, batch["labels"], causal=True, kind="jsd", temperature=1.5
    )
    assert int(count) == 4 * 11  # 15 shifted labels per row, 4 of them in the masked prompt
    expected = task + 0.25 * total / count
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


# --- runs ------------------------------------------------------------------------------------


def _log_history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def test_decoder_qat_run_with_distillation_trains_and_logs_both_losses(tmp_path, capsys):
    from qat.cli.train import main as train_main

    recipe = lm_recipe(
        tmp_path, max_steps=8, distill={"teacher": "self", "weight": 0.5, "temperature": 2.0}
    )
    assert train_main([recipe]) == 0
    logs = [h for h in _log_history(tmp_path / "out") if "loss" in h]
    assert len(logs) == 8
    for h in logs:
        assert h["distill_loss"] > 0  # the W4A4 student is not its float teacher
        assert h["loss"] == pytest.approx(h["task_loss"] + 0.5 * h["distill_loss"], rel=1e-4)
    first = sum(h["loss"] for h in logs[:3]) / 3
    assert sum(h["loss"] for h in logs[-3:]) / 3 < first - 0.3
    assert "distill_loss" in capsys.readouterr().out  # on the console too
    saved = (tmp_path / "out" / "recipe.yaml").read_text()
    assert "distill:" in saved and "weight: 0.5" in saved


def test_logged_parts_add_up_to_loss_under_gradient_accumulation(tmp_path):
    """Token-normalised over the accumulated batch, as the task loss is: the logged parts add up
    to Trainer's own ``loss`` with 2 accumulation steps too."""
    trainer = _trainer(
        tmp_path, steps=2, distill=DistillArguments(weight=0.3), gradient_accumulation_steps=2
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert h["loss"] == pytest.approx(h["task_loss"] + 0.3 * h["distill_loss"], rel=1e-4)


def test_glue_run_with_a_fine_tuned_float_teacher_folder(tmp_path):
    """A classifier student (fresh head) learns from a teacher folder holding a trained head;
    per-example mean, divided over 2 accumulation steps as Trainer divides the task loss."""
    from transformers import AutoModelForSequenceClassification

    from qat.cli.train import main as train_main

    teacher = tmp_path / "teacher"
    AutoModelForSequenceClassification.from_pretrained(
        make_tiny_model_dir(tmp_path, "bert"), num_labels=2
    ).save_pretrained(teacher)
    recipe = tiny_recipe(
        tmp_path,
        max_steps=3,
        gradient_accumulation_steps=2,
        distill={"teacher": str(teacher), "weight": 0.5},
    )
    assert train_main([recipe]) == 0
    logs = [h for h in _log_history(tmp_path / "out") if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        assert h["distill_loss"] > 0
        assert h["loss"] == pytest.approx(h["task_loss"] + 0.5 * h["distill_loss"], rel=1e-4)


def test_sft_trainer_applies_distillation(tmp_path):
    pytest.importorskip("trl")
    from transformers import Trainer

    from qat.integrations.trl import QATSFTTrainer
    from qat.models import load_tokenizer

    trainer = _trainer(
        tmp_path,
        finetune="lora",
        cls=QATSFTTrainer,
        steps=2,
        distill=DistillArguments(weight=2.0),
        processing_class=load_tokenizer(make_tiny_causal_lm_dir(tmp_path)),
    )
    batch = _batch(trainer)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    task, out = Trainer.compute_loss(trainer, trainer.model, dict(batch), return_outputs=True)
    with torch.no_grad():
        teacher = _float_logits(tmp_path, batch)
    total, count = distill_loss_sum(out.logits, teacher, batch["labels"], causal=True)
    assert float(total.detach()) > 0
    expected = task + 2.0 * total / count
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(h["distill_loss"] > 0 for h in logs)


def test_sft_recipe_with_distillation_logs_distill_loss(tmp_path):
    pytest.importorskip("trl")
    from qat.cli.train import main as train_main

    recipe = lm_recipe(tmp_path, trainer="sft", max_steps=2, distill={"loss": "jsd"})
    assert train_main([recipe]) == 0
    logs = [h for h in _log_history(tmp_path / "out") if "loss" in h]
    assert len(logs) == 2 and all(h["distill_loss"] > 0 and "task_loss" in h for h in logs)


def test_distill_section_from_the_command_line(tmp_path):
    from qat.runs.recipe.load import load_recipe

    recipe = lm_recipe(tmp_path)
    r = load_recipe(recipe, ["--distill.weight", "0.5", "--distill.loss", "jsd"])
    assert r.args.distill == DistillArguments(teacher="self", loss="jsd", weight=0.5)
    assert load_recipe(recipe).args.distill is None
    assert r.args.to_dict()["distill"]["weight"] == 0.5


# --- bad input: one line, exit 2, before any model loads -------------------------------------


def _config_only_model(tmp_path: Path, name: str, config) -> str:
    """A model folder that passes the path checks; only its config.json is ever read."""
    out = tmp_path / name
    config.save_pretrained(out)
    (out / "model.safetensors").write_bytes(b"")
    return str(out)


def _other_vocab(tmp_path: Path) -> str:
    from transformers import LlamaConfig

    return _config_only_model(
        tmp_path,
        "small-vocab",
        LlamaConfig(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        ),
    )


DECODER_ROWS = [
    (
        "unknown key",
        {"tempreature": 2},
        "unknown key distill.tempreature (did you mean distill.temperature?)",
    ),
    ("unknown loss", {"loss": "mse"}, "distill.loss must be one of kl, jsd; got 'mse'"),
    ("temperature 0", {"temperature": 0}, "distill.temperature must be finite and > 0, got 0.0"),
    ("temperature inf", {"temperature": ".inf"}, "distill.temperature must be finite and > 0"),
    ("negative weight", {"weight": -0.5}, "distill.weight must be finite and >= 0, got -0.5"),
    ("missing teacher", {"teacher": "{tmp}/no/such/teacher"}, "does not exist"),
    (
        "other architecture",
        {"teacher": "BERT"},
        "has another architecture than the model (model_type 'bert', the model's 'llama')",
    ),
    (
        "other vocabulary",
        {"teacher": "SMALL"},
        "has another vocabulary size than the model (vocab_size 1000, the model's 30522)",
    ),
]


@pytest.mark.parametrize("row", DECODER_ROWS, ids=[r[0] for r in DECODER_ROWS])
def test_bad_distill_input_fails_before_loading_the_model(row, tmp_path, no_model, capsys):
    from qat.cli.train import main as train_main

    _, distill, fragment = row
    recipe = lm_recipe(tmp_path)  # writes the tiny student
    teacher = distill.get("teacher")
    if teacher == "BERT":
        distill = {"teacher": make_tiny_model_dir(tmp_path, "bert")}
    elif teacher == "SMALL":
        distill = {"teacher": _other_vocab(tmp_path)}
    elif teacher is not None:
        distill = {"teacher": teacher.replace("{tmp}", str(tmp_path))}
    args = [recipe]
    for key, value in distill.items():
        args += [f"--distill.{key}", str(value)]
    assert train_main(args) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert fragment in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("finetune", ["classifier", "full"])
def test_self_teacher_with_a_fresh_classification_head_is_refused(
    tmp_path, no_model, capsys, finetune
):
    from qat.cli.train import main as train_main

    recipe = tiny_recipe(tmp_path, finetune=finetune, distill={"teacher": "self"})
    assert train_main([recipe]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert (
        "freshly initialised classification head" in line
        and "the float teacher would predict with the same untrained head" in line
    ), line


def test_distill_on_a_regression_task_is_refused(tmp_path, no_model, capsys):
    from qat.cli.train import main as train_main

    recipe = tiny_recipe(tmp_path, task_name="stsb", distill={})
    assert train_main([recipe]) == 2
    assert "task_name stsb is a regression" in one_error_line(capsys.readouterr().err, "train")


def test_null_distill_section_says_how_to_set_it(tmp_path):
    from qat.runs.recipe.load import load_recipe
    from qat.runs.recipe.text import RecipeError

    recipe = lm_recipe(tmp_path, distill=None)
    with pytest.raises(RecipeError, match=r"--distill '\{teacher: self\}'"):
        load_recipe(recipe, ["--distill.weight", "2"])


def test_train_help_lists_the_distill_keys(capsys):
    from qat.cli.train import main as train_main

    assert train_main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for key in (
        "--distill mapping | None",
        "--distill.teacher str",
        "--distill.loss kl|jsd",
        "--distill.temperature float",
        "--distill.weight float",
    ):
        assert key in out, key


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_the_distillation_part_of_a_step_makes_no_host_sync(tmp_path, finetune):
    """The divergence, its normalisation, backward and bookkeeping stay on the device (the
    models' forwards are transformers' business: its causal mask may sync); only ``log`` reads
    the sums back, where Trainer reads ``loss`` too."""
    from test_no_sync import no_host_sync

    trainer = _trainer(tmp_path, finetune=finetune, distill=DistillArguments(loss="jsd"))
    batch = _batch(trainer)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    teacher = trainer.teacher.logits(trainer.model, inputs)
    trainer.model.train()
    student = trainer.model(**inputs).logits
    num_items = (batch["labels"][:, 1:] != -100).sum()
    with no_host_sync():
        total, count = distill_loss_sum(
            student, teacher, batch["labels"], causal=True, kind="jsd", temperature=2.0
        )
        term = trainer._normalise_like_task(total, count, num_items)
        term.backward()
        trainer._distill_step = (term.detach(), term.detach())
        trainer._add_distill_terms(keep=True)
    assert trainer._distill_sums.shape == (2,) and float(trainer._distill_sums[0]) > 0


# --- a GGUF student's teacher, a damaged teacher folder, weight 0 -----------------------------


@pytest.fixture()
def gguf_student(tmp_path) -> dict[str, str]:
    """The tiny Llama (vocabulary 30522) as a GGUF file: model_name_or_path and gguf_file."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qat import QuantConfig, quantize_model
    from qat.exporting import export_model

    src = make_tiny_causal_lm_dir(tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(src)
    quantize_model(model, QuantConfig(weight={"format": "ggml_q8_0"}))
    folder = export_model(
        model, tmp_path / "gguf", AutoTokenizer.from_pretrained(src), to="gguf"
    ).out
    return {"model_name_or_path": str(folder), "gguf_file": "model.gguf"}


@pytest.mark.parametrize(
    "teacher,fragment",
    [
        (
            "BERT",
            "has another architecture than the model (model_type 'bert', the model's 'llama')",
        ),
        (
            "SMALL",
            "has another vocabulary size than the model (vocab_size 1000, the model's 30522)",
        ),
    ],
)
def test_a_gguf_students_teacher_is_checked_before_loading(
    teacher, fragment, gguf_student, tmp_path, no_model, capsys
):
    # every SmolLM2 recipe's student is a GGUF file: its config comes from the file's metadata
    from qat.cli.train import main as train_main

    recipe = lm_recipe(tmp_path, **gguf_student)
    path = make_tiny_model_dir(tmp_path, "bert") if teacher == "BERT" else _other_vocab(tmp_path)
    assert train_main([recipe, "--distill.teacher", path]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert fragment in line, line
    assert not (tmp_path / "out").exists()


def test_a_gguf_students_matching_teacher_passes_the_check(gguf_student, tmp_path):
    from qat.training.teacher import check_distill

    teacher = make_tiny_causal_lm_dir(tmp_path / "teacher")
    distill = DistillArguments(teacher=teacher)
    gguf = (gguf_student["model_name_or_path"], gguf_student["gguf_file"])
    check_distill(distill, None, causal=True, gguf=gguf)  # same type and vocabulary: passes


@pytest.mark.parametrize("damage", ["truncated", "empty", "header"])
def test_a_damaged_teacher_weight_file_is_one_line_before_loading(
    damage, tmp_path, no_model, capsys
):
    import shutil

    from qat.cli.train import main as train_main

    recipe = lm_recipe(tmp_path)
    teacher = tmp_path / "teacher"
    shutil.copytree(make_tiny_causal_lm_dir(tmp_path / "src"), teacher)
    weights = teacher / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        {"truncated": data[: len(data) // 2], "empty": b"", "header": b"\xff" * 64}[damage]
    )
    assert train_main([recipe, "--distill.teacher", str(teacher)]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert f"distill.teacher {str(teacher)!r}: " in line and "model.safetensors" in line, line
    assert "truncated" in line or "not a safetensors file" in line or "corrupt" in line, line
    assert not (tmp_path / "out").exists()


def test_weight_zero_builds_and_runs_no_teacher(tmp_path, monkeypatch):
    import qat.training.trainer as trainer_module  # where the trainer builds its teacher
    from qat.runs.recipe.load import load_recipe
    from qat.runs.recipe.sections import build_distill

    def no_teacher(*args, **kwargs):
        raise AssertionError("a teacher was built for distill.weight 0")

    monkeypatch.setattr(trainer_module, "make_teacher", no_teacher)
    assert build_distill({"teacher": "self", "weight": 0}) is None
    recipe = lm_recipe(tmp_path, distill={"teacher": "self", "weight": 1.0})
    assert load_recipe(recipe, ["--distill.weight", "0"]).args.distill is None
    trainer = _trainer(tmp_path, distill=DistillArguments(weight=0.0), steps=2)
    assert trainer.teacher is None and trainer.distill is None
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("distill_loss" not in h for h in logged)


def test_a_teacher_handed_over_from_python_gets_the_recipes_checks(tmp_path, monkeypatch):
    # QATTrainer(distill=...) without a recipe: the same one-line refusal before the teacher
    # loads (it was loaded unchecked)
    import qat.models
    from qat.errors import ConfigError

    def fail(*args, **kwargs):
        raise AssertionError("the teacher was loaded despite another vocabulary")

    monkeypatch.setattr(qat.models, "load_causal_lm", fail)
    teacher = _other_vocab(tmp_path)
    with pytest.raises(ConfigError, match="has another vocabulary size than the model"):
        _trainer(tmp_path, distill=DistillArguments(teacher=teacher))
