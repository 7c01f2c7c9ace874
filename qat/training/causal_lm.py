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
import math
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


def decoder_data(args: Any, tokenizer: Any) -> tuple[Any, Any, Any]:
    """``(train, eval, collator)`` datasets of the recipe's decoder task, tokenised."""
    from transformers import default_data_collator

    from qat.errors import DataError
    from qat.tasks.chat import chat_collator, chat_dataset, check_chat_template
    from qat.tasks.language_modeling import lm_dataset, lm_text, load_rows

    name = args.tokenizer_name_or_path or args.model_name_or_path
    if args.task_name == "chat":
        check_chat_template(tokenizer, name)
        out = []
        for which, limit in (("train", args.max_train_samples), ("eval", args.max_eval_samples)):
            rows, _, where = load_rows(args, which)
            if rows is None:
                raise DataError(
                    f"{where} is plain text; task_name chat needs rows with "
                    "messages, or prompt and completion (.jsonl, .json or a Hub "
                    "dataset)"
                )
            out.append(chat_dataset(rows, tokenizer, args.block_size, limit, where))
        return out[0], out[1], chat_collator(tokenizer)
    texts = {which: lm_text(args, which) for which in ("train", "eval")}  # all read first
    limits = {"train": args.max_train_samples, "eval": args.max_eval_samples}
    with args.main_process_first(desc="tokenising"):
        train, evals = (
            lm_dataset(texts[w][0], tokenizer, args.block_size, limits[w], texts[w][1])
            for w in ("train", "eval")
        )
    return train, evals, default_data_collator  # equal-length chunks: nothing to pad


def train_decoder(
    recipe: Any, checkpoint: str | None, trainer_cls: Callable[..., Any] | None = None
) -> dict:
    """Train and evaluate a causal LM as ``recipe`` says; ``trainer_cls`` builds the trainer
    (default ``QATTrainer``; ``qat.integrations.trl.QATSFTTrainer`` for ``trainer: sft``)."""
    from transformers import set_seed

    from qat.models import load_config, load_tokenizer_for
    from qat.runs.build import build_model
    from qat.tasks.language_modeling import check_block_size, check_causal
    from qat.training.loop import train_and_evaluate, trainer_options
    from qat.training.teacher import check_distill
    from qat.training.trainer import QATTrainer

    args = recipe.args
    set_seed(args.seed)
    name = args.model_name_or_path
    config = load_config(name, args.gguf_file)  # cheap checks before any data or weights
    if config is not None:
        check_causal(config, name)
        check_block_size(config, args.block_size, name)
    gguf = (name, args.gguf_file) if args.gguf_file else None
    check_distill(args.distill, config, causal=True, gguf=gguf)  # the teacher's, before weights
    tokenizer = load_tokenizer_for(args)
    train, evals, collator = decoder_data(args, tokenizer)  # bad data fails before weights
    # quantised by build_model (QATTrainer leaves a quantised model as it is); a GGUF model's
    # config is checked there once loaded, still before training
    model = build_model(
        recipe,
        head="causal_lm",
        tokenizer=tokenizer,
        check=lambda c: check_block_size(c, args.block_size, name),
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
    if trainer_cls is not None:
        # TRL keeps only input_ids and labels of a tokenised dataset and pads them with its own
        # collator (labels as given, -100 padding, the attention mask rebuilt)
        collator = None
    build = trainer_cls or QATTrainer
    trainer = build(
        model=model,
        **trainer_options(args),
        train_dataset=train,
        eval_dataset=evals,
        processing_class=tokenizer,
        data_collator=collator,
    )
    return train_and_evaluate(
        trainer,
        recipe,
        checkpoint,
        lambda m: {"eval_perplexity": math.exp(min(m["eval_loss"], 700.0))},
    )
