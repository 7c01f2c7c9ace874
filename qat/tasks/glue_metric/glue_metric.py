"""The GLUE metrics as an ``evaluate`` module, loadable offline from inside the package.

    import evaluate
    from qat.tasks.glue import METRIC_DIR
    metric = evaluate.load(str(METRIC_DIR), "mrpc")
    metric.compute(predictions=[1, 0, 1], references=[1, 1, 1])
    # {'accuracy': 0.666..., 'f1': 0.8}

The configuration name is the GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli).
Predictions are class ids (STS-B: scores), not logits. The scores come from
``qat.tasks.glue.glue_scores``, the same scikit-learn / scipy code ``qat eval`` uses, so this module
holds no metric maths of its own. (``evaluate`` copies this file into its module cache and
imports it from there, hence the absolute import of ``qat``.)
"""

from __future__ import annotations

import datasets
import evaluate

from qat.tasks.glue import GLUE_TASKS, glue_scores

_DESCRIPTION = "GLUE metrics (accuracy, F1, Matthews correlation, Pearson/Spearman) per task."
_KWARGS = """
Args:
    predictions: class ids (for stsb: predicted similarity scores).
    references: gold labels.
Returns: a dict of the task's GLUE metrics, e.g. {'accuracy': 0.9} for sst2.
"""
_CITATION = """@inproceedings{wang2019glue, title={{GLUE}: A Multi-Task Benchmark and Analysis
Platform for Natural Language Understanding}, author={Wang, Alex and Singh, Amanpreet and
Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
booktitle={ICLR}, year={2019}}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class GlueMetric(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in GLUE_TASKS:
            raise KeyError(
                f"unknown GLUE task {self.config_name!r} for the glue metric; valid "
                f"tasks: {', '.join(GLUE_TASKS)}"
            )
        dtype = "float32" if GLUE_TASKS[self.config_name].is_regression else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}
            ),
            format="numpy",
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        return glue_scores(self.config_name, predictions, references)
