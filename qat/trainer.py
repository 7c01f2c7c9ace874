"""QATTrainer: a ``transformers.Trainer`` that quantises the model before training.

It composes: ``quantize_model`` inserts the STE fake-quantisers, ``prepare_finetuning`` picks
what trains, and the quant config travels with every checkpoint (``qat_config.json``) and into
the run's W&B config so evaluation and resume rebuild the same quantised model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from qat.finetune import prepare_finetuning, trainable_parameters
from qat.quant_config import QuantConfig
from qat.quantize import is_quantized, quantization_summary, quantize_model

logger = logging.getLogger(__name__)
QAT_CONFIG_FILE = "qat_config.json"


def read_qat_config(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``qat_config.json`` a QATTrainer saved with a checkpoint."""
    path = Path(checkpoint_dir) / QAT_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(checkpoint_dir)!r} holds no {QAT_CONFIG_FILE}: not a qat "
                                "checkpoint (was it written by qat train?)")
    return json.loads(path.read_text())


class _WandbQATConfig(TrainerCallback):
    """Adds the quant config to the W&B run's config once the run exists."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def on_train_begin(self, args, state, control, **kwargs):
        if "wandb" not in (args.report_to or []) or not state.is_world_process_zero:
            return
        import wandb

        if wandb.run is not None:
            wandb.config.update({"qat": self.state}, allow_val_change=True)


class QATTrainer(Trainer):
    """Trainer for block-quantisation-aware fine-tuning.

    Args beyond ``Trainer``'s: ``quant_config`` (QuantConfig, its dict, or None for float),
    ``finetune`` (``full`` | ``lora`` | ``classifier``) and ``lora`` (LoraArguments). The model
    is quantised (unless it already is) and prepared for the mode before the optimizer exists.
    """

    def __init__(self, model=None, args=None, *, quant_config: QuantConfig | dict | None = None,
                 finetune: str = "full", lora: Any = None, **kwargs: Any) -> None:
        self.quant_config = QuantConfig.from_dict(quant_config)
        self.finetune = finetune
        self.lora = lora
        if self.quant_config is not None and not is_quantized(model):
            quantize_model(model, self.quant_config)
        model = prepare_finetuning(model, finetune, lora)
        super().__init__(model=model, args=args, **kwargs)
        trainable, total = trainable_parameters(self.model)
        logger.info("qat: %s; finetune=%s; trainable %d / %d parameters",
                    quantization_summary(self.model), finetune, trainable, total)
        self.add_callback(_WandbQATConfig(self.qat_state()))

    def qat_state(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this quantised model."""
        lora = self.lora
        if dataclasses.is_dataclass(lora):
            lora = dataclasses.asdict(lora)
        return {
            "quant": None if self.quant_config is None else self.quant_config.to_dict(),
            "finetune": self.finetune,
            "lora": lora if self.finetune == "lora" else None,
        }

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            out = Path(output_dir or self.args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / QAT_CONFIG_FILE).write_text(json.dumps(self.qat_state(), indent=2))
