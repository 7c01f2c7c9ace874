"""``qat search``: mixed-precision search, per module (or per block) and per operand.

    qat search recipes/minilm_sst2_search.yaml --model_name_or_path outputs/minilm_sst2_float
    qat search recipes/minilm_sst2_search.yaml --search.trials 16 --resume

The recipe's ``search:`` section names the space (per role, per format field, the choices),
the granularity, the objectives and an optional ``max_bits`` constraint. Every trial is
post-training quantisation of the recipe's model: the float model is loaded once, and each
trial quantises a deep copy with the recipe's ``quant`` section plus one exact-name override
per module for the trial's choices, then scores it on a held-out slice of the TRAIN split (the
validation split is only used once, for the chosen point and the uniform references).

One job per module:

    spec.py        the ``search:`` section checked on its own (and the sensitivity table)
    recipe.py      recipe file + overrides -> (recipe, spec), choices checked before loading
    space.py       units x roles x fields of a model; a trial's choices -> a quant config
    score.py       PTQ scoring: held-out accuracy and the average-bits objective
    seeds.py       sensitivity-ordered seed trials
    study.py       the optuna study in ``output_dir/search.db``: open, resume, read back
    study_file.py  that file read before optuna touches it (foreign, blank, or ours)
    pareto.py      the Pareto front and the chosen point
    report.py      the CSV tables, the plot, best.yaml and search_results.json
    runner.py      ``run``: the whole search, start to finish
"""

from __future__ import annotations

from qat.analysis.search.pareto import choose, pareto_front
from qat.analysis.search.recipe import read_recipe_and_spec
from qat.analysis.search.runner import run
from qat.analysis.search.score import Scorer, average_bits
from qat.analysis.search.spec import SearchError

__all__ = [
    "Scorer",
    "SearchError",
    "average_bits",
    "choose",
    "pareto_front",
    "read_recipe_and_spec",
    "run",
]
