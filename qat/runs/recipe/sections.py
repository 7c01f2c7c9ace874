"""The recipe's nested sections besides ``quant`` / ``qdec`` (built by ``qat.quant``):
``lora:`` -> ``LoraArguments`` and ``distill:`` -> ``DistillArguments``, keys and values
checked, each error naming ``lora.<key>`` / ``distill.<key>``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from qat.errors import check_one_of, check_section
from qat.runs.recipe.arguments import DISTILL_LOSSES, DistillArguments, LoraArguments
from qat.runs.recipe.text import RecipeError
from qat.runs.recipe.types import check_type, coerce, field_types

logger = logging.getLogger(__name__)


def build_lora(d: Any) -> LoraArguments:
    """``lora:`` as a mapping (or null, or already built) -> checked ``LoraArguments``."""
    if d is None:
        d = {}
    if isinstance(d, LoraArguments):
        d = dataclasses.asdict(d)
    if not isinstance(d, dict):
        raise RecipeError(f"lora must be a mapping, got {d!r}")
    check_section(d, LoraArguments, "lora", RecipeError)
    hints = field_types(LoraArguments)
    for key, value in d.items():
        check_type(f"lora.{key}", value, hints[key])
    lora = LoraArguments(**d)
    if lora.r < 1:
        raise RecipeError(f"lora.r must be >= 1, got {lora.r}")
    if lora.alpha < 1:
        raise RecipeError(f"lora.alpha must be >= 1, got {lora.alpha}")
    if lora.target_modules is not None:
        names = lora.target_modules
        if not names or not all(isinstance(n, str) and n for n in names):
            raise RecipeError(
                "lora.target_modules must be a non-empty list of module names "
                f"(strings) or null for every quantised linear; got {names!r}"
            )
    if lora.dropout != 0:
        raise RecipeError(
            "lora.dropout must be 0 with quantised LoRA (the quantiser sees W + BA, "
            f"which input dropout has no form for); got {lora.dropout}"
        )
    return lora


def build_distill(d: Any) -> DistillArguments | None:
    """``distill:`` as a mapping (or null: off, or already built) -> checked
    ``DistillArguments``; None (off) for null and for ``weight: 0``, whose term adds nothing:
    no teacher is then built or run. Only the values are checked here; the teacher's folder
    and config are checked against the model by the train loop
    (``qat.training.teacher.check_distill``)."""
    if d is None:
        return None
    if isinstance(d, DistillArguments):
        d = dataclasses.asdict(d)
    if not isinstance(d, dict):
        raise RecipeError(
            f"distill must be a mapping (teacher, loss, temperature, weight) or null, got {d!r}"
        )
    check_section(d, DistillArguments, "distill", RecipeError)
    hints = field_types(DistillArguments)
    for key, value in d.items():
        d = {**d, key: coerce(value, hints[key])}
        check_type(f"distill.{key}", d[key], hints[key])
    distill = DistillArguments(**d)
    if not distill.teacher.strip():
        raise RecipeError("distill.teacher must be self or a model folder / Hub id, got ''")
    check_one_of("distill.loss", distill.loss, DISTILL_LOSSES, RecipeError, hint=True)
    distill.temperature = float(distill.temperature)
    if not 0 < distill.temperature < math.inf:
        raise RecipeError(
            f"distill.temperature must be finite and > 0, got {distill.temperature!r}"
        )
    distill.weight = float(distill.weight)
    if not 0 <= distill.weight < math.inf:
        raise RecipeError(f"distill.weight must be finite and >= 0, got {distill.weight!r}")
    if distill.weight == 0:
        logger.info("qat: distill.weight 0: no distillation (no teacher is built or run)")
        return None
    return distill
