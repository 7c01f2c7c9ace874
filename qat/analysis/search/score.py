"""Scoring a quant config by post-training quantisation: the float model and data loaded once,
each config applied to a deep copy, then held-out (or validation) accuracy and average bits.

Bits objective: the element-weighted average bits per element over every quantised tensor
that one sequence of ``max_length`` tokens touches. Weights count once (their element counts
and bits as ``qat.quant.density`` reports them); a quantised linear's input counts
``in_features * max_length`` elements; an attention module's matmul operands count Q, K and V
(``hidden_size * max_length`` each) and P (``num_heads * max_length**2``). Weights dominate
for any real model; the activation and matmul terms break ties between otherwise equal mixes.
"""

from __future__ import annotations

import copy
from typing import Any

from qat.analysis.search.space import Space
from qat.analysis.search.spec import SearchSpec
from qat.quant.density import density_report
from qat.quant.modules import MatmulQuantizer, QuantConv1D, QuantLinear
from qat.quant.quantize import quantize_model
from qat.runs.build import build_model
from qat.tasks.glue import evaluate_split as evaluate
from qat.tasks.glue import get_task, glue_splits


class Scorer:
    """Loads the float model and the data once; scores quant configs by PTQ."""

    def __init__(self, recipe, spec: SearchSpec) -> None:
        import torch

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

        args = self.recipe.args
        if which == "held_out":
            raw = glue_splits(
                self.task,
                args.data_dir,
                ("train",),
                train_samples=self.spec.held_out_samples,
                seed=self.spec.seed,
            )
        else:
            raw = glue_splits(
                self.task,
                args.data_dir,
                self.task.validation_splits[:1],
                eval_samples=args.max_eval_samples,
            )
        return next(iter(raw.tokenize(self.tokenizer, args.max_length).values()))

    def quantized(self, quant: dict[str, Any]):

        model = copy.deepcopy(self.model)
        return quantize_model(model, quant).to(self.device).eval()

    def score(self, quant: dict[str, Any], which: str = "held_out") -> dict[str, float]:
        """``{metric, bits, weight_bits, activation_bits, matmul_bits}`` of one config."""

        if which not in self._data:
            self._data[which] = self.split(which)
        data = self._data[which]
        model = self.quantized(quant)
        metrics = evaluate(
            model, self.tokenizer, self.task, data, self.recipe.args.per_device_eval_batch_size
        )
        return {"accuracy": metrics[self.metric], **average_bits(model, self.space.max_length)}


def average_bits(model, seq_len: int) -> dict[str, float]:
    """Element-weighted bits per element over the quantised tensors (see the module doc)."""

    rep = density_report(model)
    parts = {
        "weight": [rep.quantized_bits, rep.quantized_params],
        "activation": [0.0, 0],
        "matmul": [0.0, 0],
    }
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
