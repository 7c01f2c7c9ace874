"""The search's study file (``<output_dir>/search.db``), read before optuna opens it.

optuna writes its tables into whatever SQLite file it is given (and fails later on a file that
is not one), so a ``search.db`` is first read here, read-only: a file that is not an optuna
study named ``qat-search`` is refused untouched; an empty one, or one whose creation was
killed before its first trial (no study, or a study without qat's key), holds nothing and is
started afresh; a study is resumed only if what its scores depend on (model, task, data,
held-out slice, seed, base quant config) is what this run would score with.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

from qat.errors import UsageError

logger = logging.getLogger(__name__)

SQLITE_MAGIC = b"SQLite format 3\x00"
OPTUNA_TABLES = {"studies", "trials", "study_user_attributes"}


class StudyFileError(UsageError):
    """A ``search.db`` that cannot be resumed or replaced safely; one line."""


def study_state(db: Path, study_name: str) -> tuple[str, dict[str, Any]]:
    """``(state, user_attrs)``: state is absent, blank (nothing in it worth keeping),
    foreign (not an optuna study of ours: leave it alone) or study."""
    if not db.exists():
        return "absent", {}
    if not db.is_file():
        return "foreign", {}
    if db.stat().st_size == 0:
        return "blank", {}
    with open(db, "rb") as f:
        if f.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
            return "foreign", {}
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return "foreign", {}
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return "blank", {}
        if not OPTUNA_TABLES <= tables:
            return "foreign", {}
        row = con.execute(
            "SELECT study_id FROM studies WHERE study_name = ?", (study_name,)
        ).fetchone()
        if row is None:  # optuna's tables, no study of ours: killed mid-creation, or another's
            others = con.execute("SELECT COUNT(*) FROM studies").fetchone()[0]
            return ("foreign" if others else "blank"), {}
        attrs = {
            k: json.loads(v)
            for k, v in con.execute(
                "SELECT key, value_json FROM study_user_attributes WHERE study_id = ?", row
            )
        }
        trials = con.execute("SELECT COUNT(*) FROM trials WHERE study_id = ?", row).fetchone()[0]
    except (sqlite3.Error, ValueError):
        return "foreign", {}
    finally:
        con.close()
    if "key" not in attrs and not trials:
        return "blank", attrs
    return "study", attrs


def check_db_file(db: Path, study_name: str, resume: bool, scores: dict[str, Any]) -> bool:
    """Check ``db`` before any work; returns whether a stored study is to be resumed (a blank
    file is removed and the search starts afresh, with a warning)."""
    state, attrs = study_state(db, study_name)
    where = str(db.parent)
    if state == "foreign":
        raise StudyFileError(
            f"{str(db)!r} is not a qat search study (not an optuna SQLite "
            f"database holding study {study_name!r}); it was left as it is: "
            "move it away or choose another --output_dir"
        )
    if state == "blank":
        logger.warning(
            "%s holds no search (empty, or its creation was interrupted): starting a new one", db
        )
        for p in (db, db.with_name(db.name + "-journal")):
            p.unlink(missing_ok=True)
        return False
    if state == "absent":
        if resume:
            raise StudyFileError(f"--resume: {where!r} holds no {db.name} to resume")
        return False
    if not resume:
        raise StudyFileError(
            f"{where!r} already holds a search ({db.name}); pass --resume to "
            "continue it, or choose another --output_dir"
        )
    stored = attrs.get("scores")
    if stored != scores:
        stored = stored if isinstance(stored, dict) else {}
        diff = sorted(k for k in {*stored, *scores} if stored.get(k) != scores.get(k))
        first = diff[0] if diff else "scores"
        raise StudyFileError(
            f"--resume: the study in {str(db)!r} was scored with another "
            f"{first} ({stored.get(first)!r}, now {scores.get(first)!r}); its "
            "trials cannot be mixed with these: use a new output_dir"
        )
    return True
