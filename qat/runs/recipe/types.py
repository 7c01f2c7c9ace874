"""Recipe values against their annotations: YAML values checked (``type_ok``, ``check_type``)
and read the way YAML 1.1 users mean them (``coerce``) before a dataclass is built from them.
"""

from __future__ import annotations

import functools
import types
import typing
from typing import Any

from qat.runs.recipe.text import RecipeError


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations (``from __future__ import annotations`` leaves strings)."""
    return typing.get_type_hints(cls)


def type_ok(value: Any, annotation: Any) -> bool:
    """Loose runtime check of YAML values against a resolved annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, a) for a in typing.get_args(annotation))
    if origin is typing.Literal:  # the allowed values are checked with their own message
        return any(type_ok(value, type(a)) for a in typing.get_args(annotation))
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


def type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and typing.get_origin(annotation) is None:
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def coerce(value: Any, annotation: Any) -> Any:
    """YAML 1.1 reads ``5e-5`` as a string and ``no`` as false; accept numeric strings for
    numeric fields and read false as "no" for string fields (``save_strategy: no``)."""
    admits_bool = annotation is bool or bool in typing.get_args(annotation)
    if value is False and type_ok("no", annotation) and not admits_bool:
        return "no"
    if isinstance(value, str) and not type_ok(value, annotation):
        for conv in (int, float):
            try:
                converted = conv(value)
            except ValueError:
                continue
            if type_ok(converted, annotation):
                return converted
    return value


def check_type(key: str, value: Any, annotation: Any, where: str = "") -> None:
    if not type_ok(value, annotation):
        raise RecipeError(
            f"{where}{key} has the wrong type: got {value!r} "
            f"({type(value).__name__}), expected {type_name(annotation)}"
        )
