"""``qat search``: mixed-precision search, per module (or per block) and per operand.

    qat search recipes/minilm_sst2_search.yaml --model_name_or_path outputs/minilm_sst2_float
    qat search recipes/minilm_sst2_search.yaml --search.trials 16 --resume

The recipe's ``search:`` section names the space (per role, per format field, the choices),
the granularity, the objectives and an optional ``max_bits`` constraint. Every trial is
post-training quantisation of the recipe's model: the float model is loaded once, and each
trial quantises a deep copy with the recipe's ``quant`` section plus one exact-name override
per module for the trial's choices, then scores it on a held-out slice of the TRAIN split (the
validation split is only used once, for the chosen point and the uniform references).

Bits objective: the element-weighted average bits per element over every quantised tensor
that one sequence of ``max_length`` tokens touches. Weights count once (their element counts
and bits as ``qat.quant.density`` reports them); a quantised linear's input counts
``in_features * max_length`` elements; an attention module's matmul operands count Q, K and V
(``hidden_size * max_length`` each) and P (``num_heads * max_length**2``). Weights dominate
for any real model; the activation and matmul terms break ties between otherwise equal mixes.

Optuna drives the study, stored in ``output_dir/search.db`` (SQLite), so ``--resume`` picks up
after the last finished trial; a trial killed half-way is re-run with the same choices.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import difflib
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

from qat.errors import QatError

OBJECTIVES = ("accuracy", "bits")
SAMPLERS = ("tpe", "nsga2", "random")
GRANULARITIES = ("module", "layer")
ROLES = ("weight", "activation", "matmul")
LINEAR_ROLES = ("weight", "activation")
STUDY_NAME = "qat-search"
DB_FILE = "search.db"


class SearchError(QatError):
    """A bad ``search:`` section or search state; one line naming the key."""


@dataclasses.dataclass
class SearchSpec:
    """The parsed ``search:`` section; see the README's Search section for each key."""

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


def _close(key: str, valid: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _int(d: dict[str, Any], key: str, low: int) -> None:
    v = d.get(key)
    if key in d and (not isinstance(v, int) or isinstance(v, bool) or v < low):
        raise SearchError(f"search.{key} must be an integer >= {low}, got {v!r}")


def parse_spec(d: Any) -> SearchSpec:
    """Validate the ``search:`` mapping on its own (the model-dependent checks come later)."""
    if d is None:
        raise SearchError("the recipe has no search: section; add one with at least "
                          "search.space (see recipes/minilm_sst2_search.yaml)")
    if not isinstance(d, dict):
        raise SearchError(f"search must be a mapping, got {d!r}")
    valid = [f.name for f in dataclasses.fields(SearchSpec)]
    for key in d:
        if key not in valid:
            raise SearchError(f"unknown key search.{key}{_close(str(key), valid, 'search.')}; "
                              f"valid keys: {', '.join(valid)}")
    space = d.get("space")
    if not space:
        raise SearchError("search.space is empty: name at least one role (weight, activation, "
                          "matmul) with a format field and its choices, e.g. "
                          "{weight: {width: [3, 4, 6]}}")
    if not isinstance(space, dict):
        raise SearchError(f"search.space must map roles to {{field: [choices]}}, got {space!r}")
    for role, fields in space.items():
        if role not in ROLES:
            raise SearchError(f"unknown key search.space.{role}"
                              f"{_close(str(role), list(ROLES), 'search.space.')}; "
                              f"valid roles: {', '.join(ROLES)}")
        if not fields or not isinstance(fields, dict):
            raise SearchError(f"search.space.{role} is empty: give at least one format field "
                              f"and its choices, e.g. {{width: [3, 4, 6]}}; got {fields!r}")
        for field, choices in fields.items():
            if not isinstance(choices, list) or not choices:
                raise SearchError(f"search.space.{role}.{field} must be a non-empty list of "
                                  f"choices, got {choices!r}")
            if len(set(map(repr, choices))) != len(choices):
                raise SearchError(f"search.space.{role}.{field} lists a choice twice: {choices}")
    if d.get("granularity", "module") not in GRANULARITIES:
        raise SearchError(f"search.granularity must be one of {', '.join(GRANULARITIES)}; "
                          f"got {d['granularity']!r}")
    objectives = d.get("objectives", list(OBJECTIVES))
    if (not isinstance(objectives, list) or not objectives
            or any(o not in OBJECTIVES for o in objectives)
            or len(set(objectives)) != len(objectives)):
        raise SearchError(f"search.objectives must be a non-empty list of distinct names from "
                          f"{', '.join(OBJECTIVES)}; got {objectives!r}")
    constraint = d.get("constraint") or {}
    if not isinstance(constraint, dict):
        raise SearchError(f"search.constraint must be a mapping like {{max_bits: 5.0}}, got "
                          f"{constraint!r}")
    for key, v in constraint.items():
        if key != "max_bits":
            raise SearchError(f"unknown key search.constraint.{key}"
                              f"{_close(str(key), ['max_bits'], 'search.constraint.')}; "
                              "valid keys: max_bits")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) \
                or v <= 0:
            raise SearchError(f"search.constraint.max_bits must be a finite number > 0, got "
                              f"{v!r}")
    for key, low in (("trials", 1), ("held_out_samples", 1), ("seed", 0), ("seed_trials", 0)):
        _int(d, key, low)
    if d.get("sampler", "tpe") not in SAMPLERS:
        raise SearchError(f"search.sampler must be one of {', '.join(SAMPLERS)}; "
                          f"got {d['sampler']!r}")
    sens = d.get("sensitivity")
    if sens is not None and not isinstance(sens, str):
        raise SearchError(f"search.sensitivity must be the path of a sensitivity.csv, got "
                          f"{sens!r}")
    if sens is not None:
        read_sensitivity(sens)  # a bad table fails here, before the model loads
    widths = d.get("uniform_widths", [3, 4, 5, 6, 8])
    if not isinstance(widths, list) or not all(isinstance(w, int) for w in widths):
        raise SearchError(f"search.uniform_widths must be a list of integers, got {widths!r}")
    spec = SearchSpec(**{**d, "constraint": dict(constraint)})
    spec.constraint = {k: float(v) for k, v in constraint.items()}
    return spec


def read_recipe_and_spec(path: str, overrides: list[str]):
    """The recipe (overrides applied, ``search`` taken out) and its parsed search spec."""
    from qat.runs.recipe import apply_override, build_recipe, load_recipe_dict, parse_overrides

    data = load_recipe_dict(path)
    search = data.pop("search", None)
    search = copy.deepcopy(search) if isinstance(search, dict) else search
    for key, value in parse_overrides(overrides).items():
        if key == "search":
            search = value
        elif key.startswith("search."):
            if not isinstance(search, dict):
                search = {}
            apply_override(search, key[len("search."):], value)
        else:
            apply_override(data, key, value)  # build_recipe names unknown keys
    spec = parse_spec(search)
    recipe = build_recipe(data, str(path))
    if recipe.args.quant is None:
        raise SearchError("the recipe's quant section is null: the search needs it as the base "
                          "formats whose fields it varies")
    space_combos(spec, recipe.args.quant)
    return recipe, spec, data


# --------------------------------------------------------------------------- the space


def _format(spec: dict[str, Any] | None, where: str):
    from qat.formats import FormatError, make_format

    try:
        return make_format(spec)
    except (FormatError, TypeError) as e:
        raise SearchError(f"{where}: {e}") from None


def space_combos(spec: SearchSpec, base) -> dict[str, list[dict[str, Any]]]:
    """Check every choice against the recipe's base formats (before the model loads) and
    return, per role, every combination of its field choices (each a valid format)."""
    from qat.quant.config import merge_spec

    out = {}
    for role, fields in spec.space.items():
        role_base = getattr(base, role)
        if role_base is None and "format" not in fields:
            raise SearchError(f"search.space.{role}: the recipe's quant.{role} is null "
                              f"(float); give it a base format or search a format field")
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

        from qat.analysis.profile import layer_depth
        from qat.quant.quantize import attention_modules

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
                raise SearchError(f"search.space.{role}: the model has no quantised {what} "
                                  "module to search")

    def params(self) -> dict[str, list[Any]]:
        """Optuna parameter name -> choices, one per unit, role and field."""
        return {f"{u.name}:{role}.{field}": list(choices)
                for u in self.units for role, fields in self.spec.space.items()
                if u.modules_for(role) for field, choices in fields.items()}

    def bits_of(self, role: str, name: str, choice: dict[str, Any]) -> float:
        from qat.quant.config import merge_spec

        return _format(merge_spec(self.base.spec_for(role, name), choice),
                       role).bits_per_element

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
            out[role] = {f: base[f] if base.get(f) in c else high[role][f]
                         for f, c in fields.items()}
        return out

    def params_for(self, per_unit: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
        """Optuna params from ``{unit: {role: {field: value}}}``."""
        return {f"{u}:{role}.{field}": v for u, roles in per_unit.items()
                for role, choice in roles.items() for field, v in choice.items()
                if any(x.name == u and x.modules_for(role) for x in self.units)}

    def quant_dict(self, params: dict[str, Any] | None = None,
                   fields_override: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """The recipe's quant section with one exact-name override per module whose resolved
        spec differs from the recipe's; ``fields_override`` sets fields for every module."""
        from qat.quant.config import merge_spec

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
                        part = ({k: v for k, v in new.items() if base.get(k) != v}
                                if base and new.get("format") == base.get("format") else new)
                        module_roles.setdefault(name, {})[role] = part
        q = self.base.to_dict()
        ours = {f"^{re.escape(n)}$": r for n, r in module_roles.items()}
        # The recipe's own patterns stay (after ours: first match wins) where they still
        # match a module we left alone; quantize_model rejects a pattern that matches nothing.
        left = [n for n in self.linears + self.attention if n not in module_roles]
        kept = {p: r for p, r in q["overrides"].items() if any(re.search(p, n) for n in left)}
        q["overrides"] = {**ours, **kept}
        return q


# --------------------------------------------------------------------------- scoring


class Scorer:
    """Loads the float model and the data once; scores quant configs by PTQ."""

    def __init__(self, recipe, spec: SearchSpec) -> None:
        import torch

        from qat.runs.build import build_model
        from qat.tasks.glue import get_task

        self.recipe, self.spec = recipe, spec
        self.task = get_task(recipe.args.task_name)
        self.metric = self.task.metric_names[0]
        built = build_model(recipe, {"quant": None}, num_labels=self.task.num_labels)  # float
        self.model, self.tokenizer = built.model, built.tokenizer
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.space = Space(self.model, recipe, spec)
        self._data: dict[str, Any] = {}

    def split(self, which: str):
        """The held-out slice of the train split, or the validation split."""
        from qat.tasks.glue import load_glue, tokenize_glue

        if which == "held_out":
            raw = load_glue(self.task.name, self.recipe.args.data_dir, splits=("train",))
            ds = raw["train"].shuffle(seed=self.spec.seed)
            raw["train"] = ds.select(range(min(self.spec.held_out_samples, len(ds))))
        else:
            split = self.task.validation_splits[0]
            raw = load_glue(self.task.name, self.recipe.args.data_dir, splits=(split,))
        data = next(iter(tokenize_glue(raw, self.task, self.tokenizer,
                                       self.recipe.args.max_length).values()))
        if which != "held_out" and self.recipe.args.max_eval_samples:
            data = data.select(range(min(self.recipe.args.max_eval_samples, len(data))))
        return data

    def quantized(self, quant: dict[str, Any]):
        from qat.quant.quantize import quantize_model

        model = copy.deepcopy(self.model)
        return quantize_model(model, quant).to(self.device).eval()

    def score(self, quant: dict[str, Any], which: str = "held_out") -> dict[str, float]:
        """``{metric, bits, weight_bits, activation_bits, matmul_bits}`` of one config."""
        from qat.tasks.glue import evaluate_split as evaluate

        if which not in self._data:
            self._data[which] = self.split(which)
        data = self._data[which]
        model = self.quantized(quant)
        metrics = evaluate(model, self.tokenizer, self.task, data,
                           self.recipe.training_args.per_device_eval_batch_size)
        return {"accuracy": metrics[self.metric], **average_bits(model, self.space.max_length)}


def average_bits(model, seq_len: int) -> dict[str, float]:
    """Element-weighted bits per element over the quantised tensors (see the module doc)."""
    from qat.quant.density import density_report
    from qat.quant.modules import MatmulQuantizer, QuantConv1D, QuantLinear

    rep = density_report(model)
    parts = {"weight": [rep.quantized_bits, rep.quantized_params],
             "activation": [0.0, 0], "matmul": [0.0, 0]}
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", 0)
    heads = getattr(cfg, "num_attention_heads", 0)
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantConv1D)) and m.activation_quantizer is not None:
            n = m.weight.shape[1 if isinstance(m, QuantLinear) else 0] * seq_len
            parts["activation"][0] += m.activation_quantizer.fmt.bits_per_element * n
            parts["activation"][1] += n
        elif isinstance(m, MatmulQuantizer):
            n = 3 * hidden * seq_len + heads * seq_len * seq_len
            parts["matmul"][0] += m.q.fmt.bits_per_element * n
            parts["matmul"][1] += n
    total_bits = sum(b for b, _ in parts.values())
    total = sum(n for _, n in parts.values())
    out = {"bits": total_bits / total if total else 0.0}
    for role, (b, n) in parts.items():
        out[f"{role}_bits"] = b / n if n else float("nan")
    return out


# --------------------------------------------------------------------------- the study


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows no other row beats on both accuracy (higher) and bits (lower); sorted by bits."""
    front = []
    for r in rows:
        dominated = any(o["accuracy"] >= r["accuracy"] and o["bits"] <= r["bits"]
                        and (o["accuracy"] > r["accuracy"] or o["bits"] < r["bits"])
                        for o in rows)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: (r["bits"], -r["accuracy"]))


def choose(rows: list[dict[str, Any]], max_bits: float | None) -> dict[str, Any] | None:
    """The most accurate row within the constraint (fewer bits break ties)."""
    ok = [r for r in rows if max_bits is None or r["bits"] <= max_bits + 1e-9]
    return max(ok, key=lambda r: (r["accuracy"], -r["bits"])) if ok else None


def _sampler(spec: SearchSpec, offset: int = 0):
    """The sampler, seeded with ``seed + offset``: a resumed study passes its trial count, so
    the new process does not replay the first process's proposals."""
    import optuna

    def constraints(trial) -> list[float]:
        return [trial.user_attrs.get("bits", 0.0) - (spec.max_bits or math.inf)]

    cf = constraints if spec.max_bits is not None else None
    if spec.sampler == "tpe":
        # TPE fitted to one or two points keeps re-proposing them: start with random trials
        return optuna.samplers.TPESampler(seed=spec.seed + offset, constraints_func=cf,
                                          n_startup_trials=min(10, spec.trials))
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=spec.seed + offset, constraints_func=cf)
    return optuna.samplers.RandomSampler(seed=spec.seed + offset)


def scores_key(recipe, spec: SearchSpec) -> dict[str, Any]:
    """What a trial's scores depend on besides its own choices: a resumed study must match."""
    args = recipe.args
    key = {"model": args.model_name_or_path, "task": args.task_name,
           "data_dir": args.data_dir, "max_length": args.max_length,
           "held_out_samples": spec.held_out_samples, "seed": spec.seed,
           "quant": args.quant.to_dict()}
    return json.loads(json.dumps(key, default=str))  # as the study stores it (tuples: lists)


def check_study_file(out: Path, resume: bool, scores: dict[str, Any]) -> bool:
    """A new search never overwrites an old one; ``--resume`` needs one of ours to resume, scored
    the same way (``qat.analysis.study_file``). Returns whether to resume."""
    from qat.analysis.study_file import check_study_file as check

    return check(out / DB_FILE, STUDY_NAME, resume, scores)


def open_study(out: Path, spec: SearchSpec, space: Space, resume: bool,
               scores: dict[str, Any]):
    """Create the SQLite-backed study, or reopen it with ``--resume``."""
    import optuna

    db = out / DB_FILE
    resume = check_study_file(out, resume, scores)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["maximize" if o == "accuracy" else "minimize" for o in spec.objectives]
    storage = f"sqlite:///{db}"
    offset = len(optuna.load_study(study_name=STUDY_NAME, storage=storage).trials) if resume \
        else 0
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, directions=directions,
                                sampler=_sampler(spec, offset), load_if_exists=resume)
    key = json.dumps({"space": spec.space, "granularity": spec.granularity,
                      "objectives": spec.objectives, "units": [u.name for u in space.units]},
                     sort_keys=True)
    if resume:
        if study.user_attrs.get("key") != key:
            raise SearchError(f"--resume: the stored study in {str(db)!r} searched another "
                              "space, granularity, objectives or model; use a new output_dir")
        _requeue_interrupted(study)
    else:
        study.set_user_attr("scores", scores)
        study.set_user_attr("key", key)  # last: a study without it was never fully created
    return study


def _requeue_interrupted(study) -> None:
    """Trials left RUNNING by a killed search fail, and their choices run again first."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"source": t.user_attrs.get("source",
                                                                            "sampler")})


def read_sensitivity(path: str) -> dict[str, int]:
    """``{unit: rank}`` of a ``qat sensitivity`` table, checked (one line for a bad file)."""
    where = f"search.sensitivity: {path!r}"
    p = Path(path)
    if not p.is_file():
        raise SearchError(f"{where} does not exist (write it with qat sensitivity)"
                          if not p.exists() else f"{where} is not a regular file")
    try:
        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise SearchError(f"{where} cannot be read as CSV ({e})") from None
    if not rows or not {"unit", "rank"} <= set(rows[0]):
        raise SearchError(f"{where} is not a sensitivity table (no unit and rank columns); "
                          "write it with qat sensitivity")
    ranks: dict[str, int] = {}
    for n, r in enumerate(rows, 2):  # line 1 is the header
        unit, rank = r.get("unit"), r.get("rank")
        try:
            ranks[str(unit)] = int(str(rank))
        except ValueError:
            raise SearchError(f"{where} line {n}: rank {rank!r} of unit {unit!r} is not an "
                              "integer") from None
        if not unit:
            raise SearchError(f"{where} line {n}: no unit name")
    return ranks


def seed_mixes(space: Space, sensitivity_csv: str, n: int) -> list[dict[str, Any]]:
    """Sensitivity-ordered mixes: the k least sensitive units at their lowest choices and the
    rest at the recipe's, for ``n`` budgets k = ceil(N/n), ceil(2N/n), ..., N."""
    ranks = read_sensitivity(sensitivity_csv)
    names = [u.name for u in space.units]
    missing = [u for u in names if u not in ranks]
    if missing:
        raise SearchError(f"search.sensitivity: {sensitivity_csv!r} does not cover unit "
                          f"{missing[0]} of this model and granularity; "
                          "rerun qat sensitivity with the same recipe")
    order = sorted(names, key=lambda u: -ranks[u])  # least sensitive (last rank) first
    low, keep = space.extreme(low=True), space.base_choice()
    mixes = []
    for i in range(1, n + 1):
        k = -(-i * len(order) // n)  # ceil: the last mix lowers every unit
        per_unit = {u: (low if j < k else keep) for j, u in enumerate(order)}
        mixes.append(space.params_for(per_unit))
    return mixes


def _wandb_run(recipe, spec: SearchSpec, out: Path):
    if "wandb" not in (recipe.training_args.report_to or []):
        return None
    import os

    import wandb

    return wandb.init(project=os.environ.get("WANDB_PROJECT", "qat"), dir=str(out),
                      name=recipe.training_args.run_name or f"search-{out.name}",
                      config={"search": spec.to_dict(), "recipe": recipe.resolved},
                      job_type="search", reinit=True)


def run(path: str, argv: list[str], resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the search of ``path``; returns what search_results.json holds."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState
    from tqdm.auto import tqdm

    from qat.runs.checkpoints import check_output_dir

    recipe, spec, data = read_recipe_and_spec(path, argv)
    out = Path(recipe.training_args.output_dir)
    check_output_dir(str(out))
    scores = scores_key(recipe, spec)
    resume = check_study_file(out, resume, scores)  # before the model loads
    scorer = Scorer(recipe, spec)
    space = scorer.space
    if spec.max_bits is not None:
        lowest = average_bits(scorer.quantized(space.quant_dict(
            fields_override=space.extreme(low=True))), space.max_length)["bits"]
        if lowest > spec.max_bits + 1e-9:
            raise SearchError(f"search.constraint.max_bits {spec.max_bits:g} cannot be met: "
                              f"every unit at its lowest choice gives {lowest:.4f} average bits")
    seeds = seed_mixes(space, spec.sensitivity, spec.seed_trials) if spec.sensitivity else []
    study = open_study(out, spec, space, resume, scores)
    dists = {k: CategoricalDistribution(v) for k, v in space.params().items()}
    if not resume:
        for p in seeds:
            study.enqueue_trial(p, user_attrs={"source": "sensitivity"})
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    # PTQ is deterministic: a repeated choice (TPE does repeat on small spaces) is not re-run
    seen = {_key(t.params): {k: t.user_attrs[k] for k in _RESULT_KEYS}
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    wb = _wandb_run(recipe, spec, out)
    for _ in tqdm(range(max(spec.trials - done, 0)), desc="search", unit="trial"):
        trial = study.ask(dists)
        key = _key(trial.params)
        if key not in seen:
            seen[key] = scorer.score(space.quant_dict(trial.params))
        res = seen[key]
        for k, v in res.items():
            trial.set_user_attr(k, v)
        trial.set_user_attr("source", trial.user_attrs.get("source", "sampler"))
        study.tell(trial, [res[o] for o in spec.objectives])
        if wb is not None:
            wb.log({"trial": trial.number, **res})
    rows = _trial_rows(study, spec)
    uniform = _uniform(study, scorer, spec)
    best = choose(rows, spec.max_bits)
    if best is None:  # keep what was found; there is no best.yaml to write
        write_tables(out, rows, uniform, None, spec, scorer)
        raise SearchError(f"no finished trial meets search.constraint.max_bits "
                          f"{spec.max_bits:g}; trials.csv has them all; run more with "
                          "--resume --search.trials N")
    best_quant = space.quant_dict(best["params"])
    val = scorer.score(best_quant, "validation")
    results = write_outputs(out, rows, uniform, best, best_quant, val, spec, data, scorer)
    if wb is not None:
        wb.summary.update({"best_accuracy": best["accuracy"], "best_bits": best["bits"],
                           "best_validation": val["accuracy"]})
        wb.finish()
    return results


_RESULT_KEYS = ("accuracy", "bits", "weight_bits", "activation_bits", "matmul_bits")


def _key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def _trial_rows(study, spec: SearchSpec) -> list[dict[str, Any]]:
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        rows.append({"number": t.number, "source": a.get("source", "sampler"),
                     "accuracy": a["accuracy"], "bits": a["bits"],
                     "weight_bits": a["weight_bits"], "activation_bits": a["activation_bits"],
                     "matmul_bits": a["matmul_bits"],
                     "feasible": spec.max_bits is None or a["bits"] <= spec.max_bits + 1e-9,
                     "params": dict(t.params)})
    return rows


def _uniform(study, scorer: Scorer, spec: SearchSpec) -> list[dict[str, Any]]:
    """The uniform W3/W4/... references (every quantised role at one width), held-out and
    validation; kept in the study so ``--resume`` does not recompute them."""
    from qat.formats import FormatError
    from qat.quant.config import QuantConfigError

    cached = study.user_attrs.get("uniform")
    if cached is not None:
        return cached
    rows = []
    for w in spec.uniform_widths:
        q = scorer.space.base.to_dict()
        for role in ROLES:
            if q[role] is not None:
                q[role] = {**q[role], "width": w}
        q["overrides"] = {}
        try:
            held = scorer.score(q)
        except (FormatError, QuantConfigError, TypeError):
            continue  # a format without a width field has no uniform W-point
        val = scorer.score(q, "validation")
        rows.append({"name": f"W{w}", "width": w, "accuracy": held["accuracy"],
                     "bits": held["bits"], "validation_accuracy": val["accuracy"]})
    study.set_user_attr("uniform", rows)
    return rows


def write_tables(out: Path, rows, uniform, best, spec: SearchSpec, scorer: Scorer
                 ) -> list[dict[str, Any]]:
    """trials.csv, pareto.csv, uniform.csv and pareto.png; returns the front."""
    param_names = list(scorer.space.params())
    cols = ["number", "source", "accuracy", "bits", "weight_bits", "activation_bits",
            "matmul_bits", "feasible"]
    front = pareto_front(rows)
    for name, subset in (("trials.csv", rows), ("pareto.csv", front)):
        with open(out / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols + param_names)
            for r in subset:
                w.writerow([r[c] for c in cols] + [r["params"].get(p, "") for p in param_names])
    with open(out / "uniform.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["name", "width", "accuracy", "bits", "validation_accuracy"])
        w.writeheader()
        w.writerows(uniform)
    plot_front(rows, front, uniform, best, spec.max_bits, out / "pareto.png")
    return front


def write_outputs(out: Path, rows, uniform, best, best_quant, val, spec: SearchSpec,
                  data: dict[str, Any], scorer: Scorer) -> dict[str, Any]:
    """The tables and plot, then best.yaml and search_results.json."""
    import yaml

    front = write_tables(out, rows, uniform, best, spec, scorer)
    best_recipe = {**data, "quant": best_quant, "output_dir": str(out / "train_best")}
    (out / "best.yaml").write_text(
        f"# qat search: trial {best['number']}, held-out {scorer.metric} "
        f"{best['accuracy']:.4f}, {best['bits']:.4f} average bits; validation "
        f"{scorer.metric} {val['accuracy']:.4f}\n" + yaml.safe_dump(best_recipe, sort_keys=False))
    results = {"metric": scorer.metric, "trials": len(rows), "best": dict(best),
               "best_validation": val, "pareto": front, "uniform": uniform,
               "spec": spec.to_dict()}
    (out / "search_results.json").write_text(json.dumps(results, indent=2))
    return results


def plot_front(rows, front, uniform, best, max_bits: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter([r["bits"] for r in rows], [r["accuracy"] for r in rows], s=12, c="0.7",
               label="trials")
    ax.step([r["bits"] for r in front], [r["accuracy"] for r in front], where="post", c="C3",
            marker="o", ms=4, label="Pareto front")
    if uniform:
        ax.plot([u["bits"] for u in uniform], [u["accuracy"] for u in uniform], "s--", c="C0",
                label="uniform")
        for u in uniform:
            ax.annotate(u["name"], (u["bits"], u["accuracy"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=8, color="C0")
    if best is not None:
        ax.scatter([best["bits"]], [best["accuracy"]], marker="*", s=160, c="C2", zorder=5,
                   label="chosen")
    if max_bits is not None:
        ax.axvline(max_bits, ls=":", c="0.4", label=f"max_bits {max_bits:g}")
    ax.set_xlabel("average bits per element")
    ax.set_ylabel("held-out accuracy (train split)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
