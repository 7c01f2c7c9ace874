"""What every ``qat`` command shares: its own options out of argv, ``--help``, and bad input
turned into one ``qat NAME: error: ...`` line and exit code 2 (the library raises ``QatError``;
only this layer prints and picks exit codes). Imports nothing heavy: ``--help`` answers at once."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from qat.errors import QatError, UsageError


def split_options(argv: list[str], options: dict[str, type]) -> tuple[dict[str, Any], list[str]]:
    """Take this command's own ``--name value`` options out of ``argv`` (the rest are recipe
    overrides, which ``load_recipe`` would reject as unknown keys)."""
    opts: dict[str, Any] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        key, eq, val = tok[2:].partition("=") if tok.startswith("--") else ("", "", "")
        key = key.replace("-", "_")
        if key in options:
            if not eq:
                if options[key] is bool:
                    opts[key] = True
                    i += 1
                    continue
                if i + 1 >= len(argv):
                    raise UsageError(f"option --{key} needs a value")
                val, i = argv[i + 1], i + 1
            try:
                opts[key] = (
                    options[key](val)
                    if options[key] is not bool
                    else val.lower() in ("1", "true", "yes")
                )
            except ValueError:
                raise UsageError(
                    f"option --{key}: {val!r} is not a valid {options[key].__name__}"
                ) from None
        else:
            rest.append(tok)
        i += 1
    return opts, rest


def run_cli(
    name: str,
    usage: str,
    argv: list[str] | None,
    body: Callable[[list[str]], None],
    extra_errors: tuple[type[Exception], ...] = (),
) -> int:
    """Shared ``main`` of the commands: ``--help``, then ``body(argv)``; bad input becomes one
    ``qat NAME: error: ...`` line and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    try:
        body(argv)
    except (QatError, FileNotFoundError, *extra_errors) as e:
        print(f"qat {name}: error: {e}", file=sys.stderr)
        return 2
    return 0
