"""The train loop for decoders (``task_name: causal_lm`` or ``chat``), called by
``qat.training.run`` after its output-folder and resume checks; it ends in ``qat.training.loop``.

Order: cheap config checks (a decoder, ``block_size`` within its context), the tokenizer (and
its chat template for chat data), every row of both splits read, checked and tokenised, and
only then the model: bad data fails in seconds with one line, not after loading a model.
Evaluation reports ``eval_loss`` and ``eval_perplexity`` = exp(eval_loss); for ``causal_lm`` the
chunks are those of ``qat perplexity`` on the same split, so the two numbers agree.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from qat.errors import ConfigError
from qat.models import fits_positions, load_config, load_tokenizer_for
from qat.quant.quantize import check_quantizable
from qat.runs.build import build_model
from qat.tasks.language_modeling import check_causal
from qat.tasks.registry import get_task
from qat.training.loop import train_and_evaluate
from qat.training.teacher import check_distill
from qat.training.trainer import QATTrainer

logger = logging.getLogger(__name__)


def train_decoder(
    recipe: Any, checkpoint: str | None, trainer_cls: Callable[..., Any] | None = None
) -> dict:
    """Train and evaluate a causal LM as ``recipe`` says; ``trainer_cls`` builds the trainer
    (the recipe's ``trainer:``, ``qat.training.trainers.trainer_class``; default
    ``QATTrainer``)."""
    from transformers import set_seed

    args = recipe.args
    set_seed(args.seed)
    name = args.model_name_or_path
    config = load_config(name, args.gguf_file)  # cheap checks before any data or weights
    if config is not None:
        check_causal(config, name)
        fits_positions(config, args.block_size, "block_size", ConfigError, name)
    gguf = (name, args.gguf_file) if args.gguf_file else None
    check_distill(args.distill, config, causal=True, gguf=gguf)  # the teacher's, before weights
    if config is not None:  # the quant config against the model's layers, before any data
        check_quantizable(config, args.quant, causal_lm=True)
    tokenizer = load_tokenizer_for(args)
    task = get_task(args.task_name)
    train, evals, collator = task.data(args, tokenizer)  # bad data fails before weights
    # quantised by build_model (QATTrainer leaves a quantised model as it is); a GGUF model's
    # config is checked there once loaded, still before training
    model = build_model(
        recipe,
        head="causal_lm",
        tokenizer=tokenizer,
        check=lambda c: fits_positions(c, args.block_size, "block_size", ConfigError, name),
        round_gptq=checkpoint is None,  # a resumed run loads its own weights
    ).model
    if model.config.pad_token_id is None:  # generate() and padding agree with the tokenizer
        model.config.pad_token_id = tokenizer.pad_token_id
    logger.info(
        "qat: %s, %d train and %d eval sequences of <= %d tokens",
        args.task_name,
        len(train),
        len(evals),
        args.block_size,
    )
    build = trainer_cls or QATTrainer
    if build._is_sft:
        # TRL keeps only input_ids and labels of a tokenised dataset and pads them with its own
        # collator (labels as given, -100 padding, the attention mask rebuilt)
        collator = None
    trainer = build(
        model=model,
        args=args,  # a QATConfig: the trainer reads quant, finetune, lora, ... from it
        train_dataset=train,
        eval_dataset=evals,
        processing_class=tokenizer,
        data_collator=collator,
    )
    return train_and_evaluate(
        trainer,
        recipe,
        checkpoint,
        task.eval_metrics,
    )
