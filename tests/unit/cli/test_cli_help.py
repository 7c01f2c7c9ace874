"""``qat --help`` and ``qat <command> --help``: exit 0, usage on stdout, nothing on stderr, in a
fresh interpreter (so heavy imports on the help path show up as the warnings they print).
``import qat`` stays light and still registers the "qat" quant method with transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qat.cli import COMMANDS

# These commands' modules still import torch at import time (the formats package); the qat/cli/
# split gives every command a thin parser. strict: a pass here is news.
HEAVY: set[str] = set()


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


def test_top_level_help():
    for flag in ("--help", "-h"):
        r = _run("-m", "qat.cli", flag)
        assert (r.returncode, r.stderr) == (0, "")
        assert r.stdout.startswith("usage: qat <command> [args...]")
        assert all(f"  {name} " in r.stdout for name in COMMANDS)


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(
            c,
            marks=pytest.mark.xfail(
                strict=True, reason=f"qat {c} imports torch before parsing its options"
            ),
        )
        if c in HEAVY
        else c
        for c in COMMANDS
    ],
)
def test_command_help_answers_without_heavy_imports(command):
    code = (
        "import sys\nfrom qat.cli import main\nrc = main([sys.argv[1], '--help'])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules)\n"
        "print('HEAVY', heavy)\nsys.exit(rc)\n"
    )
    r = _run("-c", code, command)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.lstrip().lower().startswith("usage:")
    assert r.stdout.rstrip().endswith("HEAVY []")


def test_unknown_command_is_one_line_and_exit_2():
    r = _run("-m", "qat.cli", "trian")
    assert r.returncode == 2 and r.stderr.startswith("qat: unknown command 'trian'\n")


def test_import_qat_is_light_and_still_registers_the_quant_method():
    code = (
        "import sys, qat\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "from transformers import AutoModelForSequenceClassification  # noqa\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING as M\n"
        "print('qat' in M, qat.make_format({'format': 'bfp'}).bits_per_element)\n"
    )
    r = _run("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "4.5"]
    # transformers first, qat second: registered at once
    code = (
        "import transformers.quantizers\nimport qat  # noqa\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M\n"
        "print('qat' in M)\n"
    )
    r = _run("-c", code)
    assert (r.returncode, r.stdout.strip()) == (0, "True"), r.stderr


def test_fit_commands_spell_the_library_constants():
    """qat codebook / fit-lobcq parse options without importing torch, so they spell the
    library's choices and defaults themselves: they must agree."""
    from qat.cli import codebook as cli_codebook
    from qat.cli import fit_lobcq as cli_lobcq
    from qat.formats.fit import codebook, lobcq

    assert cli_codebook.KINDS == tuple(codebook.KINDS)
    for name in ("METRICS", "METHODS", "DEFAULT_SAMPLES", "DEFAULT_ITERS", "DEFAULT_TOL"):
        assert getattr(cli_codebook, name) == getattr(codebook, name), name
    assert cli_lobcq.DEFAULT_MAX_BLOCKS == lobcq.DEFAULT_MAX_BLOCKS
