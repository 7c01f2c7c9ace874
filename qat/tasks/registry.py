"""One object per ``task_name``: which head it trains, which data it reads and which metrics it
reports, so that no caller tests the name.

GLUE tasks (``qat.tasks.glue.GlueTask``) train a sequence classifier on their GLUE splits and
report the official GLUE metric; ``causal_lm`` (text: WikiText-2 unless the recipe names other
data) and ``chat`` (conversations, the loss on the assistant's turns) train a causal LM and
report ``eval_perplexity``.

>>> from qat.tasks.registry import get_task
>>> [(t.name, t.head, t.is_decoder) for t in map(get_task, ("sst2", "chat"))]
[('sst2', 'sequence_classification', False), ('chat', 'causal_lm', True)]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

from qat.errors import DataError, QatError, did_you_mean
from qat.tasks.chat import chat_splits
from qat.tasks.glue import GLUE_TASKS, GlueTask
from qat.tasks.language_modeling import WIKITEXT, lm_splits


@dataclasses.dataclass(frozen=True)
class DecoderTask:
    """A causal-LM task: ``data(args, tokenizer)`` gives ``(train, eval, collator)``;
    ``default_dataset`` is read when the recipe names no data (None: it must name some, as
    ``data_hint`` says)."""

    name: str
    splits: Callable[[Any, Any], tuple[Any, Any, Any]]
    default_dataset: str | None
    data_hint: str
    head: ClassVar[str] = "causal_lm"
    is_decoder: ClassVar[bool] = True
    num_labels: ClassVar[None] = None

    def data(self, args: Any, tokenizer: Any) -> tuple[Any, Any, Any]:
        """The recipe's train and eval datasets, tokenised, and the collator that batches them."""
        return self.splits(args, tokenizer)

    @staticmethod
    def eval_metrics(metrics: dict[str, float]) -> dict[str, float]:
        """What evaluation adds to the Trainer's ``eval_loss``: its perplexity."""
        return {"eval_perplexity": math.exp(min(metrics["eval_loss"], 700.0))}


DECODER_TASKS: dict[str, DecoderTask] = {
    t.name: t
    for t in (
        DecoderTask("causal_lm", lm_splits, WIKITEXT, "text"),
        DecoderTask("chat", chat_splits, None, "rows with messages, or prompt and completion"),
    )
}
Task = GlueTask | DecoderTask
TASKS: dict[str, Task] = {**GLUE_TASKS, **DECODER_TASKS}


def get_task(name: Any, error: type[QatError] = DataError) -> Task:
    """The task ``task_name`` names, or one ``error`` line listing the valid names."""
    if not isinstance(name, str) or name not in TASKS:
        raise error(
            f"unknown task_name {name!r}{did_you_mean(name, TASKS)}; valid tasks: "
            f"{', '.join(TASKS)}"
        )
    return TASKS[name]
