"""Recipe parsing: files, overrides, validation messages, and the save/resume round trip."""

from pathlib import Path

import pytest
import yaml
from tiny import REPO

from qat.runs.recipe.load import load_recipe
from qat.runs.recipe.text import RecipeError, parse_overrides

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_parses(path):
    if "search" in yaml.safe_load(path.read_text()):  # a `qat search` recipe
        from qat.analysis.search import read_recipe_and_spec

        recipe, spec, _ = read_recipe_and_spec(str(path), [])
        assert spec.trials >= 64
    else:
        import torch

        data = yaml.safe_load(path.read_text())
        # a GPU recipe's bf16 is refused by TrainingArguments where no GPU is
        cpu = ["--bf16", "false"] if data.get("bf16") and not torch.cuda.is_available() else []
        recipe = load_recipe(path, cpu)
    decoder = "wikitext" in path.name or "chat" in path.name
    assert recipe.args.task_name == (
        "chat" if "chat" in path.name else "causal_lm" if decoder else "sst2"
    )
    engine = {"q4_0": "ggml_q4_0", "mxfp4_gguf": "mxfp4", "bof4s": "bof4s", "lobcq": "lobcq"}
    engine["w4a4_best"] = "lobcq"  # the best W4A4 measured (docs/results/decoders.md)
    fmt = next((f for key, f in engine.items() if key in path.name), "bfp")
    assert recipe.args.quant.weight["format"] == fmt
    if fmt == "lobcq":  # every role in LO-BCQ, attention matmuls included
        assert recipe.args.quant.activation["format"] == recipe.args.quant.matmul["format"] == fmt
    elif fmt not in ("bfp", "bof4s"):  # an engine's recipe: its matmul input, float attention
        assert recipe.args.quant.activation["format"] == "ggml_q8_0"
        assert recipe.args.quant.matmul is None
    if decoder:  # lm_head stays float in every decoder recipe
        assert recipe.args.quant.exclude == ["lm_head"]


def test_overrides_nested_and_null():
    r = load_recipe(
        REPO / "recipes/minilm_sst2.yaml",
        [
            "--max_steps",
            "7",
            "--learning_rate",
            "1e-4",
            "--quant.weight.width",
            "6",
            "--finetune=classifier",
        ],
    )
    assert r.args.max_steps == 7 and r.args.learning_rate == 1e-4
    assert r.args.quant.weight["width"] == 6 and r.args.quant.activation["width"] == 4
    assert r.args.finetune == "classifier"
    assert r.resolved["quant"]["weight"]["width"] == 6
    assert load_recipe(REPO / "recipes/minilm_sst2.yaml", ["--quant", "null"]).args.quant is None


def test_override_into_null_section_is_explained():
    with pytest.raises(RecipeError, match="quant is null"):
        load_recipe(
            REPO / "recipes/minilm_sst2.yaml", ["--quant", "null", "--quant.weight.width", "6"]
        )


def test_parse_overrides_values():
    assert parse_overrides(["--a", "1e-4", "--b", "null", "--c=[x, y]", "--flag"]) == {
        "a": 1e-4,
        "b": None,
        "c": ["x", "y"],
        "flag": True,
    }


def test_round_trip_through_save(tmp_path):
    r = load_recipe(
        REPO / "recipes/minilm_sst2.yaml",
        [
            "--quant.matmul",
            "null",
            "--output_dir",
            str(tmp_path / "run"),
            "--quant.overrides",
            "{'.*intermediate.*': {weight: {width: 6}}}",
        ],
    )
    saved = r.save(tmp_path / "run")
    again = load_recipe(saved)
    assert again.args == r.args
    assert again.args.to_dict() == r.args.to_dict()
    assert yaml.safe_load(saved.read_text())["quant"]["matmul"] is None


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


BASE = "model_name_or_path: x\ntask_name: sst2\n"


@pytest.mark.parametrize(
    "body,needles",
    [
        ("learning_rat: 1.0e-4\n", ["learning_rat", "learning_rate"]),
        ("quant:\n  weight: {format: bfq, width: 4}\n", ["quant.weight", "bfq", "valid formats"]),
        ("quant:\n  weight: {format: bfp, width: 1}\n", ["quant.weight", "width", "1"]),
        ("quant:\n  weight: {format: bfp, block_size: 0}\n", ["block_size", "0"]),
        ("quant:\n  wieght: {format: bfp}\n", ["quant.wieght", "quant.weight"]),
        ("max_steps: ten\n", ["max_steps", "ten"]),
        ("finetune: everything\n", ["finetune", "everything"]),
    ],
)
def test_bad_recipes_name_key_and_value(tmp_path, body, needles):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, BASE + body))
    for needle in needles:
        assert needle in str(e.value)


def test_unknown_task(tmp_path):
    with pytest.raises(RecipeError, match="'sst3'.*sst2"):
        load_recipe(write(tmp_path, "model_name_or_path: x\ntask_name: sst3\n"))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_unsafe_yaml_is_rejected(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, BASE + "x: !!python/object/apply:os.system ['true']\n"))


def test_billion_laughs_is_refused_at_the_first_alias(tmp_path):
    """Nine levels of nine aliases would expand to 387 million strings; refused while parsing,
    before any expansion (this test would hang and eat memory otherwise)."""
    levels = "abcdefghi"
    text = (
        BASE
        + "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
        + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip(levels, levels[1:]))
    )
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, text))
    assert str(e.value) == (
        f"recipe file {str(tmp_path / 'r.yaml')!r} line 4: YAML alias *a is "
        "not allowed in a recipe (aliases can expand without bound); write "
        "the value out"
    )


def test_anchor_without_alias_and_inline_merge_are_fine(tmp_path):
    r = load_recipe(write(tmp_path, BASE + "quant: &q\n  weight: {<<: {format: bfp}, width: 5}\n"))
    assert r.args.quant.weight["width"] == 5 and r.args.quant.weight["format"] == "bfp"


@pytest.mark.parametrize(
    "body,message",
    [
        ("seed: 1\nseed: 2\n", "line 4: duplicate key 'seed' (first on line 3)"),
        (
            "quant:\n  weight: {format: bfp, width: 4, width: 6}\n",
            "line 4: duplicate key 'width' (first on line 4)",
        ),
        ("lora:\n  r: 4\n  r: 8\n", "line 5: duplicate key 'r' (first on line 4)"),
        ("task_name: rte\n", "line 3: duplicate key 'task_name' (first on line 2)"),
    ],
)
def test_duplicate_keys_name_key_and_line(tmp_path, body, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, BASE + body))
    assert str(e.value) == (
        f"recipe file {str(tmp_path / 'r.yaml')!r} {message}; a key may appear once per mapping"
    )


def test_same_key_in_different_mappings_is_not_a_duplicate(tmp_path):
    r = load_recipe(
        write(
            tmp_path,
            BASE + "quant:\n  weight: {format: bfp, width: 4}\n"
            "  activation: {format: bfp, width: 4}\n",
        )
    )
    assert r.args.quant.activation["width"] == 4


@pytest.mark.parametrize(
    "make,message",
    [
        (
            lambda p: p.write_text("a: " + "[" * 3000 + "]" * 3000 + "\n"),
            "is nested too deeply to be a recipe",
        ),
        (
            lambda p: p.write_bytes(BASE.encode() + b"output_dir: caf\xe9\n"),
            "line 3: not valid UTF-8 (byte 0xe9)",
        ),
        (
            lambda p: p.write_text(BASE + "# padding\n" * 200_000),
            "is larger than 1048576 bytes; not a recipe",
        ),
        (lambda p: p.mkdir(), "is a directory, expected a recipe .yaml file"),
    ],
)
def test_hostile_recipe_files(tmp_path, make, message):
    path = tmp_path / "r.yaml"
    make(path)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert message in str(e.value) and str(path) in str(e.value)
    assert "\n" not in str(e.value)


def test_recipe_loader_is_a_safe_loader():
    from qat.runs.recipe.text import _RecipeLoader

    assert issubclass(_RecipeLoader, yaml.SafeLoader)
    assert not issubclass(_RecipeLoader, yaml.FullLoader)


@pytest.mark.parametrize(
    "override,message",
    [
        (["--learning_rate", "-1e-4"], "learning_rate must be finite and >= 0, got -0.0001"),
        (["--learning_rate", ".nan"], "learning_rate must be a number, got nan"),
        (["--max_grad_norm", "nan"], "max_grad_norm must be a number, got nan"),
        (
            ["--num_train_epochs", "inf"],
            "num_train_epochs must be > 0 and finite when max_steps is not set, got inf",
        ),
        (["--data_seed", "-3"], "data_seed must be in [0, 2**32) (numpy's seed range), got -3"),
        (
            ["--eval_accumulation_steps", "0"],
            "eval_accumulation_steps must be >= 1 (or null), got 0",
        ),
        (["--label_smoothing_factor", "1"], "label_smoothing_factor must be in [0, 1), got 1"),
        (["--adam_epsilon", "-1e-8"], "adam_epsilon must be finite and >= 0, got -1e-08"),
        (
            ["--max_eval_samples", "0"],
            "max_eval_samples must be >= 1 (or null for every row), got 0",
        ),
    ],
)
def test_values_that_would_fail_later(tmp_path, override, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, BASE), override)
    assert str(e.value) == f"{str(tmp_path / 'r.yaml')}: {message}"


# --- the typed config (issue #12 item 3) ---------------------------------------------------


def test_recipe_args_is_one_training_arguments_config():
    from transformers import TrainingArguments

    from qat.runs.recipe.config import QATConfig

    r = load_recipe(REPO / "recipes/minilm_sst2.yaml", ["--max_steps", "7"])
    assert isinstance(r.args, QATConfig) and isinstance(r.args, TrainingArguments)
    assert r.args.max_steps == 7 and not hasattr(r, "training_args")  # one name: args
    # what qat.analysis.search does for its float model: a replaced args is the config
    import dataclasses

    floated = dataclasses.replace(r, args=dataclasses.replace(r.args, quant=None))
    assert floated.args.quant is None and floated.args.max_steps == 7
    assert r.args.quant is not None
    # rebuilding from a built config (its TrainingArguments already normalised) changes nothing
    assert dataclasses.replace(r.args) == r.args


def test_config_to_dict_is_plain_data():
    import json

    r = load_recipe(REPO / "recipes/minilm_sst2.yaml", ["--finetune", "lora", "--lora.r", "4"])
    d = json.loads(json.dumps(r.args.to_dict()))
    assert d["quant"] == r.args.quant.to_dict() and d["lora"]["r"] == 4
    assert d["finetune"] == "lora" and d["output_dir"] == "outputs/minilm_sst2"


def test_config_built_in_python_is_checked_too():
    from qat.quant.config import QuantConfig
    from qat.runs.recipe.config import QATConfig

    c = QATConfig(
        model_name_or_path="x",
        task_name="sst2",
        output_dir="o",
        quant={"weight": {"format": "bfp", "width": 5}},
        lora={"r": 2},
    )
    assert isinstance(c.quant, QuantConfig) and c.quant.weight["width"] == 5 and c.lora.r == 2
    with pytest.raises(RecipeError) as e:
        QATConfig(model_name_or_path="x", task_name="sst2", output_dir="o", on_nonfinite="x")
    assert str(e.value) == "on_nonfinite must be 'stop' or 'skip'; got 'x'"


@pytest.mark.parametrize(
    "body,message",
    [
        ("max_length: long\n", "max_length has the wrong type: got 'long' (str), expected int"),
        (
            "finetune: 5\n",
            "finetune has the wrong type: got 5 (int), expected "
            "Literal['full', 'lora', 'classifier']",
        ),
        (
            "max_train_samples: [1]\n",
            "max_train_samples has the wrong type: got [1] (list), expected int | None",
        ),
        ("lora: {r: 2.5}\n", "lora.r has the wrong type: got 2.5 (float), expected int"),
        (
            "learning_rate: fast\n",
            "learning_rate has the wrong type: got 'fast' (str), expected float",
        ),
    ],
)
def test_type_errors_name_key_value_and_resolved_type(tmp_path, body, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, BASE + body))
    assert str(e.value) == f"{tmp_path / 'r.yaml'}: {message}"


def test_yaml_coercions_still_apply(tmp_path):
    r = load_recipe(
        write(
            tmp_path,
            BASE + "learning_rate: 5e-5\nsave_strategy: no\nresume_from_checkpoint: true\n",
        )
    )
    assert r.args.learning_rate == 5e-5
    assert r.args.save_strategy == "no"
    assert r.args.resume_from_checkpoint == "true"


def test_recipe_modules_never_call_eval():
    import ast

    import qat.runs.recipe.load

    folder = Path(qat.runs.recipe.load.__file__).parent
    paths = sorted(folder.glob("*.py"))
    assert len(paths) >= 8  # load, text, types, sections, checks, arguments, config, __init__
    for path in paths:
        tree = ast.parse(path.read_text())
        calls = [
            n.func.id
            for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
        ]
        assert "eval" not in calls and "exec" not in calls, path.name


def test_parser_argparse_side_raises_instead_of_exiting():
    from qat.runs.recipe.load import QATParser

    with pytest.raises(RecipeError, match="argument --max_steps/--max-steps: invalid int value"):
        QATParser().parse_args_into_dataclasses(["--max_steps", "ten"], look_for_args_file=False)


def test_every_qat_key_has_help_and_is_listed_by_train_help(capsys):
    import dataclasses

    from qat.cli.train import main
    from qat.runs.recipe.arguments import LoraArguments, QATArguments
    from qat.runs.recipe.config import QATConfig

    assert main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # help text wraps
    config_fields = {f.name for f in dataclasses.fields(QATConfig)}
    for cls, prefix in ((QATArguments, ""), (LoraArguments, "lora.")):
        for f in dataclasses.fields(cls):
            assert f.name in config_fields or prefix
            assert f.metadata.get("help"), f.name
            if f.name != "lora":
                assert f"--{prefix}{f.name} " in out and f.metadata["help"] in out, f.name
