"""``QATConfig``: every recipe key in one dataclass, ``transformers.TrainingArguments`` plus
qat's own keys (``QATArguments``), the way TRL's ``SFTConfig`` extends it. Its sections are
built by their own modules (``quant`` / ``qdec`` in ``qat.quant``, ``lora`` / ``distill`` in
``sections``) and its values checked by ``checks``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import TrainingArguments

from qat.quant.config import QuantConfig, QuantConfigError
from qat.quant.qdec.config import QDECConfig
from qat.runs.recipe.arguments import QATArguments
from qat.runs.recipe.checks import check_qat_values, check_training_values
from qat.runs.recipe.sections import build_distill, build_lora
from qat.runs.recipe.text import RecipeError


@dataclasses.dataclass
class QATConfig(QATArguments, TrainingArguments):
    """Every recipe key: ``TrainingArguments`` fields and qat's (``QATArguments``).

    >>> import tempfile, qat
    >>> args = qat.QATConfig(tempfile.mkdtemp(), report_to="none",
    ...                      quant={"weight": {"format": "bfp", "width": 4, "block_size": 16}})
    >>> type(args.quant).__name__, args.quant.weight["width"], args.finetune
    ('QuantConfig', 4, 'full')

    Handed to ``QATTrainer(model, args=...)`` it gives the trainer its settings (``quant``,
    ``finetune``, ``lora``, ``distill``, ``on_nonfinite``, ``qdec``); built in Python it needs
    no ``model_name_or_path`` or ``task_name``, which only a recipe must name (checked by
    ``QATParser``). Built by ``QATParser`` from a recipe mapping; ``__post_init__`` turns
    ``quant`` into a ``QuantConfig``, ``lora`` into ``LoraArguments`` and ``distill`` into
    ``DistillArguments`` (or None), and refuses values that would fail (or silently do
    nothing) later, each with one line naming the key. Type checks belong to the parser:
    after construction ``TrainingArguments`` holds its own richer objects (enums,
    ``AcceleratorConfig``), which no longer match its annotations.
    """

    # The recipe's mapping, built once into the config that every module reads.
    quant: QuantConfig | None = dataclasses.field(
        default=None, metadata=QATArguments.__dataclass_fields__["quant"].metadata
    )
    qdec: Any = dataclasses.field(  # QDECConfig | None
        default=None, metadata=QATArguments.__dataclass_fields__["qdec"].metadata
    )

    def __post_init__(self) -> None:
        try:
            self.quant = QuantConfig.from_dict(self.quant)
        except QuantConfigError as e:
            raise RecipeError(str(e)) from None
        try:
            self.qdec = QDECConfig.from_dict(self.qdec)
        except QuantConfigError as e:
            raise RecipeError(str(e)) from None
        self.lora = build_lora(self.lora)
        self.distill = build_distill(self.distill)
        check_qat_values(self)
        check_training_values(self)
        try:
            super().__post_init__()
        except (ValueError, TypeError) as e:
            raise RecipeError(f"invalid training arguments: {' '.join(str(e).split())}") from None

    def to_dict(self) -> dict[str, Any]:
        """Trainer's dict (logged to W&B / TensorBoard) with ``quant`` and ``lora`` as plain
        data."""
        d = super().to_dict()
        d["quant"] = None if self.quant is None else self.quant.to_dict()
        d["lora"] = dataclasses.asdict(self.lora)
        d["qdec"] = None if self.qdec is None else self.qdec.to_dict()
        d["distill"] = None if self.distill is None else dataclasses.asdict(self.distill)
        return d
