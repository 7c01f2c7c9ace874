"""Format names -> classes, and ``make_format(spec)`` with errors that list what is valid."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from qat.errors import did_you_mean
from qat.formats.base import Format, FormatError

FORMATS: dict[str, type[Format]] = {}


def register_format(name: str):
    """Class decorator: make a Format selectable as ``{format: name}``."""

    def wrap(cls: type[Format]) -> type[Format]:
        if name in FORMATS:
            raise ValueError(f"format {name!r} registered twice")
        cls.name = name
        FORMATS[name] = cls
        return cls

    return wrap


def format_params(name: str) -> list[str]:
    """The parameter names a format accepts."""
    return [f.name for f in dataclasses.fields(FORMATS[name])]


def make_format(spec: Mapping[str, Any] | Format) -> Format:
    """Build a format from ``{"format": name, **params}``; a Format passes through.

    >>> import torch, qat
    >>> fmt = qat.make_format({"format": "bfp", "width": 4, "block_size": 16})
    >>> print(fmt)
    bfp(width=4, exponent_width=8, block_size=16)
    >>> fmt.quantize(torch.tensor([[0.1, -0.5, 1.0, 2.0] * 4]))[0, :4]
    tensor([ 0.0000, -0.5000,  1.0000,  1.7500])"""
    if isinstance(spec, Format):
        return spec
    if not isinstance(spec, Mapping):
        raise FormatError(f"a format spec must be a mapping with a 'format' key, got {spec!r}")
    params = dict(spec)
    name = params.pop("format", None)
    if name is None:
        raise FormatError(
            f"format spec {dict(spec)!r} has no 'format' key; valid formats: "
            f"{', '.join(sorted(FORMATS))}"
        )
    if name not in FORMATS:
        raise FormatError(
            f"unknown format {name!r}{did_you_mean(name, FORMATS)}; "
            f"valid formats: {', '.join(sorted(FORMATS))}"
        )
    valid = format_params(name)
    for key in params:
        if key == "scale" and key not in valid:
            with_scale = sorted(n for n in FORMATS if "scale" in format_params(n))
            raise FormatError(
                f"format {name!r} has no scale choice (got scale: {params[key]!r}); "
                f"scale: max | mse works with {', '.join(with_scale)}"
            )
        if key not in valid:
            raise FormatError(
                f"format {name!r} has no parameter {key!r}{did_you_mean(key, valid)}; "
                "valid parameters: "
                f"{', '.join(valid) or '(none)'}"
            )
    return FORMATS[name](**params)
