"""The rules of the files and folders qat writes, one place, on the ground floor: an output file
or folder checked before any work (``--output``, ``--output_dir``), an export destination
(``--out``: new or empty, ``--overwrite`` replaces only an export, never a source) and the
atomic write (a temporary folder beside it, then a rename). The run folder rules (lock,
checkpoints) are ``qat.runs.folders``'.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from qat.errors import ExportError, UsageError

# --- output files and folders, checked before any work -------------------------------------


def _first_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_file(path: str | Path, option: str = "--output") -> Path:
    """An output file path must not be a directory, nor lie under a file; checked before any
    work so a long evaluation does not end in a traceback (and nothing is written here)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(
            f"{option} {str(path)!r} is a directory, expected a file path "
            f"(e.g. {str(p / 'results.json')!r})"
        )
    if p.exists() and not p.is_file():
        raise UsageError(f"{option} {str(path)!r} is not a regular file")
    base = _first_existing(p.parent)
    if not base.is_dir():
        raise UsageError(
            f"{option} {str(path)!r} cannot be written: {str(base)!r} is a file, not a folder"
        )
    return p


def check_output_folder(path: str | Path, option: str = "--output_dir") -> Path:
    """An output folder must be a folder (or creatable: no file on its path); an empty name is
    not the current folder, nor the default."""
    if not str(path):
        raise UsageError(f"{option} must name a folder, got ''")
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UsageError(f"{option} {str(path)!r} is a file, expected a folder")
    base = _first_existing(p)
    if not base.is_dir():
        raise UsageError(
            f"{option} {str(path)!r} cannot be created: {str(base)!r} is a file, not a folder"
        )
    return p


# --- export destinations (--out), written atomically ---------------------------------------


def check_destination(
    out: str | Path, overwrite: bool, replaceable: Callable[[Path], bool]
) -> Path:
    """``--out`` must be a new or empty folder, or ``overwrite`` must be given and the folder
    must hold an export (``replaceable``: the export package knows its own files)."""
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise ExportError(f"--out {str(out)!r} exists and is not a directory")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        n = sum(1 for _ in p.iterdir())
        raise ExportError(
            f"--out {str(out)!r} is not empty ({n} entries); pass --overwrite "
            "to replace it, or choose a new folder"
        )
    if p.is_dir() and any(p.iterdir()) and not replaceable(p):
        # --overwrite replaces an old export, never a training run or anything else
        raise ExportError(
            f"--out {str(out)!r} is not empty and holds no qat export "
            "(qat_export.json beside its weights); "
            "--overwrite replaces only an export: choose a new folder"
        )
    return p


def _within(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies inside it (both resolved)."""
    return a == b or b in a.parents


def check_not_source(out: Path, sources: dict[str, Path], keep: dict[str, Path]) -> None:
    """Refuse (even with --overwrite) an ``out`` that is, lies inside or contains a source
    folder, or that contains a file/folder to keep (recipe, data, the current directory)."""
    o = out.expanduser().resolve()
    for what, src in sources.items():
        s = src.expanduser().resolve()
        if _within(o, s) or _within(s, o):
            rel = "is" if o == s else "lies inside" if _within(o, s) else "contains"
            raise ExportError(
                f"--out {str(out)!r} {rel} the {what} {str(src)!r}; exporting "
                "there would replace what is exported: choose another folder"
            )
    for what, k in keep.items():
        if _within(k.expanduser().resolve(), o):
            raise ExportError(
                f"--out {str(out)!r} contains the {what} {str(k)!r}; choose another folder"
            )


def write_atomically(
    out: Path,
    write: Callable[[Path], None],
    overwrite: bool = False,
    replaceable: Callable[[Path], bool] | None = None,
) -> None:
    """``write(tmp)`` into a fresh folder beside ``out``, then rename it to ``out``.

    An interrupted export leaves only a hidden ``.NAME.tmp-*`` folder, never a half-written
    ``out``; with ``overwrite`` the old ``out`` is moved away only once the new one is complete
    (and put back if the final rename fails), and only if ``replaceable(out)`` (checked again
    here, at the rename: the folder may have changed since ``check_destination``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700
        write(tmp)
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            out.rmdir()
        if out.exists() or out.is_symlink():
            if not overwrite:  # e.g. created by someone else while we were writing
                raise ExportError(
                    f"--out {str(out)!r} exists and is not an empty folder; "
                    "pass --overwrite to replace it"
                )
            if replaceable is not None and not (out.is_dir() and replaceable(out)):
                raise ExportError(
                    f"--out {str(out)!r} is not empty and holds no qat export; "
                    "--overwrite replaces only an export: choose a new folder"
                )
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            old.rmdir()
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except OSError:
                os.rename(old, out)
                raise
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
