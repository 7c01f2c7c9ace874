"""QATTrainer: a ``transformers.Trainer`` that quantises the model before training.

It composes: ``quantize_model`` inserts the STE fake-quantisers, ``prepare_finetuning`` picks
what trains, and the quant config travels with every checkpoint (``qat_config.json``) and into
the run's W&B config so evaluation and resume rebuild the same quantised model.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from qat.quant.config import QuantConfig
from qat.quant.quantize import is_quantized, quantization_summary, quantize_model
from qat.runs.checkpoints import write_qat_config
from qat.training.finetune import prepare_finetuning, trainable_parameters
from qat.training.nonfinite import NonFiniteError, check_policy, find_first_nonfinite, is_finite
from qat.training.quant_metrics import QuantMetricsCallback

logger = logging.getLogger(__name__)
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


class _EndSkippedStep(TrainerCallback):
    """Ends a skipped optimizer step (``on_nonfinite: skip``) once the Trainer has moved on."""

    def __init__(self, trainer: QATTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._skipping_step = False


class QATTrainer(Trainer):
    """Trainer for block-quantisation-aware fine-tuning.

    Args beyond ``Trainer``'s: ``quant_config`` (QuantConfig, its dict, or None for float),
    ``finetune`` (``full`` | ``lora`` | ``classifier``), ``lora`` (LoraArguments) and
    ``on_nonfinite`` (``stop`` | ``skip``: what a NaN/inf training loss does). The model
    is quantised (unless it already is) and prepared for the mode before the optimizer exists.
    """

    def __init__(self, model=None, args=None, *, quant_config: QuantConfig | dict | None = None,
                 finetune: str = "full", lora: Any = None, on_nonfinite: str = "stop",
                 **kwargs: Any) -> None:
        self.on_nonfinite = check_policy(on_nonfinite)
        self._skipping_step = False
        self.quant_config = QuantConfig.from_dict(quant_config)
        self.finetune = finetune
        self.lora = lora
        if self.quant_config is not None and not is_quantized(model):
            quantize_model(model, self.quant_config)
        model = prepare_finetuning(model, finetune, lora)
        if args is not None and args.dataloader_pin_memory and args.device.type == "cpu":
            # Nothing to pin for without an accelerator; torch would warn on every loader.
            args.dataloader_pin_memory = False
        super().__init__(model=model, args=args, **kwargs)
        base = self.accelerator.unwrap_model(self.model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        if type(base).__name__.endswith("ForSequenceClassification"):
            # Their loss is a mean over the local batch that ignores num_items_in_batch; left
            # True, Trainer would multiply it by the world size under DDP (2x the gradients).
            self.model_accepts_loss_kwargs = False
        trainable, total = trainable_parameters(self.model)
        logger.info("qat: %s; finetune=%s; trainable %d / %d parameters; %s",
                    quantization_summary(self.model), finetune, trainable, total,
                    self._backend_summary())
        self.add_callback(_WandbQATConfig(self.qat_state()))
        self.add_callback(_EndSkippedStep(self))
        self.add_callback(QuantMetricsCallback(self.callback_handler.callbacks))

    def _backend_summary(self) -> str:
        """Which quantiser implementation runs here, e.g. ``backend auto -> compile on cpu``."""
        if self.quant_config is None:
            return "float"
        from qat.quant.backends import resolve_backend
        from qat.quant.ste import FakeQuantizer

        fq = next((m for m in self.model.modules() if isinstance(m, FakeQuantizer)), None)
        if fq is None:
            return "no quantisers"
        impl = resolve_backend(fq.backend, fq.fmt, self.args.device)
        return f"quantiser backend {fq.backend} -> {impl} on {self.args.device.type}"

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Trainer's step, then the non-finite guard: ``stop`` raises NonFiniteError before the
        optimizer step; ``skip`` drops this step's gradients (parameters without a gradient are
        left alone by the optimizer) and logs a warning. Either way the offending layer is found
        by re-running the batch with hooks, which costs nothing on healthy steps."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = not is_finite(loss)
        if self.args.world_size > 1:  # all ranks must take the same decision, or DDP hangs
            flag = torch.tensor(float(bad), device=loss.device)
            bad = bool(self.accelerator.reduce(flag, reduction="sum") > 0)
        if bad and not self._skipping_step:
            step = self.state.global_step + 1
            unwrapped = self.accelerator.unwrap_model(model)
            fault = find_first_nonfinite(model, self._prepare_inputs(inputs), names_from=unwrapped)
            rank = f" on rank {self.args.process_index}" if self.args.world_size > 1 else ""
            if self.on_nonfinite == "stop":
                raise NonFiniteError(step, float(loss), fault, where=rank)
            logger.warning("qat: non-finite training loss (%s)%s at step %d, first offending "
                           "layer: %s; skipping this optimizer step (on_nonfinite: skip)",
                           float(loss), rank, step, fault.describe() if fault else "none found")
            self._skipping_step = True
        if self._skipping_step:
            model.zero_grad(set_to_none=True)
        return loss

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
            write_qat_config(output_dir or self.args.output_dir, self.qat_state())
