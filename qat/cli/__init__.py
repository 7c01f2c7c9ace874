"""The ``qat`` command: ``qat <subcommand> ...``; each subcommand lives in its own module."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("qat.cli.train", "fine-tune a model from a recipe (QAT, LoRA, classifier-only)"),
    "eval": ("qat.cli.eval", "GLUE evaluation of a recipe (PTQ) or a QAT checkpoint"),
    "perplexity": (
        "qat.cli.perplexity",
        "WikiText-2 perplexity of a causal LM under a quant config",
    ),
    "lm-eval": ("qat.cli.lm_eval", "lm-evaluation-harness tasks on a quantised causal LM"),
    "generate": ("qat.cli.generate", "stream greedy generation; tokens/s without and with QDEC"),
    "profile": ("qat.cli.profile", "per-layer statistics, SQNR and plots"),
    "export": ("qat.cli.export", "write a packed quantised model (safetensors)"),
    "codebook": ("qat.cli.codebook", "fit BOF4 / BOF4-S codebook levels to a file"),
    "fit-lobcq": ("qat.cli.fit_lobcq", "calibrate frozen LO-BCQ codebooks to a file"),
    "search": ("qat.cli.search", "mixed-precision search (Optuna): Pareto front, best.yaml"),
    "sensitivity": ("qat.cli.sensitivity", "accuracy drop of lowering one module at a time"),
}


def usage() -> str:
    lines = ["usage: qat <command> [args...]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "run 'qat <command> --help' for a command's options"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return quiet_broken_pipe(lambda: _main(argv))


def quiet_broken_pipe(run: Callable[[], int]) -> int:
    """``run()``, except that a reader that left (``qat train --help | head``) ends the
    command quietly, with the shell's SIGPIPE status, instead of a BrokenPipeError traceback."""
    try:
        return run()
    except BrokenPipeError:
        # stdout is flushed again at exit: point it at /dev/null so that flush cannot fail
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"qat: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except SystemExit as e:  # argparse's --help / usage errors: their code, as a return value
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)


if __name__ == "__main__":
    sys.exit(main())
