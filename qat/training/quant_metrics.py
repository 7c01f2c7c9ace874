"""Training dashboards: per-layer quantisation error in W&B and TensorBoard.

Every training log (``logging_steps``) gets, for each quantised linear, the SQNR (dB,
``qat.quant.sqnr``) of its weight under its weight format and of a sampled input under its
activation format, as ``qat/sqnr/weight/<layer>`` and ``qat/sqnr/activation/<layer>``, plus
the pooled ``qat/sqnr/weight_all`` and ``qat/sqnr/activation_all``. W&B also gets a table of the
last measurement (``qat/sqnr_table``, at the end of training) and, in the run summary, the
bits per element and density of the quantised weights and of the whole model
(``qat.quant.density``). The same scalars go to TensorBoard when ``report_to`` names it.

Cost, all of it off the training step's hot path:

- Inputs: before a step that will be logged (``on_step_begin`` predicts it from
  ``logging_steps``; with another logging strategy, before every step) each quantised linear
  gets a one-shot forward pre-hook that copies ``sample_rows`` (64) token rows, evenly strided
  over the batch, and removes itself: one small device copy per layer per logged step, no host
  sync. Whole rows keep every block (blocks run along the last dim) exactly as the training
  forward quantised it, so each sampled row's error is the one training saw (a format with
  one scale per tensor, ``int`` with ``granularity: tensor``, gets the sample's own scale).
- Weights: in ``on_log``, under ``no_grad``, every quantised weight is quantised once more
  (LoRA: the effective ``W + BA``), the work of one forward's weight quantisers; all SQNRs
  come to the host in one transfer, at a point where the Trainer has already synced to log the
  loss.
- Nothing at all when ``report_to`` names neither ``wandb`` nor ``tensorboard``, and only on
  the main process.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from qat.quant.density import density_report
from qat.quant.modules import QuantConv1D, QuantLinear
from qat.quant.sqnr import error_sums, sqnr_from_sums

logger = logging.getLogger(__name__)

REPORTERS = ("wandb", "tensorboard")
TABLE_COLUMNS = ["layer", "tensor", "format", "bits_per_element", "sqnr_db"]


@dataclasses.dataclass
class QuantLayer:
    """A quantised linear as the dashboards see it: its display name, the module whose input
    is sampled (the LoRA wrapper when there is one) and the module holding the quantisers."""

    name: str
    outer: nn.Module
    inner: QuantLinear | QuantConv1D

    def weight(self) -> Tensor:
        """The weight the weight quantiser sees (LoRA: ``W + BA``)."""
        effective = getattr(self.outer, "effective_weight", None)
        return effective() if effective is not None else self.inner.weight


def quantised_layers(model: nn.Module) -> list[QuantLayer]:
    """Every quantised linear of ``model`` (a peft model is looked through), in model order."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    modules = dict(model.named_modules())
    layers = []
    for name, mod in modules.items():
        if not isinstance(mod, (QuantLinear, QuantConv1D)):
            continue
        if mod.weight_quantizer is None and mod.activation_quantizer is None:
            continue
        outer = mod
        if name.endswith(".base_layer") and hasattr(modules.get(name[:-11]), "effective_weight"):
            name = name[:-11]
            outer = modules[name]
        layers.append(QuantLayer(name, outer, mod))
    return layers


def measure(layers: list[QuantLayer], inputs: dict[str, Tensor]) -> list[dict[str, Any]]:
    """One row per quantised tensor: weights, and the sampled inputs found in ``inputs``
    (layer name -> rows). ``sqnr_db`` is a Python float; everything is computed under
    ``no_grad`` and moved to the host in one transfer."""
    rows: list[dict[str, Any]] = []
    sums: list[tuple[Tensor, Tensor]] = []
    with torch.no_grad():
        for layer in layers:
            for tensor, q, x in (
                ("weight", layer.inner.weight_quantizer, None),
                ("activation", layer.inner.activation_quantizer, inputs.get(layer.name)),
            ):
                if q is None:
                    continue
                if tensor == "weight":
                    x = layer.weight()
                elif x is None:
                    continue
                sums.append(error_sums(*q.error_pair(x)))
                rows.append(
                    {
                        "layer": layer.name,
                        "tensor": tensor,
                        "format": str(q.fmt),
                        "bits_per_element": float(q.fmt.bits_per_element),
                    }
                )
        if not rows:
            return rows
        device = sums[0][0].device
        both = torch.stack([torch.stack(pair).to(device) for pair in sums]).cpu()  # one copy
        signal, noise = both[:, 0], both[:, 1]
        for row, value in zip(rows, sqnr_from_sums(signal, noise).tolist()):
            row["sqnr_db"] = value
        for tensor in ("weight", "activation"):
            idx = [i for i, r in enumerate(rows) if r["tensor"] == tensor]
            if idx:  # pooled over every layer: one line to watch on the dashboard
                pooled = sqnr_from_sums(signal[idx].sum(), noise[idx].sum())
                rows.append(
                    {
                        "layer": "all",
                        "tensor": tensor,
                        "format": "",
                        "bits_per_element": float("nan"),
                        "sqnr_db": float(pooled),
                    }
                )
    return rows


def scalars(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Dashboard keys: ``qat/sqnr/<tensor>/<layer>``, pooled rows as ``qat/sqnr/<tensor>_all``."""
    return {
        (
            f"qat/sqnr/{r['tensor']}_all"
            if r["layer"] == "all"
            else f"qat/sqnr/{r['tensor']}/{r['layer']}"
        ): r["sqnr_db"]
        for r in rows
    }


class QuantMetricsCallback(TrainerCallback):
    """Logs per-layer SQNR every training log and density in the run summary (module doc).

    ``callbacks`` is the Trainer's callback list, where the TensorBoard writer is found.
    """

    def __init__(self, callbacks: list[TrainerCallback], sample_rows: int = 64) -> None:
        self.callbacks = callbacks
        self.sample_rows = sample_rows
        self.layers: list[QuantLayer] = []
        self.inputs: dict[str, Tensor] = {}
        self.rows: list[dict[str, Any]] = []
        self._hooks: list[Any] = []
        self._active = False

    # -- where the figures go --------------------------------------------------------------
    def _wandb(self, args) -> Any:
        if "wandb" not in (args.report_to or []):
            return None
        import wandb

        return wandb if wandb.run is not None else None

    def _tensorboard(self) -> Any:
        for cb in self.callbacks:
            if type(cb).__name__ == "TensorBoardCallback" and cb.tb_writer is not None:
                return cb.tb_writer
        return None

    # -- sampling inputs --------------------------------------------------------------------
    def _arm(self) -> None:
        self._disarm()
        self.inputs = {}
        for layer in self.layers:
            if layer.inner.activation_quantizer is not None:
                self._hooks.append(layer.outer.register_forward_pre_hook(self._sampler(layer)))

    def _sampler(self, layer: QuantLayer):
        rows, inputs = self.sample_rows, self.inputs

        def hook(module: nn.Module, args: tuple) -> None:
            if layer.name in inputs or not args or not isinstance(args[0], Tensor):
                return
            x = args[0].detach()
            flat = x.reshape(-1, x.shape[-1])
            stride = max(1, flat.shape[0] // rows)  # shapes only: no host sync
            inputs[layer.name] = flat[::stride][:rows].clone()

        return hook

    def _disarm(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @staticmethod
    def _will_log(args, state) -> bool:
        step = state.global_step + 1
        if step == 1 and args.logging_first_step:
            return True
        if args.logging_strategy != "steps":
            return True  # epoch-wise logs cannot be predicted per step; sample every step
        every = state.logging_steps or args.logging_steps
        return every > 0 and step % int(every) == 0

    # -- Trainer events ---------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._active = (
            state.is_world_process_zero
            and model is not None
            and any(r in (args.report_to or []) for r in REPORTERS)
        )
        if not self._active:
            return
        self.layers = quantised_layers(model)
        self._active = bool(self.layers)
        if not self._active:
            return

        d = density_report(model).to_dict()
        summary = {
            "qat/bits_per_element": d["quantized_linears"]["bits_per_element"],
            "qat/density_vs_fp32": d["quantized_linears"]["density_vs_fp32"],
            "qat/density_vs_int8": d["quantized_linears"]["density_vs_int8"],
            "qat/model_bits_per_element": d["model"]["bits_per_element"],
            "qat/model_density_vs_fp32": d["model"]["density_vs_fp32"],
        }
        wb = self._wandb(args)
        if wb is not None:
            wb.run.summary.update(summary)
        writer = self._tensorboard()
        if writer is not None:
            for key, value in summary.items():
                writer.add_scalar(key, value, 0)

    def on_step_begin(self, args, state, control, **kwargs):
        if self._active and not self._hooks and self._will_log(args, state):
            self._arm()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._active or "loss" not in (logs or {}):
            return
        self._disarm()
        self.rows = measure(self.layers, self.inputs)
        self.inputs = {}
        values = scalars(self.rows)
        wb = self._wandb(args)
        if wb is not None:
            wb.log({**values, "train/global_step": state.global_step})
        writer = self._tensorboard()
        if writer is not None:
            for key, value in values.items():
                writer.add_scalar(key, value, state.global_step)
            writer.flush()

    def on_train_end(self, args, state, control, **kwargs):
        self._disarm()
        wb = self._wandb(args) if self._active else None
        if wb is None or not self.rows:
            return
        table = wb.Table(
            columns=TABLE_COLUMNS, data=[[r[c] for c in TABLE_COLUMNS] for r in self.rows]
        )
        wb.log({"qat/sqnr_table": table, "train/global_step": state.global_step})
