"""The public API: ``from qat import ...`` names resolve lazily, and README's Python example
runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import qat

REPO = Path(__file__).resolve().parent.parent


def test_every_public_name_resolves():
    for name in qat.__all__:
        assert getattr(qat, name) is not None, name
    assert qat.QATTrainer.__module__ == "qat.training.trainer"
    assert "QATTrainer" in dir(qat)


def test_import_qat_stays_light():
    code = "import sys, qat; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]


def _runnable_blocks(text: str) -> list[str]:
    return re.findall(r"<!-- runnable[^>]*-->\n```python\n(.*?)```", text, flags=re.S)


def test_readme_python_example_runs(tmp_path):
    blocks = _runnable_blocks((REPO / "README.md").read_text())
    assert blocks, "README has no runnable Python block"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    for block in blocks:
        script = tmp_path / "example.py"
        script.write_text(block + "\nprint('final loss', trainer.state.log_history[-1])\n")
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "train_loss" in done.stdout
        assert (tmp_path / "outputs" / "py_qat").is_dir()


def test_all_lists_exactly_the_lazy_names():
    assert sorted(qat.__all__) == sorted(qat._LAZY)
