"""Run folders: nothing lost, nothing silent. A reused output_dir (refused, or replaced only
once the new run has loaded, never the model it fine-tunes), the run lock (live, stale, raced by
many processes), damaged checkpoints, a save killed half-way and rotted bytes, damaged run files
given to eval / export, bad input under accelerate launch. Every case asserts the exit code,
the one error line and that no file changed."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import REPO, error_lines, tiny_recipe, tree_hashes

from qat.cli.eval import main as eval_main
from qat.cli.export import main as export_main
from qat.cli.train import main as train_main
from qat.runs.checkpoints import CheckpointError, verify_checkpoint
from qat.runs.folders import LOCK_FILE, last_good_checkpoint

# --- reused output_dir ------------------------------------------------------------------------


def test_new_run_into_a_run_folder_is_refused(run, capsys):
    before = tree_hashes(run)
    recipe = str(run / "recipe.yaml")
    capsys.readouterr()
    assert train_main([recipe, "--output_dir", str(run)]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith(
        f"qat train: error: output_dir {str(run)!r} already holds a run (model.safetensors, "
        "qat_config.json, recipe.yaml, trainer_state.json, checkpoint-3"
    ), err
    assert err[0].endswith(
        "resume it with --resume_from_checkpoint true, or start over with "
        "--overwrite_output_dir true (deletes its checkpoints)"
    )
    assert tree_hashes(run) == before


def test_overwrite_output_dir_leaves_no_stale_checkpoint(run, capsys):
    recipe = str(run / "recipe.yaml")
    # resume and overwrite together would delete the checkpoint to resume
    before = tree_hashes(run)
    assert (
        train_main(
            [
                recipe,
                "--output_dir",
                str(run),
                "--overwrite_output_dir",
                "true",
                "--resume_from_checkpoint",
                "true",
            ]
        )
        == 2
    )
    assert "resume_from_checkpoint and overwrite_output_dir are both set" in error_lines(capsys)[0]
    assert tree_hashes(run) == before
    assert (
        train_main(
            [
                recipe,
                "--output_dir",
                str(run),
                "--overwrite_output_dir",
                "true",
                "--save_strategy",
                "no",
                "--max_steps",
                "2",
            ]
        )
        == 0
    )
    assert not list(run.glob("checkpoint-*"))
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    import yaml

    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert "overwrite_output_dir" not in saved  # a rerun of the saved recipe must not wipe it
    assert not (run / LOCK_FILE).exists()
    # nothing to resume in a finished run without checkpoints: refused, not restarted over it
    before = tree_hashes(run)
    assert train_main([recipe, "--output_dir", str(run), "--resume_from_checkpoint", "true"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "holds a run" in err[0] and "but no checkpoint" in err[0]
    assert tree_hashes(run) == before


# --- the lock ---------------------------------------------------------------------------------


def _write_lock(folder: Path, pid: int, host: str) -> Path:
    lock = folder / LOCK_FILE
    lock.write_text(json.dumps({"pid": pid, "host": host, "started": "2026-01-01 00:00:00"}))
    return lock


def test_a_live_lock_refuses_a_second_run(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = _write_lock(out, holder.pid, socket.gethostname())
        before = tree_hashes(out)
        assert train_main([recipe, "--output_dir", str(out)]) == 2
        assert error_lines(capsys) == [
            f"qat train: error: output_dir {str(out)!r} is in use by another run (pid "
            f"{holder.pid} on {socket.gethostname()}, since 2026-01-01 00:00:00); wait for it "
            f"or use another output_dir (lock file {str(lock)!r})"
        ]
        assert tree_hashes(out) == before
        # a lock from another host that is still refreshed stands too
        _write_lock(out, 1, "some-other-node")
        assert train_main([recipe, "--output_dir", str(out)]) == 2
        assert "is in use by another run (pid 1 on some-other-node" in error_lines(capsys)[0]
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, capsys, caplog):
    recipe = tiny_recipe(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(out, dead.pid, socket.gethostname())
    with caplog.at_level(logging.WARNING):
        assert train_main([recipe, "--output_dir", str(out)]) == 0
    assert f"taking over the stale lock {out / LOCK_FILE} of process {dead.pid}" in caplog.text
    assert not (out / LOCK_FILE).exists() and (out / "model.safetensors").is_file()
    out2 = tmp_path / "out2"
    out2.mkdir()
    lock = _write_lock(out2, 1, "some-other-node")
    old = time.time() - 3600  # not refreshed for an hour: its job is gone
    os.utime(lock, (old, old))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert train_main([recipe, "--output_dir", str(out2)]) == 0
    assert "not refreshed for" in caplog.text and not lock.exists()


def test_concurrent_runs_into_one_folder(tmp_path, capsys):
    """A real second ``qat train`` process while the first holds the folder."""
    recipe = tiny_recipe(tmp_path, max_steps=400)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "qat" / "train.py"),
            recipe,
            "--output_dir",
            str(out),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while (
            not (out / LOCK_FILE).exists() and first.poll() is None and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert (out / LOCK_FILE).exists(), "the first run never took the lock"
        assert train_main([recipe, "--output_dir", str(out)]) == 2
        err = error_lines(capsys)
        assert len(err) == 1 and f"is in use by another run (pid {first.pid} on" in err[0]
    finally:
        first.kill()
        first.wait()


# --- damaged checkpoints ----------------------------------------------------------------------


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "damage, what",
    [
        (lambda c: _truncate(c / "model.safetensors"), "model.safetensors: truncated"),
        (lambda c: (c / "model.safetensors").unlink(), "model.safetensors: missing"),
        (lambda c: _truncate(c / "optimizer.pt"), "optimizer.pt: truncated"),
        (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt: missing"),
        (lambda c: _truncate(c / "scheduler.pt", 0.9), "scheduler.pt: truncated"),
        (lambda c: _truncate(c / "trainer_state.json"), "trainer_state.json: not valid JSON"),
        (
            lambda c: (c / "qat_config.json").write_text("[1, 2]"),
            "qat_config.json: expected a JSON object, got list",
        ),
        (
            lambda c: (c / "qat_config.json").write_text('{"quant": null, "finetune": "all"}'),
            "qat_config.json: finetune must be one of full, lora, classifier; got 'all'",
        ),
        (lambda c: _truncate(c / "rng_state.pth"), "rng_state.pth: truncated"),
    ],
    ids=[
        "weights-truncated",
        "weights-missing",
        "optimizer-truncated",
        "optimizer-missing",
        "scheduler-truncated",
        "state-truncated",
        "qat-config-list",
        "qat-config-bad-value",
        "rng-truncated",
    ],
)
def test_every_checkpoint_file_is_verified(run, damage, what):
    ckpt = run / "checkpoint-3"
    verify_checkpoint(ckpt)
    damage(ckpt)
    with pytest.raises(CheckpointError) as e:
        verify_checkpoint(ckpt)
    assert str(e.value).startswith(f"{ckpt}/{what}"), str(e.value)


def test_resume_falls_back_to_the_newest_good_checkpoint(run, capsys, caplog):
    _truncate(run / "checkpoint-3" / "model.safetensors")
    (run / "checkpoint-2" / "optimizer.pt").unlink()
    with caplog.at_level(logging.WARNING):
        assert last_good_checkpoint(run) == str(run / "checkpoint-1")
    assert (
        f"skipping checkpoint {run / 'checkpoint-3'}: {run / 'checkpoint-3'}/"
        "model.safetensors: truncated" in caplog.text
    )
    assert f"{run / 'checkpoint-2'}/optimizer.pt: missing" in caplog.text
    capsys.readouterr()
    assert (
        train_main(
            [
                str(run / "recipe.yaml"),
                "--output_dir",
                str(run),
                "--resume_from_checkpoint",
                "true",
                "--save_strategy",
                "no",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("'loss'") == 2  # steps 2 and 3 again, from checkpoint-1
    # an explicit damaged checkpoint is an error naming the file, not a fallback
    before = tree_hashes(run)
    assert (
        train_main(
            [
                str(run / "recipe.yaml"),
                "--output_dir",
                str(run),
                "--resume_from_checkpoint",
                str(run / "checkpoint-3"),
            ]
        )
        == 2
    )
    assert error_lines(capsys) == [
        f"qat train: error: {run / 'checkpoint-3'}/model.safetensors: "
        "truncated: " + _errors_tail(run / "checkpoint-3" / "model.safetensors")
    ]
    assert tree_hashes(run) == before


def _errors_tail(path: Path) -> str:
    try:
        from qat.runs.checkpoints import check_safetensors

        check_safetensors(path)
    except CheckpointError as e:
        return e.what.split("truncated: ", 1)[1]
    raise AssertionError("not truncated")


# --- damaged run folders given to eval / export -----------------------------------------------


@pytest.mark.parametrize(
    "damage, line",
    [
        (
            lambda r: (r / "qat_config.json").write_text('{"quant": '),
            "qat_config.json: not valid JSON (Expecting value at line 1 column 11); truncated or "
            "edited?",
        ),
        (
            lambda r: (r / "qat_config.json").write_text("[]"),
            "qat_config.json: expected a JSON object, got list",
        ),
        (
            lambda r: (r / "qat_config.json").write_text(
                '{"quant": {"weight": {"format": "bfp", "width": "four"}}, "finetune": "full"}'
            ),
            "qat_config.json: quant: ",
        ),
        (lambda r: _truncate(r / "model.safetensors"), "model.safetensors: truncated: "),
    ],
    ids=["bad-json", "list", "bad-value", "weights-truncated"],
)
@pytest.mark.parametrize("cmd", ["eval", "export"])
def test_damaged_run_folder_is_one_line_naming_the_file(run, tmp_path, capsys, damage, line, cmd):
    damage(run)
    before = tree_hashes(run)
    capsys.readouterr()
    if cmd == "eval":
        rc = eval_main([str(run), "--output", str(tmp_path / "eval.json")])
    else:
        rc = export_main([str(run), "--out", str(tmp_path / "export")])
    assert rc == 2
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith(f"qat {cmd}: error: {run}/{line}"), err
    assert tree_hashes(run) == before
    assert not (tmp_path / "eval.json").exists() and not (tmp_path / "export").exists()


# --- accelerate launch: one line, exit 2 ------------------------------------------------------

CPU_LAUNCH = """compute_environment: LOCAL_MACHINE
distributed_type: "NO"
num_machines: 1
num_processes: 1
mixed_precision: "no"
use_cpu: true
"""


def _train_script(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    script = REPO / "qat" / "train.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(script), *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )


def test_launch_reports_bad_input_as_one_line_and_exit_2(tmp_path):
    """Bad input found before launching (no process started) and bad input found by the
    launched process (an empty data_dir) both end as exit 2 with one line and no traceback:
    accelerate's own CalledProcessError (exit 1) is silenced with --quiet and the child's
    status is passed on."""
    cfg = tmp_path / "cpu.yaml"
    cfg.write_text(CPU_LAUNCH)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: x\n")
    proc = _train_script([str(bad), "--launch", str(cfg)], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("qat ")] == [
        f"qat train: error: {bad}: recipe key 'task_name' is required"
    ]
    assert "Traceback" not in proc.stderr and "accelerate" not in proc.stderr
    (tmp_path / "empty-data").mkdir()
    recipe = tiny_recipe(tmp_path, data_dir=str(tmp_path / "empty-data"))
    proc = _train_script([recipe, "--launch", str(cfg)], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("qat ")]
    assert (
        len(lines) == 1 and lines[0].startswith("qat train: error: ") and "empty-data" in lines[0]
    ), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "CalledProcessError" not in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = _train_script([recipe, "--launch", str(tmp_path)], tmp_path)
    assert proc.returncode == 2
    assert f"--launch {str(tmp_path)!r} is a folder" in proc.stderr


# --- the old run, the model it fine-tunes, a stale lock race, a killed save, rotted bytes -----
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


# --- the stale lock race ----------------------------------------------------------------------


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


# --- a kill during a save; bytes that rot -----------------------------------------------------


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
