"""The recipe file and its overrides, split into the recipe and its parsed ``search:`` spec,
whose choices are checked against the recipe's base formats before any model loads."""

from __future__ import annotations

import copy

from qat.analysis.search.space import space_combos
from qat.analysis.search.spec import SearchError, parse_spec
from qat.runs.recipe.load import build_recipe
from qat.runs.recipe.text import apply_override, load_recipe_dict, parse_overrides


def read_recipe_and_spec(path: str, overrides: list[str]):
    """The recipe (overrides applied, ``search`` taken out) and its parsed search spec."""

    data = load_recipe_dict(path)
    search = data.pop("search", None)
    search = copy.deepcopy(search) if isinstance(search, dict) else search
    for key, value in parse_overrides(overrides).items():
        if key == "search":
            search = value
        elif key.startswith("search."):
            if not isinstance(search, dict):
                search = {}
            apply_override(search, key[len("search.") :], value)
        else:
            apply_override(data, key, value)  # build_recipe names unknown keys
    spec = parse_spec(search)
    recipe = build_recipe(data, str(path))
    if recipe.args.quant is None:
        raise SearchError(
            "the recipe's quant section is null: the search needs it as the base "
            "formats whose fields it varies"
        )
    space_combos(spec, recipe.args.quant)
    return recipe, spec, data
