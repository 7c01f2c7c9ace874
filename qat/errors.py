"""The one family of errors ``qat`` raises for bad input (ground floor: imports nothing).

The library raises a ``QatError`` subclass with one line that names the offending key, file or
value; only the commands in ``qat.cli`` turn it into ``qat <command>: error: ...`` and exit 2.
Failures that are not the user's input (a bug, a diverged run) are other exceptions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any


class QatError(ValueError):
    """Bad input found before (or instead of) doing the work: one line, exit code 2.

    Every qat error derives from it, so one ``except`` catches them all:

    >>> import qat
    >>> try:
    ...     qat.make_format({"format": "bfp", "width": 99})
    ... except qat.QatError as e:
    ...     print(type(e).__name__, "-", e)
    FormatError - bfp.width must be in [2, 24], got 99"""


class UsageError(QatError):
    """A bad path, option or combination given to a command or to the train loop."""


class DataError(QatError):
    """Bad or missing data: a dataset file, column, split or text."""


class ConfigError(QatError):
    """A configuration value (a recipe key) that cannot work with this model or data."""


class ExportError(QatError):
    """A model or format that cannot be written in an export, or an ``--out`` it may not
    write (here so ``qat.files`` can raise it for the export's destination rules)."""


def decode_utf8(
    raw: bytes, where: str, error: type[QatError], encoding: str = "utf-8", hint: str = ""
) -> str:
    """``raw`` decoded, or one ``error`` line naming ``where``, the line and the bad byte
    (``encoding``: ``utf-8-sig`` drops a BOM)."""
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise error(
            f"{where} line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}){hint}"
        ) from None


def check_one_of(
    key: str, value: object, choices: Iterable[object], error: type[QatError], *, hint: bool = False
) -> None:
    """Raise ``error("<key> must be one of a, b; got <value>")`` unless ``value`` is one of
    ``choices``: the one wording of every "pick one of these" key (``hint``: end with
    ``did_you_mean``).

    >>> from qat.errors import ConfigError, check_one_of
    >>> try:
    ...     check_one_of("quant.backend", "tritn", ("eager", "triton"), ConfigError, hint=True)
    ... except ConfigError as e:
    ...     print(e)
    quant.backend must be one of eager, triton; got 'tritn' (did you mean 'triton'?)"""
    choices = tuple(choices)
    if value not in choices:
        names = [str(c) for c in choices]
        raise error(
            f"{key} must be one of {', '.join(names)}; got {value!r}"
            f"{did_you_mean(value, names) if hint else ''}"
        )


def check_section(d: Any, cls: type, prefix: str, error: type[Exception]) -> None:
    """A recipe section (``quant:``, ``qdec:``) must be a mapping whose keys are ``cls``'s
    dataclass fields; else one ``error`` line naming the key, with a did-you-mean."""
    if not isinstance(d, Mapping):
        raise error(f"{prefix} must be a mapping or null, got {d!r}")
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in valid:
            raise error(
                f"unknown key {prefix}.{key}{did_you_mean(key, valid, prefix)}; "
                f"valid keys: {', '.join(valid)}"
            )


def did_you_mean(word: object, choices: Iterable[str], section: str | None = None) -> str:
    """The hint every "unknown ..." error ends with: ``" (did you mean 'x'?)"`` for the choice
    closest to ``word``, or ``""`` when none is close. ``section`` (e.g. ``"quant"``): the
    choices are keys of that recipe section, suggested bare as the user types them,
    ``" (did you mean quant.weight?)"``."""
    import difflib  # only when an error is being written

    close = difflib.get_close_matches(str(word), list(choices), n=1)
    if not close:
        return ""
    return (
        f" (did you mean {close[0]!r}?)"
        if section is None
        else f" (did you mean {section}.{close[0]}?)"
    )
