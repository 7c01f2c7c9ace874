"""End to end on the real MiniLM encoder and real SST-2: train, evaluate, files, W&B."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny import REPO

pytestmark = pytest.mark.skipif(not os.environ.get("QAT_DATA_DIR"), reason="needs GLUE data")


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    """One short W4A4 BFP QAT run through the script entry point, logging to offline W&B."""
    out = tmp_path_factory.mktemp("run")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(out)}
    cmd = [
        sys.executable,
        str(REPO / "qat/train.py"),
        str(REPO / "recipes/minilm_sst2.yaml"),
        "--output_dir",
        str(out / "model"),
        "--max_steps",
        "80",
        "--logging_steps",
        "10",
        "--per_device_train_batch_size",
        "32",
        "--report_to",
        "[wandb]",
        "--run_name",
        "e2e-test",
        "--quant.overrides",
        "{'.*output.dense': {weight: {width: 6}}}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_qat_run_learns_sst2(qat_run):
    out, proc = qat_run
    results = json.loads((out / "model/all_results.json").read_text())
    # 80 steps x 32 sentences of W4A4 QAT: chance is 0.51 on this split.
    assert results["eval_accuracy"] > 0.75, results
    assert "qat train: done; eval_loss=" in proc.stdout


def test_run_writes_recipe_and_quant_config(qat_run):
    out, _ = qat_run
    recipe = yaml.safe_load((out / "model/recipe.yaml").read_text())
    assert recipe["max_steps"] == 80
    assert recipe["quant"]["overrides"] == {".*output.dense": {"weight": {"width": 6}}}
    state = json.loads((out / "model/qat_config.json").read_text())
    assert state["finetune"] == "full" and state["quant"]["activation"]["width"] == 4
    config = json.loads((out / "model/config.json").read_text())
    assert config["qat_quant"] == state["quant"]


def wandb_records(path: Path):
    """Records of a W&B transaction log (.wandb): a 7-byte header, then LevelDB-style log
    blocks of 32 KiB holding chunks (crc32, length, type: full/first/middle/last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw, pos, buf, block = path.read_bytes(), 7, b"", 32768
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):
            pos += left
            continue
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = data if kind in (1, 2) else buf + data
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            yield rec


def wait_for_wandb_exit(log) -> None:
    """wandb-core, a process of its own, may still be writing when the training process has
    exited: return once the log holds the run's closing "exit" record (bounded wait)."""
    for _ in range(120):
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in wandb_records(log)):
                return
        except Exception:  # noqa: BLE001 - a record still being written; look again
            pass
        time.sleep(0.5)


def test_wandb_offline_run_has_metrics_and_quant_config(qat_run):
    out, _ = qat_run
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    log = next(runs[0].glob("*.wandb"))
    wait_for_wandb_exit(log)
    config, logged = {}, set()
    for rec in wandb_records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            logged |= {i.key or "/".join(i.nested_key) for i in rec.history.item}
    assert config["qat"]["quant"]["weight"] == {
        "format": "bfp",
        "width": 4,
        "exponent_width": 8,
        "block_size": 16,
    }
    assert config["qat"]["finetune"] == "full"
    assert config["qat_quant"]["overrides"] == {".*output.dense": {"weight": {"width": 6}}}
    assert {"train/loss", "eval/accuracy"} <= logged, logged
