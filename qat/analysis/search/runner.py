"""Running (or resuming) a search: the recipe read and checked, then the trial loop (each new
choice scored once), the uniform references, the choice and the outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qat.analysis.search.pareto import choose
from qat.analysis.search.recipe import read_recipe_and_spec
from qat.analysis.search.report import write_outputs, write_tables
from qat.analysis.search.score import Scorer, average_bits
from qat.analysis.search.seeds import seed_mixes
from qat.analysis.search.spec import ROLES, SearchError, SearchSpec
from qat.analysis.search.study import check_study_file, open_study, scores_key, trial_rows
from qat.formats import FormatError
from qat.quant.config import QuantConfigError
from qat.runs.folders import check_output_dir


def _wandb_run(recipe, spec: SearchSpec, out: Path):
    if "wandb" not in (recipe.args.report_to or []):
        return None
    import os

    import wandb

    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "qat"),
        dir=str(out),
        name=recipe.args.run_name or f"search-{out.name}",
        config={"search": spec.to_dict(), "recipe": recipe.resolved},
        job_type="search",
        reinit=True,
    )


def run(path: str, argv: list[str], resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the search of ``path``; returns what search_results.json holds."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState
    from tqdm.auto import tqdm

    recipe, spec, data = read_recipe_and_spec(path, argv)
    out = Path(recipe.args.output_dir)
    check_output_dir(str(out))
    scores = scores_key(recipe, spec)
    resume = check_study_file(out, resume, scores)  # before the model loads
    scorer = Scorer(recipe, spec)
    space = scorer.space
    if spec.max_bits is not None:
        lowest = average_bits(
            scorer.quantized(space.quant_dict(fields_override=space.extreme(low=True))),
            space.max_length,
        )["bits"]
        if lowest > spec.max_bits + 1e-9:
            raise SearchError(
                f"search.constraint.max_bits {spec.max_bits:g} cannot be met: "
                f"every unit at its lowest choice gives {lowest:.4f} average bits"
            )
    seeds = seed_mixes(space, spec.sensitivity, spec.seed_trials) if spec.sensitivity else []
    study = open_study(out, spec, space, resume, scores)
    dists = {k: CategoricalDistribution(v) for k, v in space.params().items()}
    if not resume:
        for p in seeds:
            study.enqueue_trial(p, user_attrs={"source": "sensitivity"})
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    # PTQ is deterministic: a repeated choice (TPE does repeat on small spaces) is not re-run
    seen = {
        _key(t.params): {k: t.user_attrs[k] for k in _RESULT_KEYS}
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    }
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
    rows = trial_rows(study, spec)
    uniform = _uniform(study, scorer, spec)
    best = choose(rows, spec.max_bits)
    if best is None:  # keep what was found; there is no best.yaml to write
        write_tables(out, rows, uniform, None, spec, scorer)
        raise SearchError(
            f"no finished trial meets search.constraint.max_bits "
            f"{spec.max_bits:g}; trials.csv has them all; run more with "
            "--resume --search.trials N"
        )
    best_quant = space.quant_dict(best["params"])
    val = scorer.score(best_quant, "validation")
    results = write_outputs(out, rows, uniform, best, best_quant, val, spec, data, scorer)
    if wb is not None:
        wb.summary.update(
            {
                "best_accuracy": best["accuracy"],
                "best_bits": best["bits"],
                "best_validation": val["accuracy"],
            }
        )
        wb.finish()
    return results


_RESULT_KEYS = ("accuracy", "bits", "weight_bits", "activation_bits", "matmul_bits")


def _key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def _uniform(study, scorer: Scorer, spec: SearchSpec) -> list[dict[str, Any]]:
    """The uniform W3/W4/... references (every quantised role at one width), held-out and
    validation; kept in the study so ``--resume`` does not recompute them."""

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
        rows.append(
            {
                "name": f"W{w}",
                "width": w,
                "accuracy": held["accuracy"],
                "bits": held["bits"],
                "validation_accuracy": val["accuracy"],
            }
        )
    study.set_user_attr("uniform", rows)
    return rows
