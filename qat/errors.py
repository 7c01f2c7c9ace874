"""The one family of errors ``qat`` raises for bad input (ground floor: imports nothing).

The library raises a ``QatError`` subclass with one line that names the offending key, file or
value; only the commands in ``qat.cli`` turn it into ``qat <command>: error: ...`` and exit 2.
Failures that are not the user's input (a bug, a diverged run) are other exceptions.
"""

from __future__ import annotations


class QatError(ValueError):
    """Bad input found before (or instead of) doing the work: one line, exit code 2."""


class UsageError(QatError):
    """A bad path, option or combination given to a command or to the train loop."""


class DataError(QatError):
    """Bad or missing data: a dataset file, column, split or text."""


class ConfigError(QatError):
    """A configuration value (a recipe key) that cannot work with this model or data."""


def decode_utf8(raw: bytes, where: str, error: type[QatError], encoding: str = "utf-8",
                hint: str = "") -> str:
    """``raw`` decoded, or one ``error`` line naming ``where``, the line and the bad byte
    (``encoding``: ``utf-8-sig`` drops a BOM)."""
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise error(f"{where} line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}){hint}"
                    ) from None
