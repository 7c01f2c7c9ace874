"""The search space of one model: its units (modules, or blocks) x roles x format fields, and
a trial's choices turned into a quant config with one exact-name override per module."""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any

from qat.analysis.profile import layer_depth
from qat.analysis.search.spec import ROLES, SearchError, SearchSpec
from qat.formats import FormatError, make_format
from qat.quant.config import merge_spec
from qat.quant.quantize import attention_modules


def _format(spec: dict[str, Any] | None, where: str):

    try:
        return make_format(spec)
    except (FormatError, TypeError) as e:
        raise SearchError(f"{where}: {e}") from None


def space_combos(spec: SearchSpec, base) -> dict[str, list[dict[str, Any]]]:
    """Check every choice against the recipe's base formats (before the model loads) and
    return, per role, every combination of its field choices (each a valid format)."""

    out = {}
    for role, fields in spec.space.items():
        role_base = getattr(base, role)
        if role_base is None and "format" not in fields:
            raise SearchError(
                f"search.space.{role}: the recipe's quant.{role} is null "
                f"(float); give it a base format or search a format field"
            )
        for field, choices in fields.items():
            for c in choices:
                _format(merge_spec(role_base, {field: c}), f"search.space.{role}.{field}")
        out[role] = []
        for values in itertools.product(*fields.values()):
            choice = dict(zip(fields, values))
            _format(merge_spec(role_base, choice), f"search.space.{role} choice {choice}")
            out[role].append(choice)
    return out


@dataclasses.dataclass
class Unit:
    """One searched unit: a module, or every module of one transformer block."""

    name: str
    linears: list[str]
    attention: list[str]

    def modules_for(self, role: str) -> list[str]:
        return self.attention if role == "matmul" else self.linears


class Space:
    """Units x roles x fields of one model; turns a trial's choices into a quant config."""

    def __init__(self, model, recipe, spec: SearchSpec) -> None:
        from torch import nn
        from transformers.pytorch_utils import Conv1D

        self.spec, self.base = spec, recipe.args.quant
        self.max_length = recipe.args.max_length
        self.linears, self.attention = [], []
        attention = dict(attention_modules(model))
        for name, m in model.named_modules():
            if not name or self.base.is_excluded(name):
                continue
            if isinstance(m, (nn.Linear, Conv1D)):
                self.linears.append(name)
            elif name in attention:
                self.attention.append(name)
        units: dict[str, Unit] = {}
        for name in self.linears + self.attention:
            depth = layer_depth(name) if spec.granularity == "layer" else -1
            key = f"layer.{depth}" if depth >= 0 else name
            unit = units.setdefault(key, Unit(key, [], []))
            (unit.attention if name in self.attention else unit.linears).append(name)
        # a unit with no searched role (attention when only linears are searched) is no unit
        self.units = [u for u in units.values() if any(u.modules_for(r) for r in spec.space)]
        self._check_roles()
        self.combos = space_combos(spec, self.base)

    def _check_roles(self) -> None:
        for role in self.spec.space:
            if not any(u.modules_for(role) for u in self.units):
                what = "attention" if role == "matmul" else "linear"
                raise SearchError(
                    f"search.space.{role}: the model has no quantised {what} module to search"
                )

    def params(self) -> dict[str, list[Any]]:
        """Optuna parameter name -> choices, one per unit, role and field."""
        return {
            f"{u.name}:{role}.{field}": list(choices)
            for u in self.units
            for role, fields in self.spec.space.items()
            if u.modules_for(role)
            for field, choices in fields.items()
        }

    def bits_of(self, role: str, name: str, choice: dict[str, Any]) -> float:

        return _format(merge_spec(self.base.spec_for(role, name), choice), role).bits_per_element

    def extreme(self, low: bool) -> dict[str, dict[str, Any]]:
        """Per role, the choice with the fewest (``low``) or most bits."""
        out = {}
        for role, combos in self.combos.items():
            name = next(m for u in self.units for m in u.modules_for(role))
            key = lambda c, role=role, name=name: self.bits_of(role, name, c)
            out[role] = min(combos, key=key) if low else max(combos, key=key)
        return out

    def base_choice(self) -> dict[str, dict[str, Any]]:
        """Per role, the recipe's own value of each field where it is a choice (else the
        choice with the most bits): what a unit keeps when a mix does not lower it."""
        high = self.extreme(low=False)
        out = {}
        for role, fields in self.spec.space.items():
            base = getattr(self.base, role) or {}
            out[role] = {
                f: base[f] if base.get(f) in c else high[role][f] for f, c in fields.items()
            }
        return out

    def params_for(self, per_unit: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
        """Optuna params from ``{unit: {role: {field: value}}}``."""
        return {
            f"{u}:{role}.{field}": v
            for u, roles in per_unit.items()
            for role, choice in roles.items()
            for field, v in choice.items()
            if any(x.name == u and x.modules_for(role) for x in self.units)
        }

    def quant_dict(
        self,
        params: dict[str, Any] | None = None,
        fields_override: dict[str, dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """The recipe's quant section with one exact-name override per module whose resolved
        spec differs from the recipe's; ``fields_override`` sets fields for every module."""

        params = params or {}
        module_roles: dict[str, dict[str, Any]] = {}
        for u in self.units:
            for role in ROLES:
                choice = dict(fields_override.get(role, {})) if fields_override else {}
                for key, v in params.items():
                    unit, _, rf = key.partition(":")
                    r, _, field = rf.partition(".")
                    if unit == u.name and r == role:
                        choice[field] = v
                if not choice:
                    continue
                for name in u.modules_for(role):
                    old = self.base.spec_for(role, name)
                    if old is None and "format" not in choice:
                        continue  # float stays float unless a format is chosen
                    new = merge_spec(old, choice)
                    if new != old:
                        base = getattr(self.base, role)
                        part = (
                            {k: v for k, v in new.items() if base.get(k) != v}
                            if base and new.get("format") == base.get("format")
                            else new
                        )
                        module_roles.setdefault(name, {})[role] = part
        q = self.base.to_dict()
        ours = {f"^{re.escape(n)}$": r for n, r in module_roles.items()}
        # The recipe's own patterns stay (after ours: first match wins) where they still
        # match a module we left alone; quantize_model rejects a pattern that matches nothing.
        left = [n for n in self.linears + self.attention if n not in module_roles]
        kept = {p: r for p, r in q["overrides"].items() if any(re.search(p, n) for n in left)}
        q["overrides"] = {**ours, **kept}
        return q
