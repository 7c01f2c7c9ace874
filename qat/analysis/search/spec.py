"""The ``search:`` section of a recipe, checked on its own: its keys, the space's roles, fields
and choices, the objectives and constraint, and the sensitivity table it may name."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Any

from qat.errors import QatError, check_one_of, check_section, did_you_mean

OBJECTIVES = ("accuracy", "bits")
SAMPLERS = ("tpe", "nsga2", "random")
GRANULARITIES = ("module", "layer")
ROLES = ("weight", "activation", "matmul")
LINEAR_ROLES = ("weight", "activation")


class SearchError(QatError):
    """A bad ``search:`` section or search state; one line naming the key."""


@dataclasses.dataclass
class SearchSpec:
    """The parsed ``search:`` section; see docs/search.md for each key."""

    space: dict[str, dict[str, list[Any]]]
    granularity: str = "module"
    objectives: list[str] = dataclasses.field(default_factory=lambda: list(OBJECTIVES))
    constraint: dict[str, float] = dataclasses.field(default_factory=dict)
    trials: int = 64
    sampler: str = "tpe"
    held_out_samples: int = 512
    seed: int = 0
    sensitivity: str | None = None  # a sensitivity.csv whose order seeds the first trials
    seed_trials: int = 4
    uniform_widths: list[int] = dataclasses.field(default_factory=lambda: [3, 4, 5, 6, 8])

    @property
    def max_bits(self) -> float | None:
        return self.constraint.get("max_bits")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _int(d: dict[str, Any], key: str, low: int) -> None:
    v = d.get(key)
    if key in d and (not isinstance(v, int) or isinstance(v, bool) or v < low):
        raise SearchError(f"search.{key} must be an integer >= {low}, got {v!r}")


def parse_spec(d: Any) -> SearchSpec:
    """Validate the ``search:`` mapping on its own (the model-dependent checks come later)."""
    if d is None:
        raise SearchError(
            "the recipe has no search: section; add one with at least "
            "search.space (see recipes/minilm_sst2_search.yaml)"
        )
    if not isinstance(d, dict):
        raise SearchError(f"search must be a mapping, got {d!r}")
    check_section(d, SearchSpec, "search", SearchError)  # unknown keys, as quant: and qdec:
    space = d.get("space")
    if not space:
        raise SearchError(
            "search.space is empty: name at least one role (weight, activation, "
            "matmul) with a format field and its choices, e.g. "
            "{weight: {width: [3, 4, 6]}}"
        )
    if not isinstance(space, dict):
        raise SearchError(f"search.space must map roles to {{field: [choices]}}, got {space!r}")
    for role, fields in space.items():
        if role not in ROLES:
            raise SearchError(
                f"unknown key search.space.{role}"
                f"{did_you_mean(role, ROLES, 'search.space')}; "
                f"valid roles: {', '.join(ROLES)}"
            )
        if not fields or not isinstance(fields, dict):
            raise SearchError(
                f"search.space.{role} is empty: give at least one format field "
                f"and its choices, e.g. {{width: [3, 4, 6]}}; got {fields!r}"
            )
        for field, choices in fields.items():
            if not isinstance(choices, list) or not choices:
                raise SearchError(
                    f"search.space.{role}.{field} must be a non-empty list of "
                    f"choices, got {choices!r}"
                )
            if len(set(map(repr, choices))) != len(choices):
                raise SearchError(f"search.space.{role}.{field} lists a choice twice: {choices}")
    check_one_of("search.granularity", d.get("granularity", "module"), GRANULARITIES, SearchError)
    objectives = d.get("objectives", list(OBJECTIVES))
    if (
        not isinstance(objectives, list)
        or not objectives
        or any(o not in OBJECTIVES for o in objectives)
        or len(set(objectives)) != len(objectives)
    ):
        raise SearchError(
            f"search.objectives must be a non-empty list of distinct names from "
            f"{', '.join(OBJECTIVES)}; got {objectives!r}"
        )
    constraint = d.get("constraint") or {}
    if not isinstance(constraint, dict):
        raise SearchError(
            f"search.constraint must be a mapping like {{max_bits: 5.0}}, got {constraint!r}"
        )
    for key, v in constraint.items():
        if key != "max_bits":
            raise SearchError(
                f"unknown key search.constraint.{key}"
                f"{did_you_mean(key, ['max_bits'], 'search.constraint')}; "
                "valid keys: max_bits"
            )
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise SearchError(f"search.constraint.max_bits must be a finite number > 0, got {v!r}")
    for key, low in (("trials", 1), ("held_out_samples", 1), ("seed", 0), ("seed_trials", 0)):
        _int(d, key, low)
    check_one_of("search.sampler", d.get("sampler", "tpe"), SAMPLERS, SearchError)
    sens = d.get("sensitivity")
    if sens is not None and not isinstance(sens, str):
        raise SearchError(f"search.sensitivity must be the path of a sensitivity.csv, got {sens!r}")
    if sens is not None:
        read_sensitivity(sens)  # a bad table fails here, before the model loads
    widths = d.get("uniform_widths", [3, 4, 5, 6, 8])
    if not isinstance(widths, list) or not all(isinstance(w, int) for w in widths):
        raise SearchError(f"search.uniform_widths must be a list of integers, got {widths!r}")
    spec = SearchSpec(**{**d, "constraint": dict(constraint)})
    spec.constraint = {k: float(v) for k, v in constraint.items()}
    return spec


def read_sensitivity(path: str) -> dict[str, int]:
    """``{unit: rank}`` of a ``qat sensitivity`` table, checked (one line for a bad file)."""
    where = f"search.sensitivity: {path!r}"
    p = Path(path)
    if not p.is_file():
        raise SearchError(
            f"{where} does not exist (write it with qat sensitivity)"
            if not p.exists()
            else f"{where} is not a regular file"
        )
    try:
        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise SearchError(f"{where} cannot be read as CSV ({e})") from None
    if not rows or not {"unit", "rank"} <= set(rows[0]):
        raise SearchError(
            f"{where} is not a sensitivity table (no unit and rank columns); "
            "write it with qat sensitivity"
        )
    ranks: dict[str, int] = {}
    for n, r in enumerate(rows, 2):  # line 1 is the header
        unit, rank = r.get("unit"), r.get("rank")
        try:
            ranks[str(unit)] = int(str(rank))
        except ValueError:
            raise SearchError(
                f"{where} line {n}: rank {rank!r} of unit {unit!r} is not an integer"
            ) from None
        if not unit:
            raise SearchError(f"{where} line {n}: no unit name")
    return ranks
