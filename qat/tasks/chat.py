"""Chat / instruction data (``task_name: chat``): rows formatted with the tokenizer's chat
template, the loss on the assistant's turns only.

A row is either ``{"messages": [{"role": ..., "content": ...}, ...]}`` or
``{"prompt": ..., "completion": ...}`` (strings, read as one user turn and one assistant turn, or
lists of messages). Each assistant turn's text is found as the difference between the
template of the conversation up to that turn and of the conversation before it (with the
generation prompt; a conversation that opens with an assistant turn starts at that turn's
content), and mapped to the tokens of the conversation, tokenised once; the labels are the
input ids on assistant tokens (the template's end-of-turn marker included: the model learns to
stop) and -100 elsewhere. Rows are truncated to
``block_size`` tokens; a row left with no assistant token is dropped (with a warning).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from qat.errors import DataError
from qat.tasks.language_modeling import load_rows

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100  # labels the loss skips (transformers' cross-entropy ignore_index)


def check_chat_template(tokenizer: Any, name: str) -> None:
    """Chat data needs a chat template to format its turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"tokenizer {name!r} has no chat template, which task_name chat needs "
            "to format messages; use a chat/instruct tokenizer "
            "(tokenizer_name_or_path) or task_name causal_lm for plain text"
        )


def _as_messages(value: Any, role: str) -> Any:
    # a string is one turn; anything else must be a list of messages (checked by the caller)
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def row_messages(row: dict[str, Any], n: int, where: str) -> list[dict[str, Any]]:
    """The conversation of one row (``messages``, or ``prompt`` + ``completion``), checked."""
    if "messages" in row:
        msgs = row["messages"]
    elif "prompt" in row and "completion" in row:
        prompt, completion = (
            _as_messages(row[k], r) for k, r in (("prompt", "user"), ("completion", "assistant"))
        )
        for key, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, list):
                raise DataError(
                    f"{where} row {n}: {key} is {type(value).__name__}; expected "
                    "a string or a list of {role, content} messages"
                )
        msgs = prompt + completion
    else:
        raise DataError(
            f"{where} row {n}: expected a 'messages' column or 'prompt' and "
            f"'completion' columns; got {', '.join(map(str, row)) or 'none'}"
        )
    if not isinstance(msgs, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in msgs
    ):
        raise DataError(
            f"{where} row {n}: messages must be a list of {{role, content}} "
            "objects with string values"
        )
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(
            f"{where} row {n}: no assistant turn, so nothing to learn (each row "
            "needs at least one message with role 'assistant')"
        )
    return msgs


def _ids(tokenizer: Any, text: str) -> list[int]:
    # the template writes the special tokens (BOS, turn markers) itself
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _token_starts(tokenizer: Any, text: str) -> tuple[list[int], list[int] | None]:
    """``(ids, first character of each token)`` of ``text`` in one pass (fast tokenizers);
    the starts are None for a tokenizer that cannot map tokens to characters."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return _ids(tokenizer, text), None
    return enc["input_ids"], [a for a, _ in enc["offset_mapping"]]


def assistant_spans(
    tokenizer: Any, msgs: list[dict[str, Any]], limit: int | None = None
) -> Iterator[tuple[int, int]]:
    """``(start, end)`` character spans of the assistant turns in the rendered conversation:
    from after the generation prompt to the end of the turn (its end-of-turn marker
    included). A conversation that opens with an assistant turn learns only that turn's own
    text, not what the template writes before it (a default system prompt). Stops at
    ``limit`` characters: turns beyond the block are cut off anyway."""

    def template(m: list[dict[str, Any]], gen: bool = False) -> str:
        return tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)

    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        if i:
            start = len(template(msgs[:i], gen=True))
        else:  # no prompt to render before it: the turn starts where its content does
            first = template(msgs[:1])
            # a template may trim the content; not found at all: learn none of this turn
            # rather than what precedes it
            at = first.rfind(m["content"].strip()) if m["content"].strip() else -1
            start = at if at >= 0 else len(first)
        if limit is not None and start >= limit:
            return
        yield start, len(template(msgs[: i + 1]))


def encode_chat(
    tokenizer: Any, msgs: list[dict[str, Any]], max_tokens: int | None = None
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one conversation: labels are -100 outside assistant turns.

    The conversation is tokenised once and each turn's character span mapped to its tokens
    (re-tokenising every prefix made long conversations quadratic); ``max_tokens`` stops at
    the block, where the row is cut anyway."""
    import bisect

    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    ids, starts = _token_starts(tokenizer, full)
    labels = [IGNORE_INDEX] * len(ids)
    if starts is None:  # slow tokenizer: count each span's tokens by tokenising its prefix
        for a, b in assistant_spans(tokenizer, msgs):
            i, j = len(_ids(tokenizer, full[:a])) if a else 0, len(_ids(tokenizer, full[:b]))
            labels[i:j] = ids[i:j]
        return ids, labels
    limit = starts[max_tokens] if max_tokens is not None and max_tokens < len(ids) else None
    for a, b in assistant_spans(tokenizer, msgs, limit):
        i, j = bisect.bisect_left(starts, a), bisect.bisect_left(starts, b)
        labels[i:j] = ids[i:j]
    return ids, labels


def chat_dataset(
    rows: list[dict[str, Any]], tokenizer: Any, block_size: int, max_rows: int | None, where: str
):
    """A ``datasets.Dataset`` of ``input_ids``, ``attention_mask`` and ``labels`` (prompt
    masked); every row is checked before any is tokenised."""
    from datasets import Dataset

    if max_rows is not None:
        rows = rows[:max_rows]
    if not rows:
        raise DataError(f"{where} is empty: no rows to train or evaluate on")
    convs = [row_messages(row, n, where) for n, row in enumerate(rows, 1)]
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    dropped = 0
    for msgs in convs:
        ids, labels = encode_chat(tokenizer, msgs, block_size)
        ids, labels = ids[:block_size], labels[:block_size]
        if all(t == IGNORE_INDEX for t in labels[1:]):  # nothing predicted after truncation
            dropped += 1
            continue
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
    if dropped:
        logger.warning(
            "%s: dropped %d of %d rows whose assistant turns start beyond block_size %d tokens",
            where,
            dropped,
            len(convs),
            block_size,
        )
    if not out["input_ids"]:
        raise DataError(
            f"{where}: every row's assistant turn starts beyond block_size "
            f"{block_size} tokens; raise block_size"
        )
    return Dataset.from_dict(out)


def chat_collator(tokenizer: Any):
    """Pads ``input_ids`` with the pad token, ``labels`` with -100, on the right."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)


def chat_splits(args: Any, tokenizer: Any) -> tuple[Any, Any, Any]:
    """``(train, eval, collator)`` of a ``chat`` recipe: its rows formatted with the chat
    template, every row of both splits read and checked before any is tokenised."""

    check_chat_template(tokenizer, args.tokenizer_name_or_path or args.model_name_or_path)
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
