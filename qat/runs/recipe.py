"""Recipes: flat YAML (TRL / alignment-handbook style) + command-line overrides -> dataclasses.

Keys are the field names of ``RecipeArguments`` (ours) and of ``transformers.TrainingArguments``,
so ``learning_rate: 2e-5`` in a file and ``--learning_rate 2e-5`` on the command line are the
same thing. Nested keys take dots on the command line (``--quant.weight.width 6``). Everything
is validated before a model is loaded, with messages that name the key and value.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainingArguments

from qat.errors import ConfigError
from qat.quant.config import QuantConfig, QuantConfigError

FINETUNE_MODES = ("full", "lora", "classifier")


class RecipeError(ConfigError):
    """A recipe or override is invalid; the message names the key (and file) and the value."""


@dataclasses.dataclass
class LoraArguments:
    """LoRA settings (``finetune: lora``). ``target_modules: null`` targets every quantised
    linear. Dropout must stay 0: the quantiser sees the effective weight ``W + BA``, and input
    dropout on the adapter path has no such form."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None


@dataclasses.dataclass
class RecipeArguments:
    """The recipe keys that are not TrainingArguments."""

    model_name_or_path: str | None = None
    task_name: str | None = None
    gguf_file: str | None = None
    tokenizer_name_or_path: str | None = None
    torch_dtype: str | None = None
    max_length: int = 128
    data_dir: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    finetune: str = "full"
    lora: LoraArguments = dataclasses.field(default_factory=LoraArguments)
    quant: QuantConfig | None = None
    on_nonfinite: str = "stop"
    # Trainer's convention (dropped from TrainingArguments in transformers 5): a new run into a
    # folder that holds a run is refused unless this is true (qat.training.run.check_run_folder).
    overwrite_output_dir: bool = False
    # --- decoders (task_name causal_lm / chat; qat.tasks.language_modeling, qat.tasks.chat) ---
    dataset_name: str | None = None  # a Hub dataset; null or "wikitext": WikiText-2 raw
    dataset_config: str | None = None
    text_column: str = "text"
    train_file: str | None = None  # local .txt / .jsonl / .json, instead of dataset_name
    validation_file: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    block_size: int = 1024  # tokens per training / evaluation chunk (chat: per row, at most)
    trainer: str = "qat"  # qat (QATTrainer) | sft (TRL's SFTTrainer: qat.integrations.trl)


@dataclasses.dataclass
class Recipe:
    """A parsed recipe: our arguments, Trainer's arguments, and the resolved dict to save."""

    args: RecipeArguments
    training_args: TrainingArguments
    resolved: dict[str, Any]
    source: str | None = None

    def save(self, output_dir: str | os.PathLike) -> Path:
        """Write the resolved recipe (file + overrides) as ``recipe.yaml``."""
        path = Path(output_dir) / "recipe.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.resolved, sort_keys=False))
        return path


_TA_FIELDS = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
_OUR_FIELDS = {f.name: f for f in dataclasses.fields(RecipeArguments)}
_ALL_KEYS = sorted(set(_TA_FIELDS) | set(_OUR_FIELDS))


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_value(text: str) -> Any:
    """A command-line value as YAML would read it, plus numbers like ``1e-4``."""
    value = yaml.safe_load(text) if text != "" else ""
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
        out[key.replace("-", "_") if "." not in key else key] = parse_value(text)
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
                raise RecipeError(
                    f"--{dotted}: {'.'.join(parts[: i + 1])} is null in this recipe; set the "
                    f"whole section, e.g. --{'.'.join(parts[: i + 1])} "
                    "'{format: bfp, width: 4}'")
            else:
                nxt = cur[part] = {}
        if not isinstance(nxt, dict):
            raise RecipeError(f"--{dotted}: {'.'.join(parts[: i + 1])} is {nxt!r}, not a mapping")
        cur = nxt
    cur[parts[-1]] = value


def _type_ok(value: Any, annotation: Any) -> bool:
    """Loose runtime check of YAML scalars against a dataclass annotation."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"types": types})  # noqa: S307
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
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


def _admits_bool(annotation: Any) -> bool:
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"types": types})  # noqa: S307
    return annotation is bool or bool in typing.get_args(annotation)


def _coerce(value: Any, field: dataclasses.Field) -> Any:
    """YAML 1.1 reads ``5e-5`` as a string and ``no`` as false; accept numeric strings for
    numeric fields and read false as "no" for string fields (``save_strategy: no``)."""
    if value is False and _type_ok("no", field.type) and not _admits_bool(field.type):
        return "no"
    if isinstance(value, str) and not _type_ok(value, field.type):
        for conv in (int, float):
            try:
                converted = conv(value)
            except ValueError:
                continue
            if _type_ok(converted, field.type):
                return converted
    return value


def _check_type(key: str, value: Any, field: dataclasses.Field, where: str) -> None:
    if not _type_ok(value, field.type):
        raise RecipeError(f"{where}{key} has the wrong type: got {value!r} "
                          f"({type(value).__name__}), expected {field.type}")


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
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise RecipeError(f"recipe file {str(p)!r} line {line}: not valid UTF-8 (byte "
                          f"0x{raw[e.start]:02x})") from None
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


def build_recipe(data: dict[str, Any], source: str | None = None) -> Recipe:
    """Validate a recipe mapping and build the argument dataclasses."""
    where = f"{source}: " if source else ""
    for key in data:
        if key not in _OUR_FIELDS and key not in _TA_FIELDS:
            raise RecipeError(f"{where}unknown recipe key {key!r}{_suggest(key, _ALL_KEYS)}")
    ours: dict[str, Any] = {}
    for key, field in _OUR_FIELDS.items():
        if key not in data or key in ("lora", "quant"):
            continue
        ours[key] = _coerce(data[key], field)
        _check_type(key, ours[key], field, where)
    for req in ("model_name_or_path", "task_name"):
        if not ours.get(req):
            raise RecipeError(f"{where}recipe key {req!r} is required")
    if ours.get("finetune", "full") not in FINETUNE_MODES:
        raise RecipeError(f"{where}finetune must be one of {', '.join(FINETUNE_MODES)}; "
                          f"got {ours['finetune']!r}")
    if ours.get("on_nonfinite", "stop") not in ("stop", "skip"):
        raise RecipeError(f"{where}on_nonfinite must be 'stop' or 'skip'; "
                          f"got {ours['on_nonfinite']!r}")
    for key in ("max_length", "max_train_samples", "max_eval_samples"):
        if ours.get(key) is not None and ours[key] < 1:
            rule = ">= 1" if key == "max_length" else ">= 1 (or null for every row)"
            raise RecipeError(f"{where}{key} must be {rule}, got {ours[key]!r}")
    from qat.tasks.glue import GLUE_TASKS
    from qat.tasks.language_modeling import LM_TASKS

    tasks = [*GLUE_TASKS, *LM_TASKS]
    if ours["task_name"] not in tasks:
        raise RecipeError(f"{where}unknown task_name {ours['task_name']!r}"
                          f"{_suggest(str(ours['task_name']), tasks)}; valid tasks: "
                          f"{', '.join(tasks)}")
    _check_decoder_values(ours, where)
    ours["lora"] = _build_lora(data.get("lora") or {}, where)
    try:
        ours["quant"] = QuantConfig.from_dict(data.get("quant"))
    except QuantConfigError as e:
        raise RecipeError(f"{where}{e}") from None
    targs = {k: v for k, v in data.items() if k in _TA_FIELDS}
    if isinstance(targs.get("resume_from_checkpoint"), bool):  # `true`: the last checkpoint
        targs["resume_from_checkpoint"] = "true" if targs["resume_from_checkpoint"] else None
    for key, value in targs.items():
        targs[key] = _coerce(value, _TA_FIELDS[key])
        _check_type(key, targs[key], _TA_FIELDS[key], where)
    if not targs.get("output_dir"):
        stem = Path(source).stem if source else "run"
        targs["output_dir"] = str(Path("outputs") / stem)
    _check_training_values(targs, where)
    try:
        training_args = TrainingArguments(**targs)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{where}invalid training arguments: {e}") from None
    resolved = dict(data)
    resolved["output_dir"] = targs["output_dir"]
    resolved["quant"] = None if ours["quant"] is None else ours["quant"].to_dict()
    return Recipe(RecipeArguments(**ours), training_args, resolved, source)


def _check_decoder_values(ours: dict[str, Any], where: str) -> None:
    """The decoder keys (task_name causal_lm / chat): values, and combinations that cannot work."""
    if ours.get("block_size", 1024) < 2:
        raise RecipeError(f"{where}block_size must be >= 2, got {ours['block_size']!r}")
    if ours.get("trainer", "qat") not in ("qat", "sft"):
        raise RecipeError(f"{where}trainer must be 'qat' or 'sft'; got {ours['trainer']!r}")
    if "text_column" in ours and not ours["text_column"]:
        raise RecipeError(f"{where}text_column must name a column, got "
                          f"{ours.get('text_column')!r}")
    if ours["task_name"] not in ("causal_lm", "chat"):
        if ours.get("trainer", "qat") != "qat":
            raise RecipeError(f"{where}trainer {ours['trainer']!r} needs task_name causal_lm "
                              f"or chat, not {ours['task_name']!r}")
        return
    if ours["task_name"] == "chat" and not (ours.get("dataset_name") or ours.get("train_file")):
        raise RecipeError(f"{where}task_name chat needs dataset_name or train_file (rows with "
                          "messages, or prompt and completion)")
    if bool(ours.get("train_file")) != bool(ours.get("validation_file")):
        raise RecipeError(f"{where}train_file and validation_file go together (got only "
                          f"{'train_file' if ours.get('train_file') else 'validation_file'}); "
                          "give both, or neither and a dataset_name")
    if ours.get("finetune") == "classifier":
        raise RecipeError(f"{where}finetune classifier trains a classification head, which "
                          f"task_name {ours['task_name']} has none of; use full or lora")


def _check_training_values(targs: dict[str, Any], where: str) -> None:
    """Values TrainingArguments accepts but that fail (or silently do nothing) later: checked
    here so the error names the key before any model is loaded."""
    def get(key: str) -> Any:
        return targs.get(key, _TA_FIELDS[key].default)

    def bad(key: str, rule: str) -> RecipeError:
        return RecipeError(f"{where}{key} must be {rule}, got {get(key)!r}")

    for key, value in targs.items():
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
        raise RecipeError(f"{where}num_train_epochs must be > 0 and finite when max_steps is "
                          f"not set, got {epochs!r}")
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
            raise RecipeError(f"{where}{key} must be > 0 when {strategy} is 'steps', "
                              f"got {get(key)!r}")


def _build_lora(d: Any, where: str) -> LoraArguments:
    if not isinstance(d, dict):
        raise RecipeError(f"{where}lora must be a mapping, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(LoraArguments)}
    for key, value in d.items():
        if key not in fields:
            raise RecipeError(f"{where}unknown key lora.{key}{_suggest(key, list(fields))}; "
                              f"valid keys: {', '.join(fields)}")
        _check_type(f"lora.{key}", value, fields[key], where)
    lora = LoraArguments(**d)
    if lora.r < 1:
        raise RecipeError(f"{where}lora.r must be >= 1, got {lora.r}")
    if lora.alpha < 1:
        raise RecipeError(f"{where}lora.alpha must be >= 1, got {lora.alpha}")
    if lora.target_modules is not None:
        names = lora.target_modules
        if not names or not all(isinstance(n, str) and n for n in names):
            raise RecipeError(f"{where}lora.target_modules must be a non-empty list of module "
                              f"names (strings) or null for every quantised linear; got "
                              f"{names!r}")
    if lora.dropout != 0:
        raise RecipeError(f"{where}lora.dropout must be 0 with quantised LoRA (the quantiser "
                          f"sees W + BA, which input dropout has no form for); got {lora.dropout}")
    return lora


def load_recipe(path: str | os.PathLike, overrides: list[str] | dict[str, Any] | None = None
                ) -> Recipe:
    """Read a recipe file, apply overrides, validate; raises RecipeError on bad input."""
    data = load_recipe_dict(path)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        top = key.split(".")[0]
        if top not in _OUR_FIELDS and top not in _TA_FIELDS:
            raise RecipeError(f"unknown option --{key}{_suggest(top, _ALL_KEYS)}")
        apply_override(data, key, value)
    return build_recipe(data, str(path))
