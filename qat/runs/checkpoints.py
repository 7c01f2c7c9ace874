"""Reading and verifying one checkpoint: ``qat_config.json``, safetensors and torch files,
checksums. The run folder around it (lock, stale files, newest good checkpoint) is
``qat.runs.folders``.

A requeued job with ``resume_from_checkpoint: true`` must not crash-loop on a checkpoint that
a kill left half-written. Everything here reads headers and sizes only (plus ``torch.load`` of
the small scheduler state), so checking a checkpoint costs milliseconds, not a model load.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

from qat.errors import QatError
from qat.formats import FormatError
from qat.quant.config import QuantConfig, QuantConfigError
from qat.runs.recipe.arguments import FINETUNE_MODES, LoraArguments

QAT_CONFIG_FILE = "qat_config.json"


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
        raise CheckpointError(
            p,
            f"expected a JSON {'object' if kind is dict else kind.__name__}"
            f", got {type(data).__name__}",
        )
    return data


def check_qat_config(path: str | os.PathLike) -> dict[str, Any]:
    """``qat_config.json`` parsed and validated (quant config, finetune mode, LoRA keys)."""

    state = read_json(path)
    for key in ("quant", "finetune"):
        if key not in state:
            raise CheckpointError(path, f"no {key!r} key; not written by qat train?")
    try:
        QuantConfig.from_dict(state["quant"])
    except (QuantConfigError, FormatError, ValueError, TypeError) as e:
        raise CheckpointError(path, f"quant: {e}") from None
    if state["finetune"] not in FINETUNE_MODES:
        raise CheckpointError(
            path, f"finetune must be one of {', '.join(FINETUNE_MODES)}; got {state['finetune']!r}"
        )
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
                raise CheckpointError(
                    p, f"truncated or not safetensors (header of {n} bytes in a {size}-byte file)"
                )
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(p, "missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(p, "corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(p, "corrupt safetensors header")
    end = max(
        (
            int(v["data_offsets"][1])
            for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v
        ),
        default=0,
    )
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


# --- checksums (bytes that rot) and the temporary files a killed save leaves ----------------

CHECKSUMS_FILE = "qat_checksums.json"
# safetensors writes ``.tmpXXXXXX`` beside the file and renames it; write_qat_config writes
# ``.qat_config.json.tmp-PID``: a kill in between leaves the temporary file behind
TEMP_NAME = re.compile(r"^\.tmp[A-Za-z0-9]{6}$|^\.qat_config\.json\.tmp-\d+$")


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
    files = {
        str(p.relative_to(d)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name != CHECKSUMS_FILE and not TEMP_NAME.match(p.name)
    }
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


def read_qat_config(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``qat_config.json`` a QATTrainer saved with a checkpoint, validated: a damaged one
    raises ``CheckpointError`` naming the file."""
    path = Path(checkpoint_dir) / QAT_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(checkpoint_dir)!r} holds no {QAT_CONFIG_FILE}: not a qat "
            "checkpoint (was it written by qat train?)"
        )
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
