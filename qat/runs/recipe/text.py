"""Recipe text -> a mapping: the YAML file (``load_recipe_dict``) and command-line values
(``parse_value``, ``parse_overrides``, ``apply_override``); and ``RecipeError``, the error of
every recipe module.

The file is read as safe YAML without aliases or duplicate keys, bounded in size, UTF-8.
Command-line values are read as YAML and merged in the order given; nested keys take dots
(``--quant.weight.width 6``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from qat.errors import ConfigError, decode_utf8


class RecipeError(ConfigError):
    """A recipe or override is invalid; the message names the key (and file) and the value."""


def parse_value(text: str) -> Any:
    """A command-line value as YAML would read it, plus numbers like ``1e-4``."""
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as e:  # e.g. 'a: b: c'; YAML's own message spans several lines
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise RecipeError(
            f"value {text!r} is not valid YAML ({problem}); quote it for a "
            f"string, e.g. \"'{text}'\""
        ) from None
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
                example = (
                    "'{teacher: self}'"
                    if i == 0 and part == "distill"
                    else "'{format: bfp, width: 4}'"
                )
                raise RecipeError(
                    f"--{dotted}: {'.'.join(parts[: i + 1])} is null in this recipe; set the "
                    f"whole section, e.g. --{'.'.join(parts[: i + 1])} {example}"
                )
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
                "in a recipe (aliases can expand without bound); write the value out"
            )
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
                raise _RecipeSyntaxError(
                    f"line {line}: duplicate key {key!r} (first on line "
                    f"{first}); a key may appear once per mapping"
                )
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
        raise RecipeError(f"recipe {str(p)!r} is not a regular file, expected a recipe .yaml file")
    with p.open("rb") as f:
        raw = f.read(MAX_RECIPE_BYTES + 1)
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"recipe file {str(p)!r} is larger than {MAX_RECIPE_BYTES} bytes; not a recipe"
        )
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
        raise RecipeError(f"recipe file {str(p)!r} is nested too deeply to be a recipe") from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(
            f"recipe file {str(p)!r} must hold a mapping of keys, got {type(data).__name__}"
        )
    return data
