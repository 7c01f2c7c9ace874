"""The optuna study behind a search, stored in ``output_dir/search.db`` (SQLite): its sampler,
creating or resuming it, and reading its finished trials back as rows.

``--resume`` picks up after the last finished trial; a trial killed half-way is re-run with
the same choices. A resumed study must have been scored the same way (``scores_key``) and have
searched the same space, granularity, objectives and model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from qat.analysis.search.space import Space
from qat.analysis.search.spec import SearchError, SearchSpec
from qat.analysis.search.study_file import check_db_file

STUDY_NAME = "qat-search"
DB_FILE = "search.db"


def _sampler(spec: SearchSpec, offset: int = 0):
    """The sampler, seeded with ``seed + offset``: a resumed study passes its trial count, so
    the new process does not replay the first process's proposals."""
    import optuna

    def constraints(trial) -> list[float]:
        return [trial.user_attrs.get("bits", 0.0) - (spec.max_bits or math.inf)]

    cf = constraints if spec.max_bits is not None else None
    if spec.sampler == "tpe":
        # TPE fitted to one or two points keeps re-proposing them: start with random trials
        return optuna.samplers.TPESampler(
            seed=spec.seed + offset, constraints_func=cf, n_startup_trials=min(10, spec.trials)
        )
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=spec.seed + offset, constraints_func=cf)
    return optuna.samplers.RandomSampler(seed=spec.seed + offset)


def scores_key(recipe, spec: SearchSpec) -> dict[str, Any]:
    """What a trial's scores depend on besides its own choices: a resumed study must match."""
    args = recipe.args
    key = {
        "model": args.model_name_or_path,
        "task": args.task_name,
        "data_dir": args.data_dir,
        "max_length": args.max_length,
        "held_out_samples": spec.held_out_samples,
        "seed": spec.seed,
        "quant": args.quant.to_dict(),
    }
    return json.loads(json.dumps(key, default=str))  # as the study stores it (tuples: lists)


def check_study_file(out: Path, resume: bool, scores: dict[str, Any]) -> bool:
    """A new search never overwrites an old one; ``--resume`` needs one of ours to resume, scored
    the same way (``study_file``). Returns whether to resume."""
    return check_db_file(out / DB_FILE, STUDY_NAME, resume, scores)


def open_study(out: Path, spec: SearchSpec, space: Space, resume: bool, scores: dict[str, Any]):
    """Create the SQLite-backed study, or reopen it with ``--resume``."""
    import optuna

    db = out / DB_FILE
    resume = check_study_file(out, resume, scores)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["maximize" if o == "accuracy" else "minimize" for o in spec.objectives]
    storage = f"sqlite:///{db}"
    offset = len(optuna.load_study(study_name=STUDY_NAME, storage=storage).trials) if resume else 0
    study = optuna.create_study(
        storage=storage,
        study_name=STUDY_NAME,
        directions=directions,
        sampler=_sampler(spec, offset),
        load_if_exists=resume,
    )
    key = json.dumps(
        {
            "space": spec.space,
            "granularity": spec.granularity,
            "objectives": spec.objectives,
            "units": [u.name for u in space.units],
        },
        sort_keys=True,
    )
    if resume:
        if study.user_attrs.get("key") != key:
            raise SearchError(
                f"--resume: the stored study in {str(db)!r} searched another "
                "space, granularity, objectives or model; use a new output_dir"
            )
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
        study.enqueue_trial(t.params, user_attrs={"source": t.user_attrs.get("source", "sampler")})


def trial_rows(study, spec: SearchSpec) -> list[dict[str, Any]]:
    """The finished trials: objectives, per-role bits, feasibility and choices, one row each."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        rows.append(
            {
                "number": t.number,
                "source": a.get("source", "sampler"),
                "accuracy": a["accuracy"],
                "bits": a["bits"],
                "weight_bits": a["weight_bits"],
                "activation_bits": a["activation_bits"],
                "matmul_bits": a["matmul_bits"],
                "feasible": spec.max_bits is None or a["bits"] <= spec.max_bits + 1e-9,
                "params": dict(t.params),
            }
        )
    return rows
