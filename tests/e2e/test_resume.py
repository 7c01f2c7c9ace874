"""A run killed with SIGKILL mid-training and resumed ends where an uninterrupted run ends.

A real ``python qat/train.py`` subprocess is SIGKILLed (by a watcher thread) as soon as
checkpoint-8 is complete on disk; it may by then be anywhere after that, even half-way through
writing checkpoint-12. It is restarted with the same recipe and must end with the weights, eval
metrics and per-step training losses of an uninterrupted run of that recipe. The reference run
and the restart go through ``qat.cli.train.main`` in this process (the CLI minus the 8 s of
imports a fresh interpreter pays), both single-threaded like the subprocess.

Tolerance: same seed, same data order, one thread, so the runs are bit-identical in practice;
we allow atol 1e-6 on weights and 1e-5 on losses and metrics for float nondeterminism, and
require equal accuracies.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import REPO, tiny_recipe

from qat.cli.train import main
from qat.training.run import last_complete_checkpoint

TRAIN = str(REPO / "qat" / "train.py")
MAX_STEPS, SAVE_STEPS, KILL_AFTER = 40, 4, 8
WEIGHT_ATOL, METRIC_ATOL = 1e-6, 1e-5


# The in-process runs use one thread, as the subprocess does (OMP_NUM_THREADS=1).
pytestmark = pytest.mark.usefixtures("one_thread")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONHASHSEED="0",
    )
    return env


def _start(recipe: str, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, TRAIN, recipe, "--output_dir", str(out)],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _parses(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def _kill_after_checkpoint(proc: subprocess.Popen, out: Path, step: int) -> None:
    """SIGKILL ``proc`` as soon as ``checkpoint-<step>`` is complete (trainer_state is written
    last, and not atomically: on a loaded machine the file exists a while before it parses)."""
    marker = out / f"checkpoint-{step}" / "trainer_state.json"
    deadline = time.monotonic() + 150
    while not _parses(marker) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)


def _run(recipe: str, out: Path, capsys, *extra: str) -> str:
    """``qat train`` in this process; returns what it printed."""
    capsys.readouterr()
    assert main([recipe, "--output_dir", str(out), *extra]) == 0
    return capsys.readouterr().out


def _step_losses(out: Path) -> dict[int, float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def _compare(ref: Path, res: Path, weights_file: str) -> None:
    a, b = load_file(ref / weights_file), load_file(res / weights_file)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=WEIGHT_ATOL, rtol=0, msg=k)
    ma = json.loads((ref / "eval_results.json").read_text())
    mb = json.loads((res / "eval_results.json").read_text())
    assert mb["eval_accuracy"] == ma["eval_accuracy"]
    assert mb["eval_loss"] == pytest.approx(ma["eval_loss"], abs=METRIC_ATOL)
    la, lb = _step_losses(ref), _step_losses(res)
    assert sorted(lb) == sorted(la) == list(range(1, MAX_STEPS + 1))
    for step in la:
        assert lb[step] == pytest.approx(la[step], abs=METRIC_ATOL), step


def _run_kill_resume(
    tmp_path: Path, recipe: str, capsys, resume_args: list[str]
) -> tuple[Path, Path]:
    """Start the victim, run the reference meanwhile, kill the victim, restart it."""
    ref, res = tmp_path / "ref", tmp_path / "killed"
    victim = _start(recipe, res)
    watcher = threading.Thread(target=_kill_after_checkpoint, args=(victim, res, KILL_AFTER))
    watcher.start()
    _run(recipe, ref, capsys)
    watcher.join()
    log, _ = victim.communicate()
    assert victim.returncode == -signal.SIGKILL, log[-3000:]
    assert not (res / "train_results.json").exists(), "the victim finished: killed too late"
    resumed_from = last_complete_checkpoint(str(res))
    assert resumed_from is not None
    done = int(resumed_from.rsplit("-", 1)[1])
    assert KILL_AFTER <= done < MAX_STEPS
    out = _run(recipe, res, capsys, *resume_args)
    # The restart trained only the steps after its checkpoint (Trainer prints one log a step).
    assert out.count("'loss'") == MAX_STEPS - done, out[-3000:]
    return ref, res


def test_sigkill_then_resume_matches_uninterrupted_w4a4_bfp(tmp_path: Path, capsys) -> None:
    """Full fine-tuning, W4A4 BFP: ``--resume_from_checkpoint true`` picks the last checkpoint."""
    recipe = tiny_recipe(
        tmp_path, max_steps=MAX_STEPS, save_strategy="steps", save_steps=SAVE_STEPS
    )
    ref, res = _run_kill_resume(tmp_path, recipe, capsys, ["--resume_from_checkpoint", "true"])
    _compare(ref, res, "model.safetensors")


def test_sigkill_then_auto_resume_restores_lora_and_quant(tmp_path: Path, capsys, caplog) -> None:
    """LoRA with ``resume_from_checkpoint: true`` in the recipe: rerunning the same command
    resumes. The restart is given a different mode and width on purpose: the checkpoint's
    qat_config.json (LoRA, W4A4) must win, or the result would differ from the reference."""
    recipe = tiny_recipe(
        tmp_path,
        max_steps=MAX_STEPS,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        finetune="lora",
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
        resume_from_checkpoint=True,
    )
    ref, res = _run_kill_resume(
        tmp_path, recipe, capsys, ["--finetune", "full", "--quant.weight.width", "6"]
    )
    assert "using its quant config and finetune mode (lora)" in caplog.text
    state = json.loads((res / "qat_config.json").read_text())
    assert state["finetune"] == "lora" and state["lora"]["r"] == 4
    assert state["quant"]["weight"]["width"] == 4
    _compare(ref, res, "adapter_model.safetensors")
