"""The run folder rules, one place: the run lock, what marks a folder as holding a run, stale
temporary files and checkpoints, and whether ``output_dir`` can be written. The rules of any
output file or folder (and the export ``--out`` rules with atomic writes) are ``qat.files``'.

A requeued job with ``resume_from_checkpoint: true`` must not crash-loop on a checkpoint that
a kill left half-written, and a run folder must not be mixed with another run. Reading and
verifying one checkpoint's files is ``qat.runs.checkpoints``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from qat.errors import QatError, UsageError
from qat.runs.checkpoints import QAT_CONFIG_FILE, TEMP_NAME, CheckpointError, verify_checkpoint

logger = logging.getLogger(__name__)

LOCK_FILE = ".qat_train.lock"
CHECKPOINT_PREFIX = "checkpoint-"
# What marks a folder as holding a run (checkpoint-* folders are looked for separately).
RUN_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "adapter_model.safetensors",
    QAT_CONFIG_FILE,
    "recipe.yaml",
    "trainer_state.json",
)


# --- checkpoints in a run folder ------------------------------------------------------------


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-N`` folders in ``output_dir``, newest (highest N) first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [
        (int(p.name[len(CHECKPOINT_PREFIX) :]), p)
        for p in d.iterdir()
        if p.name.startswith(CHECKPOINT_PREFIX)
        and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
        and p.is_dir()
    ]
    return [p for _, p in sorted(found, reverse=True)]


def last_good_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest checkpoint that passes ``verify_checkpoint``; each newer one is skipped with
    a warning naming it and the reason (a job killed while saving, a full disk, ...)."""
    for path in checkpoints(output_dir):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            logger.warning("skipping checkpoint %s: %s", path, e)
            continue
        return str(path)
    return None


def remove_stale_temps(output_dir: str | os.PathLike) -> list[str]:
    """Remove the temporary files of saves that were killed half-way, in ``output_dir`` and
    its checkpoints (called under the run lock: no save of ours is running). Returns them."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    removed = []
    for folder in (d, *checkpoints(d)):
        for p in folder.iterdir():
            if TEMP_NAME.match(p.name) and p.is_file() and not p.is_symlink():
                p.unlink()
                removed.append(str(p.relative_to(d)))
    return removed


# --- the run folder and its lock ------------------------------------------------------------


def holds_run(output_dir: str | os.PathLike) -> list[str]:
    """What in ``output_dir`` shows it holds a run (empty if nothing does)."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [name for name in RUN_FILES if (d / name).exists()]
    found += [p.name for p in checkpoints(d)][:3]
    return found


def clear_run(output_dir: str | os.PathLike) -> list[str]:
    """Remove an old run's checkpoints and run files (for ``overwrite_output_dir``), so none
    of them is resumed or evaluated later as if it belonged to the new run."""
    import shutil

    d = Path(output_dir)
    removed = []
    for p in checkpoints(d):
        shutil.rmtree(p)
        removed.append(p.name)
    for name in (
        *RUN_FILES,
        "adapter_config.json",
        "config.json",
        "train_results.json",
        "eval_results.json",
        "all_results.json",
        "eval_qat.json",
        "qdec.safetensors",
        "qdec_config.json",
    ):  # residuals of the old weights
        if name != "recipe.yaml" and (d / name).is_file():  # the recipe may be the input
            (d / name).unlink()
            removed.append(name)
    return removed


class RunFolderError(QatError):
    """An output_dir that holds another run, or is locked by one; printed as one line."""


class RunLock:
    """An ``O_EXCL`` lock file in ``output_dir`` holding ``{pid, host, started}``.

    A second run into the folder fails at once. The holder touches the file every
    ``HEARTBEAT_S``; a lock left by a dead process on this host, or one not touched for
    ``STALE_S`` (a killed job on another node, a reused pid), is taken over with a warning.
    """

    HEARTBEAT_S = 30.0
    STALE_S = 300.0

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.held = False
        self._stop: Any = None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                },
                f,
            )
        return True

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._create():
            self._take_over_or_fail()
        self.held = True
        self._start_heartbeat()

    def _start_heartbeat(self) -> None:
        import threading

        self._stop = threading.Event()

        def beat() -> None:
            while not self._stop.wait(self.HEARTBEAT_S):
                try:
                    os.utime(self.path)
                except OSError:
                    return

        threading.Thread(target=beat, name="qat-lock-heartbeat", daemon=True).start()

    def _take_over_or_fail(self) -> None:
        """Take over a stale lock, or fail naming its holder. Takeovers run one at a time
        under an ``flock`` of the folder (released by the kernel if the process dies), and
        each re-reads the lock inside it: of several processes that found the same stale
        lock, the first replaces it and the others then find a fresh one and fail."""
        import fcntl

        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX)
            for _ in range(3):  # the holder may release it while we look
                if self._create():
                    return
                found = self._owner()
                if found is not None:
                    break
            else:
                raise RunFolderError(
                    f"output_dir {str(self.path.parent)!r} is in use by "
                    "runs that keep taking and releasing its lock"
                )
            pid, host, owner, ino, idle = found
            dead = host == socket.gethostname() and not _alive(pid)
            if dead or idle > self.STALE_S:
                why = "which is gone" if dead else f"not refreshed for {idle:.0f} s"
                logger.warning(
                    "taking over the stale lock %s of process %d on %s (%s)",
                    self.path,
                    pid,
                    host,
                    why,
                )
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(self.path).st_ino == ino:  # still the lock judged stale
                        os.unlink(self.path)
                if self._create():
                    return
        finally:
            os.close(dfd)  # drops the flock
        raise RunFolderError(
            f"output_dir {str(self.path.parent)!r} is in use by another run "
            f"(pid {pid} on {host}, since {owner.get('started', '?')}); wait "
            f"for it or use another output_dir (lock file {str(self.path)!r})"
        )

    def _owner(self) -> tuple[int, str, dict[str, Any], int, float] | None:
        """``(pid, host, record, inode, seconds since refreshed)`` of the lock file (None:
        gone)."""
        try:
            st = os.stat(self.path)
            owner = json.loads(self.path.read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            raise RunFolderError(
                f"output_dir {str(self.path.parent)!r} is locked by "
                f"{str(self.path)!r}, which cannot be read; delete it if no run "
                "is using this folder"
            ) from None
        return pid, host, owner, st.st_ino, time.time() - st.st_mtime

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def check_output_dir(path: str) -> None:
    """Fail before loading anything if ``output_dir`` cannot be created or written (a file in
    the way, no permission, a read-only file system); creates nothing."""
    import tempfile

    p = Path(path).expanduser()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(
            f"output_dir {path!r} is not writable: {str(probe)!r} is a file, not a folder"
        )
    if not os.access(probe, os.W_OK):
        raise UsageError(f"output_dir {path!r} is not writable ({str(probe)!r})")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UsageError(
            f"output_dir {path!r} is not writable ({str(probe)!r}: {e.strerror})"
        ) from None
