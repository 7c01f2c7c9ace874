"""Issue #21, "lost": nothing a user had is deleted by bad input or a race: the old run under
``--overwrite_output_dir`` until the new one has loaded, the model to fine-tune, a stale lock
taken over by two processes, a checkpoint save killed half-way."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import error_lines, tiny_recipe, tree_hashes

from qat.cli.train import main as train_main
from qat.runs.folders import LOCK_FILE


@pytest.mark.parametrize(
    "bad",
    [
        ["--data_dir", "/nonexistent/glue"],
        ["--model_name_or_path", "/nonexistent/model"],
        ["--max_length", "100000"],
    ],
)
def test_overwrite_keeps_the_old_run_when_the_new_input_is_bad(run, tmp_path, capsys, bad):
    before = tree_hashes(run)
    recipe = tiny_recipe(tmp_path, "new.yaml")
    capsys.readouterr()
    rc = train_main([recipe, "--output_dir", str(run), "--overwrite_output_dir", "true", *bad])
    assert rc == 2 and len(error_lines(capsys)) == 1
    assert tree_hashes(run) == before


def test_overwrite_refuses_to_delete_the_model_it_fine_tunes(run, tmp_path, capsys):
    before = tree_hashes(run)
    recipe = tiny_recipe(tmp_path, "new.yaml")
    for model in (run, run / "checkpoint-3"):
        capsys.readouterr()
        assert (
            train_main(
                [
                    recipe,
                    "--output_dir",
                    str(run),
                    "--overwrite_output_dir",
                    "true",
                    "--model_name_or_path",
                    str(model),
                ]
            )
            == 2
        )
        assert error_lines(capsys) == [
            f"qat train: error: model_name_or_path {str(model)!r} lies inside output_dir "
            f"{str(run.resolve())!r}, which overwrite_output_dir would delete; write the new "
            "run to another output_dir"
        ]
        assert tree_hashes(run) == before


def test_overwrite_still_replaces_the_old_run(run, tmp_path):
    recipe = tiny_recipe(tmp_path, "new.yaml")
    (run / "qdec_config.json").write_text("{}")  # residuals of the old weights go too
    assert (
        train_main(
            [
                recipe,
                "--output_dir",
                str(run),
                "--overwrite_output_dir",
                "true",
                "--max_steps",
                "1",
                "--save_strategy",
                "no",
            ]
        )
        == 0
    )
    assert not list(run.glob("checkpoint-*")) and not (run / "qdec_config.json").exists()
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 1


# --- the stale lock race ------------------------------------------------------------------------


def _contender(out: str, barrier, results) -> None:
    import time

    from qat.runs import folders
    from qat.runs.folders import RunFolderError, RunLock

    real = folders._alive

    def slow_alive(pid: int) -> bool:  # widen the window between judging and replacing
        time.sleep(0.05)
        return real(pid)

    folders._alive = slow_alive
    lock = RunLock(out)
    barrier.wait()
    try:
        lock.acquire()
        results.put("won")
    except RunFolderError:
        results.put("refused")
    barrier.wait()  # hold it until every contender has tried


def test_only_one_of_many_processes_takes_over_a_stale_lock(tmp_path):
    ctx = multiprocessing.get_context("fork")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    n = 8
    for round_ in range(6):
        out = tmp_path / f"out{round_}"
        out.mkdir()
        (out / LOCK_FILE).write_text(
            json.dumps(
                {"pid": dead.pid, "host": socket.gethostname(), "started": "2026-01-01 00:00:00"}
            )
        )
        barrier, results = ctx.Barrier(n), ctx.Queue()
        procs = [
            ctx.Process(target=_contender, args=(str(out), barrier, results)) for _ in range(n)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        got = sorted(results.get(timeout=5) for _ in range(n))
        assert got == ["refused"] * (n - 1) + ["won"], (round_, got)


def test_lock_release_keeps_the_folder_clean(tmp_path):
    from qat.runs.folders import RunLock

    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()
    assert os.listdir(tmp_path) == []


# --- a kill during a save; bytes that rot -------------------------------------------------------


def test_temporary_files_of_a_killed_save_are_removed_on_the_next_run(run, caplog):
    import logging

    temps = [
        run / ".tmpAb12Cd",
        run / "checkpoint-1" / ".tmpZz9y8X",
        run / "checkpoint-2" / ".qat_config.json.tmp-4242",
    ]
    for t in temps:
        t.write_bytes(b"\0" * 4096)  # what safetensors / write_qat_config leave when killed
    keep = [run / ".tmp_notes.txt", run / "checkpoint-1" / ".tmpshort"]
    for k in keep:
        k.write_text("mine")
    with caplog.at_level(logging.WARNING):
        assert (
            train_main(
                [
                    str(run / "recipe.yaml"),
                    "--output_dir",
                    str(run),
                    "--resume_from_checkpoint",
                    "true",
                    "--max_steps",
                    "3",
                ]
            )
            == 0
        )
    assert not any(t.exists() for t in temps)
    assert all(k.read_text() == "mine" for k in keep)
    assert "removed 3 temporary file(s) of an interrupted save" in caplog.text


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # inside the last tensor: the file still parses, same size
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "scheduler.pt", "trainer_state.json"])
def test_rotted_checkpoint_is_skipped_for_the_previous_good_one(run, caplog, name):
    import logging

    from qat.runs.checkpoints import CheckpointError, verify_checkpoint
    from qat.runs.folders import last_good_checkpoint

    ckpt = run / "checkpoint-3"
    record = json.loads((ckpt / "qat_checksums.json").read_text())
    assert (
        record["files"]["model.safetensors"]["sha256"]
        == hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    )
    if name == "trainer_state.json":  # same size, still valid JSON
        text = (ckpt / name).read_text()
        (ckpt / name).write_text(text.replace('"epoch": ', '"epoch":', 1) + " ")
    else:
        _flip_last_byte(ckpt / name)
    with pytest.raises(CheckpointError, match="changed since it was saved"):
        verify_checkpoint(ckpt)
    with caplog.at_level(logging.WARNING):
        assert last_good_checkpoint(run) == str(run / "checkpoint-2")
    assert f"skipping checkpoint {ckpt}: {ckpt / name}: changed since it was saved" in caplog.text
