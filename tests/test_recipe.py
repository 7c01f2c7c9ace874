"""Recipe parsing: files, overrides, validation messages, and the save/resume round trip."""

from pathlib import Path

import pytest
import yaml

from qat.recipe import RecipeError, load_recipe, parse_overrides

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_parses(path):
    recipe = load_recipe(path)
    assert recipe.args.task_name == "sst2"
    assert recipe.args.quant.weight["format"] == "bfp"


def test_overrides_nested_and_null():
    r = load_recipe(REPO / "recipes/minilm_sst2.yaml",
                    ["--max_steps", "7", "--learning_rate", "1e-4", "--quant.weight.width", "6",
                     "--finetune=classifier"])
    assert r.training_args.max_steps == 7 and r.training_args.learning_rate == 1e-4
    assert r.args.quant.weight["width"] == 6 and r.args.quant.activation["width"] == 4
    assert r.args.finetune == "classifier"
    assert r.resolved["quant"]["weight"]["width"] == 6
    assert load_recipe(REPO / "recipes/minilm_sst2.yaml", ["--quant", "null"]).args.quant is None


def test_override_into_null_section_is_explained():
    with pytest.raises(RecipeError, match="quant is null"):
        load_recipe(REPO / "recipes/minilm_sst2.yaml", ["--quant", "null",
                                                         "--quant.weight.width", "6"])


def test_parse_overrides_values():
    assert parse_overrides(["--a", "1e-4", "--b", "null", "--c=[x, y]", "--flag"]) == {
        "a": 1e-4, "b": None, "c": ["x", "y"], "flag": True}


def test_round_trip_through_save(tmp_path):
    r = load_recipe(REPO / "recipes/minilm_sst2.yaml",
                    ["--quant.matmul", "null", "--output_dir", str(tmp_path / "run"),
                     "--quant.overrides", "{'.*intermediate.*': {weight: {width: 6}}}"])
    saved = r.save(tmp_path / "run")
    again = load_recipe(saved)
    assert again.args == r.args
    assert again.training_args.to_dict() == r.training_args.to_dict()
    assert yaml.safe_load(saved.read_text())["quant"]["matmul"] is None


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


BASE = "model_name_or_path: x\ntask_name: sst2\n"


@pytest.mark.parametrize("body,needles", [
    ("learning_rat: 1.0e-4\n", ["learning_rat", "learning_rate"]),
    ("quant:\n  weight: {format: bfq, width: 4}\n", ["quant.weight", "bfq", "valid formats"]),
    ("quant:\n  weight: {format: bfp, width: 1}\n", ["quant.weight", "width", "1"]),
    ("quant:\n  weight: {format: bfp, block_size: 0}\n", ["block_size", "0"]),
    ("quant:\n  wieght: {format: bfp}\n", ["quant.wieght", "quant.weight"]),
    ("max_steps: ten\n", ["max_steps", "ten"]),
    ("finetune: everything\n", ["finetune", "everything"]),
])
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
