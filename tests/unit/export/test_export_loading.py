"""Loading exports: they load without trust_remote_code after a bare ``import qat`` (fresh
interpreter), ``pkg://a.b/dir`` locates a package without running its code, and ``qat
perplexity`` / ``qat generate`` on an export say plainly what exports are for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import REPO, error_lines, make_tiny_causal_lm_dir, tiny_recipe

W4 = {"weight": {"format": "bfp", "width": 4, "block_size": 16}, "exclude": []}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qat.export.packed import write_packed
    from qat.quant.quantize import quantize_model
    from qat.runs.build import build_model

    tmp = tmp_path_factory.mktemp("exports")
    built = build_model(tiny_recipe(tmp), [], num_labels=2)
    classifier = write_packed(built.model, tmp / "classifier", built.tokenizer)
    lm_dir = make_tiny_causal_lm_dir(tmp)
    lm = quantize_model(AutoModelForCausalLM.from_pretrained(lm_dir), W4)
    decoder = write_packed(lm, tmp / "decoder", AutoTokenizer.from_pretrained(lm_dir))
    return {"classifier": classifier, "decoder": decoder}


# What docs/deploy.md shows, and nothing else imported first: transformers' modelling module is
# not loaded when from_pretrained reads the export's config.json.
FRESH = """
import sys
import qat
from transformers import {auto}
model = {auto}.from_pretrained(sys.argv[1])
print(type(model).__name__, "transformers.modeling_utils" in sys.modules)
"""


@pytest.mark.parametrize(
    "kind, auto, cls",
    [
        ("classifier", "AutoModelForSequenceClassification", "BertForSequenceClassification"),
        ("decoder", "AutoModelForCausalLM", "LlamaForCausalLM"),
    ],
)
def test_export_loads_without_trust_remote_code_after_import_qat(exports, kind, auto, cls):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    p = subprocess.run(
        [sys.executable, "-c", FRESH.format(auto=auto), str(exports[kind])],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=str(REPO),
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == [cls, "True"]


def test_import_qat_alone_still_imports_no_modelling_code():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    code = (
        "import sys, qat; print(sorted(m for m in ('torch', 'transformers.modeling_utils') "
        "if m in sys.modules))"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert p.stdout.strip() == "[]", p.stderr


@pytest.mark.parametrize("command", ["perplexity", "generate"])
def test_commands_on_an_export_say_what_exports_are_for(exports, tmp_path, capsys, command):
    from qat.cli.generate import main as generate_main
    from qat.cli.perplexity import main as perplexity_main

    out = exports["decoder"]
    argv = (
        [str(out), "--output", str(tmp_path / "p.json")]
        if command == "perplexity"
        else [str(out), "--prompt", "hi"]
    )
    rc = (perplexity_main if command == "perplexity" else generate_main)(argv)
    err = error_lines(capsys)
    assert rc == 2 and err == [
        f"qat {command}: error: model {str(out)!r} is a qat export (packed weights, model_type "
        "qat_packed): exports are for transformers' from_pretrained and inference engines; "
        "give the run folder or checkpoint it was exported from"
    ]


def test_pkg_path_of_a_subpackage_runs_none_of_its_code(tmp_path, monkeypatch):
    from qat.models import resolve_model_path

    root = tmp_path / "site"
    (root / "heavypkg" / "models" / "tiny").mkdir(parents=True)
    boom = "raise RuntimeError('imported')\n"
    (root / "heavypkg" / "__init__.py").write_text(boom)
    (root / "heavypkg" / "models" / "__init__.py").write_text(boom)
    monkeypatch.syspath_prepend(str(root))
    path = resolve_model_path("pkg://heavypkg.models/tiny")
    assert path == str(root / "heavypkg" / "models" / "tiny")
    assert "heavypkg" not in sys.modules and "heavypkg.models" not in sys.modules
    from qat.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="package 'heavypkg.nothere' is not installed"):
        resolve_model_path("pkg://heavypkg.nothere/tiny")
    assert "heavypkg" not in sys.modules
    assert torch.tensor(1).item() == 1


def test_perplexity_of_a_recipe_naming_an_export(exports, tmp_path, capsys):
    from qat.cli.perplexity import main as perplexity_main

    out = exports["decoder"]
    recipe = tiny_recipe(tmp_path, model_name_or_path=str(out), quant=None)
    rc = perplexity_main([recipe, "--output", str(tmp_path / "p.json")])
    err = error_lines(capsys)
    assert rc == 2 and len(err) == 1 and f"model {str(out)!r} is a qat export" in err[0], err
