"""Checkpoint and run-folder safety: verification, newest good checkpoint, output_dir lock.

A requeued job with ``resume_from_checkpoint: true`` must not crash-loop on a checkpoint that
a kill left half-written, and a run folder must not be mixed with another run. Everything here
reads headers and sizes only (plus ``torch.load`` of the small scheduler state), so checking
a checkpoint costs milliseconds, not a model load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import struct
import time
import zipfile
from pathlib import Path
from typing import Any

from qat.errors import QatError, UsageError

logger = logging.getLogger(__name__)

QAT_CONFIG_FILE = "qat_config.json"
LOCK_FILE = ".qat_train.lock"
CHECKPOINT_PREFIX = "checkpoint-"
# What marks a folder as holding a run (checkpoint-* folders are looked for separately).
RUN_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
             "adapter_model.safetensors", QAT_CONFIG_FILE, "recipe.yaml", "trainer_state.json")


class CheckpointError(QatError):
    """A run or checkpoint file that is missing, truncated or malformed: ``<file>: <what>``."""

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        super().__init__(f"{os.fspath(path)}: {what}")
        self.path, self.what = os.fspath(path), what


# --- reading single files -------------------------------------------------------------------


def read_json(path: str | os.PathLike, kind: type = dict) -> Any:
    """Parse a JSON file that must hold a ``kind``; CheckpointError names the file."""
    p = Path(path)
    try:
        data = json.loads(p.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(p, "missing") from None
    except OSError as e:
        raise CheckpointError(p, f"cannot be read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise CheckpointError(p, "not valid JSON (not UTF-8 text)") from None
    except ValueError as e:
        where = f" at line {e.lineno} column {e.colno}" if hasattr(e, "lineno") else ""
        msg = getattr(e, "msg", str(e))
        raise CheckpointError(p, f"not valid JSON ({msg}{where}); truncated or edited?") from None
    if not isinstance(data, kind):
        raise CheckpointError(p, f"expected a JSON {'object' if kind is dict else kind.__name__}"
                                 f", got {type(data).__name__}")
    return data


def check_qat_config(path: str | os.PathLike) -> dict[str, Any]:
    """``qat_config.json`` parsed and validated (quant config, finetune mode, LoRA keys)."""
    from qat.formats import FormatError
    from qat.quant.config import QuantConfig, QuantConfigError
    from qat.runs.recipe import FINETUNE_MODES, LoraArguments

    state = read_json(path)
    for key in ("quant", "finetune"):
        if key not in state:
            raise CheckpointError(path, f"no {key!r} key; not written by qat train?")
    try:
        QuantConfig.from_dict(state["quant"])
    except (QuantConfigError, FormatError, ValueError, TypeError) as e:
        raise CheckpointError(path, f"quant: {e}") from None
    if state["finetune"] not in FINETUNE_MODES:
        raise CheckpointError(path, f"finetune must be one of {', '.join(FINETUNE_MODES)}; got "
                                    f"{state['finetune']!r}")
    lora = state.get("lora")
    if lora is not None:
        if not isinstance(lora, dict):
            raise CheckpointError(path, f"lora must be an object or null, got {lora!r}")
        try:
            LoraArguments(**lora)
        except TypeError as e:
            raise CheckpointError(path, f"lora: {e}") from None
    return state


def check_safetensors(path: str | os.PathLike) -> None:
    """The header parses and the file is as long as the header says (catches truncation)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(p, f"truncated ({size} bytes; not a safetensors file)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 * 2**20):
                raise CheckpointError(p, f"truncated or not safetensors (header of {n} bytes in "
                                         f"a {size}-byte file)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(p, "missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(p, "corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(p, "corrupt safetensors header")
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"
               and isinstance(v, dict) and "data_offsets" in v), default=0)
    if size < 8 + n + end:
        raise CheckpointError(p, f"truncated: {size} bytes, the header needs {8 + n + end}")


def check_torch_zip(path: str | os.PathLike, load: bool = False) -> None:
    """A ``torch.save`` file: a complete zip archive (central directory present, members
    inside the file); ``load`` also reads it with ``torch.load(weights_only=True)``."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(p, "missing")
    size = p.stat().st_size
    try:
        with zipfile.ZipFile(p) as z:
            for info in z.infolist():
                if info.header_offset + info.compress_size > size:
                    raise CheckpointError(p, "truncated")
    except zipfile.BadZipFile:
        raise CheckpointError(p, f"truncated or not a torch file ({size} bytes)") from None
    if load:
        import torch

        try:
            torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # any failure to read is a damaged file here
            raise CheckpointError(p, f"cannot be loaded ({type(e).__name__})") from None


def check_weights(folder: str | os.PathLike, finetune: str) -> None:
    """The model weights a run/checkpoint folder needs for ``finetune`` exist and are whole."""
    d = Path(folder)
    if finetune == "lora":
        read_json(d / "adapter_config.json")
        check_safetensors(d / "adapter_model.safetensors")
        return
    index = d / "model.safetensors.index.json"
    if index.is_file():
        shards = set(read_json(index).get("weight_map", {}).values())
        for shard in sorted(shards):
            check_safetensors(d / shard)
    elif (d / "model.safetensors").exists() or not _fsdp_shards(d):
        check_safetensors(d / "model.safetensors")


def _fsdp_shards(d: Path) -> list[Path]:
    return [p for p in d.glob("pytorch_model_fsdp_*") if p.is_dir() and any(p.iterdir())]


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Every file a resume needs exists and reads; raises CheckpointError naming the first bad
    one. Trainer silently starts a fresh optimizer when optimizer.pt is missing, so it is
    required here."""
    d = Path(path)
    state = read_json(d / "trainer_state.json")
    if not isinstance(state.get("global_step"), int):
        raise CheckpointError(d / "trainer_state.json", "no integer global_step")
    qat = check_qat_config(d / QAT_CONFIG_FILE)
    check_weights(d, qat["finetune"])
    if not (d / "optimizer_0").is_dir():  # FSDP sharded optimizer state is a folder
        check_torch_zip(d / "optimizer.pt")
    check_torch_zip(d / "scheduler.pt", load=True)
    for rng in d.glob("rng_state*.pth"):  # optional, but Trainer crashes on a damaged one
        check_torch_zip(rng)
    verify_checksums(d)


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-N`` folders in ``output_dir``, newest (highest N) first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [(int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in d.iterdir()
             if p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and p.is_dir()]
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


# --- what a killed save leaves, and bytes that rot ------------------------------------------

CHECKSUMS_FILE = "qat_checksums.json"
# safetensors writes ``.tmpXXXXXX`` beside the file and renames it; write_qat_config writes
# ``.qat_config.json.tmp-PID``: a kill in between leaves the temporary file behind
_TEMP_NAME = re.compile(r"^\.tmp[A-Za-z0-9]{6}$|^\.qat_config\.json\.tmp-\d+$")


def remove_stale_temps(output_dir: str | os.PathLike) -> list[str]:
    """Remove the temporary files of saves that were killed half-way, in ``output_dir`` and
    its checkpoints (called under the run lock: no save of ours is running). Returns them."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    removed = []
    for folder in (d, *checkpoints(d)):
        for p in folder.iterdir():
            if _TEMP_NAME.match(p.name) and p.is_file() and not p.is_symlink():
                p.unlink()
                removed.append(str(p.relative_to(d)))
    return removed


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(checkpoint: str | os.PathLike) -> Path:
    """Record the size and SHA-256 of every file of a just-saved checkpoint (write-then-rename),
    so bytes that change later (rot, a bad copy) are found on resume, not trained on."""
    d = Path(checkpoint)
    files = {str(p.relative_to(d)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(d.rglob("*"))
             if p.is_file() and p.name != CHECKSUMS_FILE and not _TEMP_NAME.match(p.name)}
    tmp = d / f".{CHECKSUMS_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1))
    os.replace(tmp, d / CHECKSUMS_FILE)
    return d / CHECKSUMS_FILE


def verify_checksums(checkpoint: str | os.PathLike) -> None:
    """Every file recorded in ``qat_checksums.json`` still has its size and hash (a checkpoint
    saved without one, by an older qat, is not checked)."""
    d = Path(checkpoint)
    if not (d / CHECKSUMS_FILE).exists():
        return
    record = read_json(d / CHECKSUMS_FILE)
    files = record.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(d / CHECKSUMS_FILE, "no 'files' mapping")
    for name, want in files.items():
        p = d / name
        if Path(name).is_absolute() or ".." in Path(name).parts:  # only the checkpoint's own
            raise CheckpointError(d / CHECKSUMS_FILE, f"lists {name!r}, outside the checkpoint")
        if not isinstance(want, dict) or not p.is_file():
            raise CheckpointError(p, "missing (listed in qat_checksums.json)")
        if p.stat().st_size != want.get("size") or _sha256(p) != want.get("sha256"):
            raise CheckpointError(p, "changed since it was saved (checksum mismatch)")


# --- the run folder -------------------------------------------------------------------------


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
    for name in (*RUN_FILES, "adapter_config.json", "config.json", "train_results.json",
                 "eval_results.json", "all_results.json", "eval_qat.json",
                 "qdec.safetensors", "qdec_config.json"):  # residuals of the old weights
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
            json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
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
                raise RunFolderError(f"output_dir {str(self.path.parent)!r} is in use by "
                                     "runs that keep taking and releasing its lock")
            pid, host, owner, ino, idle = found
            dead = host == socket.gethostname() and not _alive(pid)
            if dead or idle > self.STALE_S:
                why = "which is gone" if dead else f"not refreshed for {idle:.0f} s"
                logger.warning("taking over the stale lock %s of process %d on %s (%s)",
                               self.path, pid, host, why)
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(self.path).st_ino == ino:  # still the lock judged stale
                        os.unlink(self.path)
                if self._create():
                    return
        finally:
            os.close(dfd)  # drops the flock
        raise RunFolderError(f"output_dir {str(self.path.parent)!r} is in use by another run "
                             f"(pid {pid} on {host}, since {owner.get('started', '?')}); wait "
                             f"for it or use another output_dir (lock file {str(self.path)!r})")

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
            raise RunFolderError(f"output_dir {str(self.path.parent)!r} is locked by "
                                f"{str(self.path)!r}, which cannot be read; delete it if no run "
                                "is using this folder") from None
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
        raise UsageError(f"output_dir {path!r} is not writable: {str(probe)!r} is a file, "
                        "not a folder")
    if not os.access(probe, os.W_OK):
        raise UsageError(f"output_dir {path!r} is not writable ({str(probe)!r})")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UsageError(f"output_dir {path!r} is not writable ({str(probe)!r}: "
                        f"{e.strerror})") from None


def read_qat_config(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``qat_config.json`` a QATTrainer saved with a checkpoint, validated: a damaged one
    raises ``CheckpointError`` naming the file."""
    path = Path(checkpoint_dir) / QAT_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(checkpoint_dir)!r} holds no {QAT_CONFIG_FILE}: not a qat "
                                "checkpoint (was it written by qat train?)")
    return check_qat_config(path)


def write_qat_config(out_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``qat_config.json`` (quant config, fine-tuning mode, LoRA settings: what a
    checkpoint needs to rebuild its model) write-then-rename, so a kill mid-write never leaves
    a truncated file."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{QAT_CONFIG_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, out / QAT_CONFIG_FILE)
    return out / QAT_CONFIG_FILE
