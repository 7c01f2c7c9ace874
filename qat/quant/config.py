"""QuantConfig: which formats go where. Specs in, Format objects resolved once, key-path errors."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

from qat.errors import QatError, check_one_of, check_section
from qat.formats import Format, FormatError, make_format
from qat.quant.backends import BACKENDS
from qat.quant.rotation import check_rotation_spec, has_online_rotation, is_fused
from qat.quant.transforms.gptq import check_gptq_format, check_gptq_spec

# The task heads every supported architecture names its output layer with: classification
# heads (sequence classifiers: BERT's ``classifier``, decoders' ``score``) and the LM head.
# They are freshly initialised or tied to the embeddings, so quantisation leaves them float
# (``QuantConfig.exclude``) and ``finetune: classifier`` / LoRA's ``modules_to_save`` train them.
CLASSIFIER_HEADS = ("score", "classifier")
HEAD_NAMES = (*CLASSIFIER_HEADS, "lm_head")
ROLES = ("weight", "activation", "matmul")
V_AXES = ("head_dim", "seq")


class QuantConfigError(QatError):
    """An invalid ``quant:`` section; the message names the key path and value.

    >>> import qat
    >>> qat.QuantConfig.from_dict({"weight": {"format": "bfp", "width": 0}})
    Traceback (most recent call last):
    ...
    qat.quant.config.QuantConfigError: quant.weight: bfp.width must be in [2, 24], got 0
    >>> issubclass(qat.QuantConfigError, qat.QatError)
    True"""


def merge_spec(
    base: Mapping[str, Any] | None, partial: Mapping[str, Any] | None
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


@dataclasses.dataclass(frozen=True)
class ModuleFormats:
    """The resolved formats of one module (``None``: that role stays float)."""

    weight: Format | None = None
    activation: Format | None = None
    matmul: Format | None = None


FLOAT = ModuleFormats()


@dataclasses.dataclass
class QuantConfig:
    """Formats for weights, activations (linear inputs) and attention matmuls.

    >>> import qat
    >>> w4 = {"format": "bfp", "width": 4, "block_size": 16}
    >>> config = qat.QuantConfig.from_dict({"weight": w4, "activation": w4,
    ...                                     "exclude": ["lm_head", "mlp"]})
    >>> config.weight, config.matmul, config.exclude
    ({'format': 'bfp', 'width': 4, 'block_size': 16}, None, ['lm_head', 'mlp'])

    ``exclude`` and the keys of ``overrides`` are regular expressions searched in module
    names (``re.search``; anchor with ``^...$`` for an exact name). ``overrides`` maps a
    pattern to partial specs per role, e.g. ``{".*fc2": {"weight": {"width": 6}}}``; the first
    matching pattern wins. ``v_block_axis`` blocks V of ``P @ V`` along ``head_dim`` (default,
    causal-safe) or along ``seq`` (the reduction dim; leaks later tokens in decoders).
    ``backend`` picks the implementation (``auto``, ``triton``, ``compile``, ``reference``;
    see ``qat.quant.backends``); every backend gives the same values. ``rotation``
    (``{kind: hadamard, size: 64 | block}``, null = off; ``qat.quant.rotation``) rotates both
    operands of every quantised linear along ``in_features``, and Q and K along head_dim; an
    override may set its own (``{".*down_proj": {rotation: {size: 128}}}``, or ``null``). The
    fused form (``{residual: hadamard, heads: hadamard, online: {size: 16}}``,
    ``qat.quant.transforms.fuse``) rotates the residual stream and the V/O head space in the
    weights. ``gptq`` (``{samples: 128, damp: 0.01}``, ``qat.quant.transforms.gptq``) rounds the
    weights by GPTQ on calibration rows when a model is built from a recipe (``qat.runs.build``).

    The fields are the specs as written (``to_dict`` gives them back, the JSON of
    ``qat_config.json``); a ``Format`` object may stand in for a spec. Building the config
    merges each override into the base specs once and builds one ``Format`` per distinct
    spec (a ``codebook_file`` is read once); ``formats_for(name)`` only looks them up.
    Assigning a field re-resolves, so the formats never go stale.
    """

    weight: dict[str, Any] | None = None
    activation: dict[str, Any] | None = None
    matmul: dict[str, Any] | None = None
    exclude: list[str] = dataclasses.field(default_factory=lambda: list(HEAD_NAMES))
    overrides: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    v_block_axis: str = "head_dim"
    backend: str = "auto"
    rotation: dict[str, Any] | None = None
    gptq: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for role in ROLES:  # a Format given in place of its spec
            fmt = getattr(self, role)
            if isinstance(fmt, Format):
                object.__setattr__(self, role, fmt.spec())
        self.validate()

    def __setattr__(self, key: str, value: Any) -> None:
        if "_resolved" not in self.__dict__ or key not in _FIELDS:  # still in __init__
            super().__setattr__(key, value)
            return
        old = getattr(self, key)
        super().__setattr__(key, value)
        try:
            self.__post_init__()
        except Exception:
            super().__setattr__(key, old)  # a refused value leaves the config as it was
            raise

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, prefix: str = "quant") -> QuantConfig | None:
        """Build from a recipe's ``quant:`` mapping; ``None`` (float) passes through."""
        if d is None:
            return None
        if isinstance(d, QuantConfig):
            return d
        check_section(d, cls, prefix, QuantConfigError)
        return cls(**{k: _plain(v) for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check every key and build the formats (kept: see ``formats_for``)."""
        built: dict[str, Format] = {}  # canonical spec JSON -> its one Format
        base: dict[str, dict[str, Any] | None] = {}
        for role in ROLES:
            spec = getattr(self, role)
            if spec is not None and not isinstance(spec, Mapping):
                raise QuantConfigError(
                    f"quant.{role} must be a format spec mapping or null, got {spec!r}"
                )
            base[role] = None if spec is None else dict(spec)
        base["rotation"] = check_rotation_spec(self.rotation, "quant.rotation", QuantConfigError)
        specs: dict[str | None, dict[str, dict[str, Any] | None]] = {None: base}
        formats = {None: {role: _build(base[role], f"quant.{role}", built) for role in ROLES}}
        if isinstance(self.exclude, str) or not isinstance(self.exclude, list):
            raise QuantConfigError(f"quant.exclude must be a list of regexes, got {self.exclude!r}")
        for pat in self.exclude:
            _compile(pat, "quant.exclude")
        if not isinstance(self.overrides, Mapping):
            raise QuantConfigError(
                f"quant.overrides must map regex -> partial spec, got {self.overrides!r}"
            )
        for pat, partial in self.overrides.items():
            _compile(pat, f"quant.overrides[{pat!r}]")
            specs[pat], formats[pat] = dict(base), dict(formats[None])
            if not isinstance(partial, Mapping):
                raise QuantConfigError(
                    f"quant.overrides[{pat!r}] must map roles "
                    f"({', '.join(ROLES)}) to specs, got {partial!r}"
                )
            for role, sub in partial.items():
                if role == "rotation":
                    specs[pat][role] = check_rotation_spec(
                        sub, f"quant.overrides[{pat!r}].rotation", QuantConfigError, fused=False
                    )
                    continue
                if role not in ROLES:
                    raise QuantConfigError(
                        f"quant.overrides[{pat!r}] has unknown role {role!r}; valid roles: "
                        f"{', '.join(ROLES)} (and rotation)"
                    )
                if sub is not None and not isinstance(sub, Mapping):
                    raise QuantConfigError(
                        f"quant.overrides[{pat!r}].{role} must be a mapping or null, got {sub!r}"
                    )
                specs[pat][role] = merge_spec(base[role], sub)
                formats[pat][role] = _build(
                    specs[pat][role], f"quant.overrides[{pat!r}].{role}", built
                )

        check_one_of("quant.backend", self.backend, BACKENDS, QuantConfigError)
        check_one_of("quant.v_block_axis", self.v_block_axis, V_AXES, QuantConfigError)
        resolved = {pat: ModuleFormats(**roles) for pat, roles in formats.items()}
        gptq = _check_gptq(self.gptq, resolved)
        # Plain attributes, not fields: to_dict, == and repr see only the specs.
        object.__setattr__(self, "_specs", specs)
        object.__setattr__(self, "_resolved", resolved)
        object.__setattr__(self, "_gptq", gptq)

    def is_excluded(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.exclude)

    def override_for(self, name: str) -> str | None:
        """The first override pattern that matches ``name``, if any."""
        for pat in self.overrides:
            if re.search(pat, name):
                return pat
        return None

    def spec_for(self, role: str, name: str) -> dict[str, Any] | None:
        """The spec of ``role`` for module ``name`` (its override merged in; a copy)."""
        spec = self._specs[self.override_for(name)][role]  # type: ignore[attr-defined]
        return None if spec is None else dict(spec)

    def rotation_for(self, name: str) -> dict[str, Any] | None:
        """The online block rotation spec (``{kind, size}``) of module ``name``: None when off,
        excluded, or under a fused rotation (whose online parts ``quantize_model`` places)."""
        if self.is_excluded(name):
            return None
        spec = self._specs[self.override_for(name)]["rotation"]  # type: ignore[attr-defined]
        return None if spec is None or is_fused(spec) else dict(spec)

    @property
    def gptq_spec(self) -> dict[str, Any] | None:
        """The normalised ``{samples, damp, batch}`` of ``gptq`` (``qat.quant.transforms.gptq``),
        or None."""
        return self._gptq  # type: ignore[attr-defined]

    @property
    def fused_rotation(self) -> dict[str, Any] | None:
        """The normalised fused rotation spec (``{residual, heads, online, seed, learned}``,
        ``qat.quant.transforms.fuse``), or None when ``rotation`` is off or the online block
        form."""
        spec = self._specs[None]["rotation"]  # type: ignore[attr-defined]
        return dict(spec) if is_fused(spec) else None

    def formats_for(self, name: str) -> ModuleFormats:
        """The formats of module ``name``: its override's, else the base ones; all None
        (float) for an excluded module. Equal specs share one Format object."""
        if self.is_excluded(name):
            return FLOAT
        return self._resolved[self.override_for(name)]  # type: ignore[attr-defined]

    def all_formats(self) -> list[ModuleFormats]:
        """The formats a module may get: the base ones and each override's (what an export
        target checks before the model loads)."""
        return list(self._resolved.values())  # type: ignore[attr-defined]

    def is_rotated(self) -> bool:
        """Whether any module may be rotated online (the block ``rotation``, a fused rotation's
        ``online`` part, or an override's): what an engine would have to run itself. Rotations
        fused into the weights are ordinary weights."""
        return has_online_rotation(self)

    @property
    def base_formats(self) -> ModuleFormats:
        """The formats of a module that no override matches."""
        return self._resolved[None]  # type: ignore[attr-defined]

    def format_for(self, role: str, name: str) -> Format | None:
        """The format of ``role`` for module ``name`` (see ``formats_for``)."""
        return getattr(self.formats_for(name), role)


_FIELDS = frozenset(f.name for f in dataclasses.fields(QuantConfig))


def _plain(v: Any) -> Any:
    """Deep-copy mappings to plain dicts (YAML / OmegaConf-like inputs)."""
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _build(spec: Mapping[str, Any] | None, where: str, built: dict[str, Format]) -> Format | None:
    """The Format of ``spec``, shared through ``built`` with every equal spec."""
    if spec is None:
        return None
    key = json.dumps(spec, sort_keys=True, default=str)
    if key not in built:
        try:
            built[key] = make_format(spec)
        except (FormatError, TypeError) as e:
            raise QuantConfigError(f"{where}: {e}") from None
    return built[key]


def _check_gptq(spec: Any, resolved: dict[str | None, ModuleFormats]) -> dict[str, Any] | None:
    """``quant.gptq``: its keys, and weight formats it can round (one line otherwise)."""

    gptq = check_gptq_spec(spec, "quant.gptq", QuantConfigError)
    if gptq is None:
        return None
    weights = [(pat, f.weight) for pat, f in resolved.items() if f.weight is not None]
    if not weights:
        raise QuantConfigError("quant.gptq rounds quantised weights, and quant.weight is null")
    for pat, fmt in weights:
        where = "quant.weight" if pat is None else f"quant.overrides[{pat!r}].weight"
        check_gptq_format(fmt, where, QuantConfigError)
    return gptq


def _compile(pat: Any, where: str) -> None:
    if not isinstance(pat, str):
        raise QuantConfigError(f"{where}: pattern must be a string, got {pat!r}")
    try:
        re.compile(pat)
    except re.error as e:
        raise QuantConfigError(f"{where}: invalid regex {pat!r}: {e}") from None
