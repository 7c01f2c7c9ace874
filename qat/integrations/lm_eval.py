"""lm-evaluation-harness on a ``qat`` model: the fake-quantised model, in memory, scored by
lm-eval's own tasks (``pip install 'qat[lm_eval]'``).

    from qat import build_model
    from qat.integrations.lm_eval import lm_eval_evaluate

    built = build_model("recipes/smollm2_wikitext_w4a4.yaml", head="causal_lm")
    out = lm_eval_evaluate(built.model, built.tokenizer, ["hellaswag"], limit=100)
    out["results"]["hellaswag"]["acc,none"]

The model goes to lm-eval's ``HFLM`` as it is, quantisers on, so every log-likelihood lm-eval
computes comes from the quantised forward. Task names are checked before lm-eval wraps the
model; a local task folder (``include_path``) is searched first, and lm-eval's ~15k built-in
tasks are indexed only when a name is not found there (indexing them takes seconds).
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qat.errors import UsageError
from qat.files import check_output_file
from qat.runs.build import resolve
from qat.runs.entry import load_for_command, write_results

# HFLM arguments this wrapper sets itself: passing them again would load another model
_OWN_ARGS = ("pretrained", "tokenizer", "backend")
# parts of simple_evaluate's output worth writing down (the rest: samples, environment dumps)
SUMMARY_KEYS = (
    "results",
    "groups",
    "group_subtasks",
    "n-shot",
    "n-samples",
    "versions",
    "higher_is_better",
)


def require_lm_eval() -> None:
    """One line saying how to install lm-eval when it is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UsageError(
            "lm-evaluation-harness is not installed: pip install 'qat[lm_eval]'"
        ) from None


def find_tasks(tasks: Sequence[str], include_path: str | os.PathLike | None = None) -> Any:
    """lm-eval's ``TaskManager`` that knows every name in ``tasks`` (a local folder first, the
    built-in tasks when needed), or a ``UsageError`` naming the unknown task."""
    tasks = _task_list(tasks)
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise UsageError(f"include_path {str(include_path)!r} is not a folder")
    manager = None
    if include_path is not None:
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if _unknown(manager, tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=None if include_path is None else str(include_path))
    _raise_unknown(manager, tasks, include_path)
    return manager


def _task_list(tasks: Sequence[str]) -> list[str]:
    if isinstance(tasks, str) or not tasks:  # a str would be read letter by letter
        raise UsageError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    return list(tasks)


def _raise_unknown(manager: Any, tasks: Sequence[str], include_path: Any) -> None:
    unknown = _unknown(manager, tasks)
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        where = f" in {str(include_path)!r} or" if include_path is not None else ""
        raise UsageError(
            f"unknown lm-eval task {unknown[0]!r}: not found{where} among lm-eval's tasks{hint}"
        )


def _is_yaml_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def _unknown(manager: Any, tasks: Sequence[str]) -> list[str]:
    """Names that match no task, group or tag of ``manager`` (globs as lm-eval's CLI reads
    them: ``mmlu_*``) and are no task YAML file."""
    return [t for t in tasks if not _is_yaml_file(t) and not manager.match_tasks([t])]


def expand_tasks(manager: Any, tasks: Sequence[str]) -> list[str]:
    """The task names ``simple_evaluate`` loads: globs expanded, YAML files as absolute paths."""
    out: list[str] = []
    for t in tasks:
        names = [str(Path(t).absolute())] if _is_yaml_file(t) else manager.match_tasks([t])
        out += [n for n in names if n not in out]
    return out


def lm_eval_evaluate(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    include_path: str | os.PathLike | None = None,
    model_args: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run lm-eval's ``simple_evaluate`` on ``model`` (quantised or not, used as it is) and
    return its output (``results``, ``samples`` with ``log_samples=True``, ...).

    ``model_args``: extra ``HFLM`` arguments (``max_length``, ``add_bos_token``, ...); the
    model stays on its device (move it first); ``kwargs`` go to ``simple_evaluate``
    (``log_samples``, ``gen_kwargs``, ...). ``lm_eval`` does the same from a recipe or run
    folder, checking the task names before the model loads."""
    check_arguments(num_fewshot, limit, model_args, batch_size)
    tasks = _task_list(tasks)
    manager = find_tasks(tasks, include_path)
    return _simple_evaluate(
        model, tokenizer, tasks, manager, num_fewshot, limit, batch_size, model_args, kwargs
    )


def _simple_evaluate(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    manager: Any,
    num_fewshot: int | None,
    limit: int | float | None,
    batch_size: int | str,
    model_args: dict[str, Any] | None,
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` of ``model`` (arguments and task names checked)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    model_args = dict(model_args or {})
    if (
        model_args.get("prefix_token_id") is None
        and tokenizer.bos_token_id is None
        and tokenizer.eos_token_id is None
    ):
        # lm-eval scores an empty context after BOS (else EOS); a tokenizer naming neither
        # leaves it None and lm-eval fails deep inside: take the model's own BOS
        model_args["prefix_token_id"] = getattr(model.config, "bos_token_id", None)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **model_args)
    kwargs.setdefault("log_samples", False)
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=expand_tasks(manager, tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        **kwargs,
    )


def lm_eval(
    source: Any,
    tasks: Sequence[str],
    overrides: Any = (),
    *,
    tokenizer: Any = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    include_path: str | os.PathLike | None = None,
    model_args: dict[str, Any] | str | None = None,
    output: str | os.PathLike | None = None,
    device: Any = None,
) -> dict[str, Any]:
    """lm-eval ``tasks`` on ``source``'s causal LM under its quant config, as ``qat lm-eval``
    does: a recipe, a run / checkpoint folder (LoRA adapter included), a model name or a model
    in memory (with its ``tokenizer``). Task names are checked before the model loads. Writes
    (``output``; default: the run folder's or recipe ``output_dir``'s ``lm_eval.json``; a
    model name or a model in memory: not written) and returns each task's metrics with the
    quant config and the source. ``model_args``: more ``HFLM`` arguments, a dict or lm-eval's
    ``k=v,k=v`` string."""
    if isinstance(model_args, str):  # lm-eval's own k=v,k=v form
        model_args = parse_model_args(model_args)
    check_arguments(num_fewshot, limit, model_args, batch_size)
    if output is not None:
        check_output_file(output)
    tasks = _task_list(tasks)
    require_lm_eval()
    src = resolve(source, overrides, tokenizer)
    args = src.args
    if getattr(args, "qdec", None) is not None:
        raise UsageError(
            "qat lm-eval does not apply QDEC (the recipe's qdec section); pass --qdec null"
        )
    out = Path(output) if output is not None else src.output_path("lm_eval.json")
    if out is not None:
        check_output_file(out)
    manager = find_tasks(tasks, include_path)  # unknown names: before the model
    loaded = load_for_command(src, device=device, head="causal_lm")
    result = _simple_evaluate(
        loaded.model,
        loaded.tokenizer,
        tasks,
        manager,
        num_fewshot,
        limit,
        batch_size,
        model_args,
        {},
    )
    results = {
        "source": str(source)
        if isinstance(source, (str, os.PathLike))
        else args.model_name_or_path,
        "model_name_or_path": args.model_name_or_path,
        "quant": None if args.quant is None else args.quant.to_dict(),
        "bits_per_element": loaded.density().quantized_bits_per_element or None,
        "tasks": tasks,
        "num_fewshot": num_fewshot,
        "limit": limit,
        "batch_size": batch_size,
        **summary(result),
    }
    return write_results(results, out)


def parse_model_args(text: str) -> dict[str, Any]:
    """``k=v,k=v`` as lm-eval's own --model_args: numbers and true/false typed, the rest str."""
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--model_args: {item!r} is not key=value")
        out[key.strip()] = _typed(val.strip())
    return out


def _typed(val: str) -> Any:
    if val.lower() in ("true", "false"):
        return val.lower() == "true"
    if val.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(val)
        except ValueError:
            pass
    return val


def check_arguments(
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    model_args: dict[str, Any] | None = None,
    batch_size: int | str = 1,
) -> None:
    """One line for a bad ``num_fewshot``, ``limit`` (a count of documents >= 1 or a fraction
    in (0, 1)), ``batch_size`` (a whole number >= 1, ``auto`` or ``auto:N``) or an ``HFLM``
    argument this wrapper sets itself."""
    if not _valid_batch_size(batch_size):
        raise UsageError(f"--batch_size must be a whole number >= 1 or 'auto', got {batch_size!r}")
    clash = [k for k in _OWN_ARGS if k in (model_args or {})]
    if clash:
        raise UsageError(
            f"model_args: {clash[0]!r} is set by qat (the model and tokenizer given); leave it out"
        )
    if num_fewshot is not None and num_fewshot < 0:
        raise UsageError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if limit is not None and not _valid_limit(limit):
        raise UsageError(
            f"limit must be a whole number of documents >= 1 or a fraction in (0, 1), got {limit!r}"
        )


def _valid_batch_size(size: Any) -> bool:
    if isinstance(size, str):
        return size == "auto" or size.startswith("auto:")
    return isinstance(size, int) and not isinstance(size, bool) and size >= 1


def _valid_limit(limit: Any) -> bool:
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        return False
    return math.isfinite(limit) and (0 < limit < 1 or (limit >= 1 and limit == int(limit)))


def summary(output: dict[str, Any]) -> dict[str, Any]:
    """The JSON-safe part of ``simple_evaluate``'s output: per-task metrics, shots, sample
    counts, versions (numpy numbers become floats; anything else not JSON is dropped)."""
    out = {k: _jsonable(output[k]) for k in SUMMARY_KEYS if k in output}
    return {k: v for k, v in out.items() if v is not _DROP}


_DROP = object()


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return value if not isinstance(value, float) or math.isfinite(value) else None
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return _jsonable(value.item())
    if isinstance(value, dict):
        out = {str(k): _jsonable(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not _DROP}
    if isinstance(value, (list, tuple)):
        return [v for v in map(_jsonable, value) if v is not _DROP]
    return _DROP
