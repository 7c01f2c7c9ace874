"""QuantConfig: which formats go where. Plain data, validated eagerly with key paths."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

from qat.errors import QatError
from qat.formats import Format, FormatError, make_format
from qat.models import HEAD_NAMES

ROLES = ("weight", "activation", "matmul")
V_AXES = ("head_dim", "seq")


class QuantConfigError(QatError):
    """An invalid ``quant:`` section; the message names the key path and value."""


def merge_spec(base: Mapping[str, Any] | None, partial: Mapping[str, Any] | None
               ) -> dict[str, Any] | None:
    """Apply an override's partial spec to a base spec.

    A partial spec that names a different ``format`` starts afresh (the base's parameters
    belong to the base format); ``None`` means float.
    """
    if partial is None:
        return None
    if base is None or ("format" in partial and partial["format"] != base.get("format")):
        return dict(partial)
    return {**base, **partial}


@dataclasses.dataclass
class QuantConfig:
    """Formats for weights, activations (linear inputs) and attention matmuls.

    ``exclude`` and the keys of ``overrides`` are regular expressions searched in module
    names (``re.search``; anchor with ``^...$`` for an exact name). ``overrides`` maps a
    pattern to partial specs per role, e.g. ``{".*fc2": {"weight": {"width": 6}}}``; the first
    matching pattern wins. ``v_block_axis`` blocks V of ``P @ V`` along ``head_dim`` (default,
    causal-safe) or along ``seq`` (the reduction dim; leaks later tokens in decoders).
    ``backend`` picks the implementation (``auto``, ``triton``, ``compile``, ``reference``;
    see ``qat.quant.backends``); every backend gives the same values.
    """

    weight: dict[str, Any] | None = None
    activation: dict[str, Any] | None = None
    matmul: dict[str, Any] | None = None
    exclude: list[str] = dataclasses.field(default_factory=lambda: list(HEAD_NAMES))
    overrides: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    v_block_axis: str = "head_dim"
    backend: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, prefix: str = "quant") -> QuantConfig | None:
        """Build from a recipe's ``quant:`` mapping; ``None`` (float) passes through."""
        if d is None:
            return None
        if isinstance(d, QuantConfig):
            return d
        if not isinstance(d, Mapping):
            raise QuantConfigError(f"{prefix} must be a mapping or null, got {d!r}")
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in valid:
                import difflib

                close = difflib.get_close_matches(str(key), valid, n=1)
                hint = f" (did you mean {prefix}.{close[0]}?)" if close else ""
                raise QuantConfigError(
                    f"unknown key {prefix}.{key}{hint}; valid keys: {', '.join(valid)}")
        return cls(**{k: _plain(v) for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        for role in ROLES:
            spec = getattr(self, role)
            if spec is not None and not isinstance(spec, Mapping):
                raise QuantConfigError(f"quant.{role} must be a format spec mapping or null, "
                                       f"got {spec!r}")
            _build(spec, f"quant.{role}")
        if isinstance(self.exclude, str) or not isinstance(self.exclude, list):
            raise QuantConfigError(f"quant.exclude must be a list of regexes, got {self.exclude!r}")
        for pat in self.exclude:
            _compile(pat, "quant.exclude")
        if not isinstance(self.overrides, Mapping):
            raise QuantConfigError(f"quant.overrides must map regex -> partial spec, "
                                   f"got {self.overrides!r}")
        for pat, partial in self.overrides.items():
            _compile(pat, f"quant.overrides[{pat!r}]")
            if not isinstance(partial, Mapping):
                raise QuantConfigError(f"quant.overrides[{pat!r}] must map roles "
                                       f"({', '.join(ROLES)}) to specs, got {partial!r}")
            for role, sub in partial.items():
                if role not in ROLES:
                    raise QuantConfigError(
                        f"quant.overrides[{pat!r}] has unknown role {role!r}; valid roles: "
                        f"{', '.join(ROLES)}")
                if sub is not None and not isinstance(sub, Mapping):
                    raise QuantConfigError(f"quant.overrides[{pat!r}].{role} must be a mapping "
                                           f"or null, got {sub!r}")
                _build(merge_spec(getattr(self, role), sub), f"quant.overrides[{pat!r}].{role}")
        from qat.quant.backends import BACKENDS

        if self.backend not in BACKENDS:
            raise QuantConfigError(f"quant.backend must be one of {', '.join(BACKENDS)}; "
                                   f"got {self.backend!r}")
        if self.v_block_axis not in V_AXES:
            raise QuantConfigError(f"quant.v_block_axis must be one of {', '.join(V_AXES)}; "
                                   f"got {self.v_block_axis!r}")

    def is_excluded(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.exclude)

    def override_for(self, name: str) -> str | None:
        """The first override pattern that matches ``name``, if any."""
        for pat in self.overrides:
            if re.search(pat, name):
                return pat
        return None

    def spec_for(self, role: str, name: str) -> dict[str, Any] | None:
        """The resolved spec of ``role`` for module ``name`` (overrides applied)."""
        spec = getattr(self, role)
        pat = self.override_for(name)
        if pat is not None and role in self.overrides[pat]:
            spec = merge_spec(spec, self.overrides[pat][role])
        return spec

    def format_for(self, role: str, name: str) -> Format | None:
        """The format of ``role`` for module ``name``; equal specs share one Format object
        (built once, so a ``codebook_file`` is read once, not once per layer)."""
        spec = self.spec_for(role, name)
        if spec is None:
            return None
        key = json.dumps(spec, sort_keys=True, default=str)
        cache = self.__dict__.setdefault("_formats", {})
        if key not in cache:
            cache[key] = make_format(spec)
        return cache[key]


def _plain(v: Any) -> Any:
    """Deep-copy mappings to plain dicts (YAML / OmegaConf-like inputs)."""
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _build(spec: Mapping[str, Any] | None, where: str) -> Format | None:
    if spec is None:
        return None
    try:
        return make_format(spec)
    except (FormatError, TypeError) as e:
        raise QuantConfigError(f"{where}: {e}") from None


def _compile(pat: Any, where: str) -> None:
    if not isinstance(pat, str):
        raise QuantConfigError(f"{where}: pattern must be a string, got {pat!r}")
    try:
        re.compile(pat)
    except re.error as e:
        raise QuantConfigError(f"{where}: invalid regex {pat!r}: {e}") from None
