"""Calibration rows for ``quant.gptq``: the first rows of the recipe task's train split.

A decoder (``task_name: causal_lm``) takes its training text packed into ``block_size``
chunks, as training reads it; a GLUE task takes a seeded sample of its train rows, tokenised
to ``max_length`` and padded per batch. The rows are read before the tokenizer and the model
load (``calibration_source``), so a source without them is one line before anything heavy.
"""

from __future__ import annotations

from typing import Any

from qat.quant.transforms.gptq import GPTQError, apply_gptq
from qat.tasks.glue import GLUE_TASKS, get_task, glue_splits
from qat.tasks.language_modeling import lm_dataset, lm_text

BATCH = 8  # rows per calibration forward


def calibration_source(args: Any, rows: int) -> Any:
    """The raw calibration data of the recipe ``args`` (its task's train split, read now);
    GPTQError for a source without one."""

    task = getattr(args, "task_name", None)
    if task is None:
        raise GPTQError(
            "quant.gptq calibrates on the train split of the recipe's task; a bare model name "
            "has none: give a recipe"
        )
    if task == "causal_lm":
        return lm_text(args, "train")
    if task in GLUE_TASKS:
        return glue_splits(
            get_task(task), args.data_dir, ("train",), train_samples=rows, seed=args.seed
        )
    raise GPTQError(
        f"quant.gptq calibrates on the train split of task_name causal_lm or a GLUE task, not "
        f"{task!r}"
    )


def calibration_batches(source: Any, args: Any, tokenizer: Any, rows: int) -> list[dict[str, Any]]:
    """Up to ``rows`` rows of ``source`` (``calibration_source``), tokenised, in batches of 8
    (CPU tensors: ``input_ids``, ``attention_mask``)."""
    import torch

    if isinstance(source, tuple):  # a decoder's text and where it came from
        ids = torch.tensor(
            lm_dataset(source[0], tokenizer, args.block_size, rows, source[1])["input_ids"]
        )
        return [
            {"input_ids": ids[i : i + BATCH], "attention_mask": torch.ones_like(ids[i : i + BATCH])}
            for i in range(0, len(ids), BATCH)
        ]
    from transformers import DataCollatorWithPadding

    data = source.tokenize(tokenizer, args.max_length)["train"].remove_columns("label")
    collate = DataCollatorWithPadding(tokenizer)
    feats = [data[i] for i in range(len(data))]
    return [dict(collate(feats[i : i + BATCH])) for i in range(0, len(feats), BATCH)]


def gptq_on_rows(model: Any, batches: list[dict[str, Any]], spec: dict[str, Any]) -> None:
    """Round ``model``'s quantised weights by GPTQ (``qat.quant.transforms.gptq.apply_gptq``) on
    ``batches`` (``calibration_batches``), moved to the model's device."""
    import logging

    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    n = apply_gptq(model, batches, spec)
    rows = sum(len(b["input_ids"]) for b in batches)
    logging.getLogger(__name__).info("qat: GPTQ rounded %d layers on %d calibration rows", n, rows)
