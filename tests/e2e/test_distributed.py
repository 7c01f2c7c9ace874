"""Two processes (DDP on CPU, gloo) give the result of one process with the same global batch.

The 2-process run goes through ``torchrun --nproc_per_node 2 qat/train.py``. ``accelerate
launch`` is the documented launcher for GPUs (launch/*.yaml), but on CPU it starts several
local processes only through ``mpirun`` (its MULTI_CPU launcher needs an MPI hostfile), which
this machine does not have; torchrun is what a CPU user runs, and Trainer picks up its
environment the same way (WORLD_SIZE / RANK, gloo backend). The reference is one process with
per_device_train_batch_size 8, run through ``qat.cli.train.main`` in this process.

Tolerance: the two runs see the same samples in the same order (rank r takes every other
batch of 4 from the same seeded permutation), and the gradient is the mean over the same 8
samples, summed in a different order (per-rank mean, then all-reduce). The model has no
dropout: each rank draws its own masks, which no process split can reproduce. After 6 Adam steps
the weights agree to atol 1e-5 (rtol 0); accuracy is equal and eval loss within 1e-4.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import REPO, error_lines, make_tiny_model_dir, tiny_recipe

from qat.cli.train import main
from qat.formats.registry import FORMATS, make_format

WEIGHT_ATOL, LOSS_ATOL = 1e-5, 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_match_one_with_the_same_global_batch(
    tmp_path: Path, one_thread: None
) -> None:
    model_dir = make_tiny_model_dir(tmp_path, no_dropout=True)
    recipe = tiny_recipe(tmp_path, max_steps=6, learning_rate=1e-4, model_name_or_path=model_dir)
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "qat/train.py",
            recipe,
            "--output_dir",
            str(ddp),
            "--per_device_train_batch_size",
            "4",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert main([recipe, "--output_dir", str(single), "--per_device_train_batch_size", "8"]) == 0
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, log[-4000:]
    assert log.count("qat train: done") == 2  # both ranks trained and evaluated

    state = json.loads((ddp / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["train_batch_size"] == 4
    assert state["epoch"] == pytest.approx(6 * 8 / 64)  # 8 samples a step: 2 ranks x 4
    a, b = load_file(single / "model.safetensors"), load_file(ddp / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=WEIGHT_ATOL, rtol=0, msg=k)
    init = load_file(Path(model_dir) / "model.safetensors")
    moved = sum(
        not torch.equal(a[k], init[k.removeprefix("bert.")])
        for k in a
        if k.removeprefix("bert.") in init
    )
    assert moved > 0  # training did change the weights the comparison covers
    ma = json.loads((single / "eval_results.json").read_text())
    mb = json.loads((ddp / "eval_results.json").read_text())
    assert mb["eval_accuracy"] == ma["eval_accuracy"]
    assert mb["eval_loss"] == pytest.approx(ma["eval_loss"], abs=LOSS_ATOL)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_formats_hold_no_random_state(name: str) -> None:
    """Every rank must quantise a tensor identically: a format's output may not depend on the
    global RNG (which ranks do not share), only on its parameters and the input."""
    try:
        fmt = make_format({"format": name})
    except Exception:  # noqa: BLE001 - formats with required parameters: skip, not fail
        pytest.skip(f"{name} has no default parameters")
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    first = fmt.quantize(x)
    torch.manual_seed(2)
    torch.testing.assert_close(fmt.quantize(x), first, rtol=0, atol=0)


def test_fsdp_on_the_cpu_is_refused_not_run_as_ddp(tmp_path: Path, capsys) -> None:
    """accelerate keeps the FSDP plugin only for GPU-like devices (AcceleratorState: MULTI_CPU
    is not in its FSDP list), so `fsdp:` on the CPU would train as plain DDP: checked by
    running 2 gloo processes here, which exited 0 with DDP-style checkpoints (model.safetensors,
    optimizer.pt, no pytorch_model_fsdp_0/). qat refuses it up front instead."""
    recipe = tiny_recipe(
        tmp_path,
        fsdp="full_shard auto_wrap",
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]},
    )
    assert main([recipe]) == 2
    err = error_lines(capsys)
    assert err == [
        "qat train: error: recipe key fsdp needs GPUs: on the CPU "
        "accelerate silently trains without FSDP (as DDP); drop the fsdp keys or run "
        "on GPUs"
    ]
    assert not (tmp_path / "out").exists()


def _consolidated(dcp_dir: Path) -> dict[str, torch.Tensor]:
    """A sharded (torch.distributed.checkpoint) model folder as one flat state dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = dcp_dir.parent / (dcp_dir.name + ".pt")
    dcp_to_torch_save(str(dcp_dir), str(flat))
    state = torch.load(flat, weights_only=True)
    state = state.get("model", state)
    return {k.removeprefix("model."): v for k, v in state.items()}


@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason=(
        "FSDP needs 2 GPUs: on the CPU accelerate drops the FSDP plugin (MULTI_CPU is not an FSDP "
        "distributed type) and trains as DDP, see test_fsdp_on_the_cpu_is_refused_not_run_as_ddp"
    ),
)
def test_fsdp_two_gpus_match_one_process_and_resume_a_sharded_checkpoint(tmp_path: Path) -> None:
    """launch/fsdp.yaml (FSDP2, SHARDED_STATE_DICT) on 2 GPUs, W4A4 BFP: the weights after 6
    steps equal a 1-process run with the same global batch (atol 1e-5, as for DDP), and a
    resume from the sharded checkpoint-3 ends with the same weights (atol 1e-6)."""
    model_dir = make_tiny_model_dir(tmp_path, no_dropout=True)
    recipe = tiny_recipe(
        tmp_path,
        max_steps=6,
        learning_rate=1e-4,
        use_cpu=False,
        model_name_or_path=model_dir,
        save_strategy="steps",
        save_steps=3,
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    def fsdp(out: Path, *extra: str) -> None:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(REPO / "launch" / "fsdp.yaml"),
                "--num_processes",
                "2",
                "--main_process_port",
                str(_free_port()),
                "qat/train.py",
                recipe,
                "--output_dir",
                str(out),
                "--per_device_train_batch_size",
                "4",
                *extra,
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]

    single, full, resumed = tmp_path / "single", tmp_path / "fsdp", tmp_path / "resumed"
    assert (
        main(
            [
                recipe,
                "--output_dir",
                str(single),
                "--per_device_train_batch_size",
                "8",
                "--save_strategy",
                "no",
            ]
        )
        == 0
    )
    fsdp(full)
    ckpt = full / "checkpoint-6" / "pytorch_model_fsdp_0"
    assert ckpt.is_dir() and (full / "checkpoint-3" / "optimizer_0").is_dir()
    a, b = load_file(single / "model.safetensors"), _consolidated(ckpt)
    for k in a:
        torch.testing.assert_close(b[k].float().cpu(), a[k], atol=WEIGHT_ATOL, rtol=0, msg=k)
    fsdp(resumed, "--resume_from_checkpoint", str(full / "checkpoint-3"))
    c = _consolidated(resumed / "checkpoint-6" / "pytorch_model_fsdp_0")
    for k in a:
        torch.testing.assert_close(c[k], b[k], atol=1e-6, rtol=0, msg=k)
