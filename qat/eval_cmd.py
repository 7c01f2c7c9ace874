"""``qat eval``: GLUE evaluation of a recipe (PTQ, no training) or of a QAT checkpoint.

    qat eval recipes/minilm_sst2.yaml --quant.weight.width 6 --output ptq.json
    qat eval outputs/minilm_sst2 --max_eval_samples 200

A recipe is loaded from its ``model_name_or_path`` and quantised with its ``quant`` section
(post-training quantisation; an encoder's classifier head is untrained unless the path is a
fine-tuned run). A run or checkpoint directory must hold ``qat_config.json``; its quant
config, fine-tuning mode and LoRA adapter rebuild the trained model, and ``recipe.yaml`` (in
the directory or its parent) gives the task and ``max_length``. The loading helpers here are
shared by ``qat profile`` and ``qat export``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

USAGE = """usage: qat eval RECIPE.yaml|CHECKPOINT_DIR [--output FILE] [--device D] [--key value ...]

Evaluates on the task's validation split(s) without training and prints the metrics and the
density report. Recipe keys override the recipe (or the checkpoint's recipe.yaml), e.g.
--quant null, --quant.weight.width 6, --max_eval_samples 200, --per_device_eval_batch_size 64.
--output FILE  metrics JSON (default: <checkpoint dir or output_dir>/eval_qat.json)
--device D     cpu, cuda, cuda:N or auto (default: cuda when there is one, cpu with use_cpu)"""


class CommandError(ValueError):
    """Bad input to a qat command (path, option, model kind); printed as one line, exit 2."""


def split_options(argv: list[str], options: dict[str, type]) -> tuple[dict[str, Any], list[str]]:
    """Take this command's own ``--name value`` options out of ``argv`` (the rest are recipe
    overrides, which ``load_recipe`` would reject as unknown keys)."""
    opts: dict[str, Any] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        key, eq, val = tok[2:].partition("=") if tok.startswith("--") else ("", "", "")
        key = key.replace("-", "_")
        if key in options:
            if not eq:
                if options[key] is bool:
                    opts[key] = True
                    i += 1
                    continue
                if i + 1 >= len(argv):
                    raise CommandError(f"option --{key} needs a value")
                val, i = argv[i + 1], i + 1
            try:
                opts[key] = options[key](val) if options[key] is not bool else val.lower() in (
                    "1", "true", "yes")
            except ValueError:
                raise CommandError(f"option --{key}: {val!r} is not a valid "
                                   f"{options[key].__name__}") from None
        else:
            rest.append(tok)
        i += 1
    return opts, rest


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions a command reports as one ``error:`` line (bad input, not bugs)."""
    from qat.checkpoints import CheckpointError
    from qat.formats import FormatError
    from qat.glue import DataError
    from qat.models import DeviceError, ModelLoadError
    from qat.quant_config import QuantConfigError
    from qat.recipe import RecipeError

    return (CommandError, RecipeError, DataError, ModelLoadError, QuantConfigError, FormatError,
            DeviceError, FileNotFoundError, CheckpointError)


def run_cli(name: str, usage: str, argv: list[str] | None,
            body: Callable[[list[str]], None], extra_errors: tuple[type[Exception], ...] = ()
            ) -> int:
    """Shared ``main`` of the commands: ``--help``, then ``body(argv)``; bad input becomes one
    ``qat NAME: error: ...`` line and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    try:
        body(argv)
    except (*user_errors(), *extra_errors) as e:
        print(f"qat {name}: error: {e}", file=sys.stderr)
        return 2
    return 0


@dataclasses.dataclass
class Source:
    """What to load: the recipe (overrides applied) and, for a checkpoint, its directory."""

    recipe: Any  # qat.recipe.Recipe
    checkpoint: Path | None = None
    finetune: str = "full"


def _first_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_file(path: str | Path, option: str = "--output") -> Path:
    """An output file path must not be a directory, nor lie under a file; checked before any
    work so a long evaluation does not end in a traceback (and nothing is written here)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise CommandError(f"{option} {str(path)!r} is a directory, expected a file path "
                           f"(e.g. {str(p / 'results.json')!r})")
    if p.exists() and not p.is_file():
        raise CommandError(f"{option} {str(path)!r} is not a regular file")
    base = _first_existing(p.parent)
    if not base.is_dir():
        raise CommandError(f"{option} {str(path)!r} cannot be written: {str(base)!r} is a "
                           "file, not a folder")
    return p


def check_output_folder(path: str | Path, option: str = "--output_dir") -> Path:
    """An output folder must be a folder (or creatable: no file on its path)."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise CommandError(f"{option} {str(path)!r} is a file, expected a folder")
    base = _first_existing(p)
    if not base.is_dir():
        raise CommandError(f"{option} {str(path)!r} cannot be created: {str(base)!r} is a "
                           "file, not a folder")
    return p


def _find_recipe_yaml(ckpt: Path) -> Path | None:
    for d in (ckpt, ckpt.parent):
        if (d / "recipe.yaml").is_file():
            return d / "recipe.yaml"
    return None


def resolve_source(path: str, overrides: list[str]) -> Source:
    """A recipe file, or a run/checkpoint directory with ``qat_config.json``."""
    from qat.checkpoints import check_weights
    from qat.recipe import (
        apply_override,
        build_recipe,
        load_recipe,
        load_recipe_dict,
        parse_overrides,
    )
    from qat.trainer import QAT_CONFIG_FILE, read_qat_config

    p = Path(path).expanduser()
    if p.is_file():
        return Source(load_recipe(p, overrides))
    if not p.exists():
        raise CommandError(f"{path!r} does not exist (expected a recipe .yaml or a checkpoint "
                           "directory)")
    if not p.is_dir():
        raise CommandError(f"{path!r} is not a regular file or a directory (expected a recipe "
                           ".yaml or a checkpoint directory)")
    if not (p / QAT_CONFIG_FILE).is_file():
        raise CommandError(f"{path!r} is a directory that holds no {QAT_CONFIG_FILE}: not a "
                           "qat checkpoint (written by qat train); give a recipe .yaml file, "
                           "or to evaluate a plain model, a recipe whose model_name_or_path "
                           "points at it")
    state = read_qat_config(p)
    check_weights(p, state["finetune"])  # a truncated file: one line naming it, not a traceback
    yaml_path = _find_recipe_yaml(p)
    data: dict[str, Any] = dict(load_recipe_dict(yaml_path)) if yaml_path else {}
    finetune = state.get("finetune") or "full"
    # The checkpoint's quant config and mode win over its recipe; the user's overrides win last.
    ckpt_keys: dict[str, Any] = {"quant": state.get("quant"), "finetune": finetune}
    if state.get("lora"):
        ckpt_keys["lora"] = state["lora"]
    if finetune != "lora":  # the run dir holds the whole model; a LoRA run holds the adapter
        ckpt_keys.update(model_name_or_path=str(p), gguf_file=None)
    data.setdefault("output_dir", str(p))
    for key, value in {**ckpt_keys, **parse_overrides(overrides)}.items():
        apply_override(data, key, value)  # build_recipe rejects unknown keys
    if not data.get("task_name"):
        raise CommandError(f"{path!r}: no recipe.yaml in it or its parent says which task; "
                           "pass --task_name")
    if finetune == "lora" and not data.get("model_name_or_path"):
        raise CommandError(f"{path!r} is a LoRA checkpoint, but no recipe.yaml names the base "
                           "model; pass --model_name_or_path")
    return Source(build_recipe(data, str(yaml_path or p)), p, finetune)


def load_model(src: Source, num_labels: int, device: Any = None):
    """The sequence classifier of ``src``, quantised as its config says, in eval mode, on
    ``device`` (a ``torch.device``; None: ``resolve_device("auto")``, the GPU when there is
    one, as ``qat train`` does)."""
    import qat.attention  # noqa: F401 - registers the "qat" attention a saved run may name
    from qat import models
    from qat.models import check_max_length, load_sequence_classifier, load_tokenizer, preflight
    from qat.quantize import quantize_model

    args = src.recipe.args
    ckpt = src.checkpoint
    if device is None:
        device = models.resolve_device(None, src.recipe.training_args.use_cpu)
    config = preflight(args)
    tok_name = args.tokenizer_name_or_path or args.model_name_or_path
    gguf = None if args.tokenizer_name_or_path else args.gguf_file
    if ckpt is not None and (ckpt / "tokenizer_config.json").is_file():
        tok_name, gguf = str(ckpt), None
    tokenizer = load_tokenizer(tok_name, gguf)
    model = load_sequence_classifier(args.model_name_or_path, num_labels, args.gguf_file,
                                     args.torch_dtype, pad_token_id=tokenizer.pad_token_id)
    if config is None:  # GGUF: the config comes with the model
        check_max_length(model.config, args.max_length, args.model_name_or_path)
    if args.quant is not None:
        quantize_model(model, args.quant)
    if ckpt is not None and src.finetune == "lora":
        model = _attach_lora(model, ckpt)
    return model.to(device).eval(), tokenizer


def _attach_lora(model, ckpt: Path):
    """Load a saved adapter onto the quantised base with ``QuantLoraLinear`` layers."""
    from peft import LoraConfig, PeftModel

    from qat.lora import QuantLoraLinear
    from qat.modules import QuantConv1D, QuantLinear

    if not (ckpt / "adapter_config.json").is_file():
        raise CommandError(f"{str(ckpt)!r} is a LoRA run but holds no adapter_config.json")
    config = LoraConfig.from_pretrained(str(ckpt))
    config._register_custom_module({QuantLinear: QuantLoraLinear, QuantConv1D: QuantLoraLinear})
    return PeftModel.from_pretrained(model, str(ckpt), config=config)


def evaluate(model, tokenizer, task, data, batch_size: int) -> dict[str, float]:
    """Run ``model`` over one tokenised split and compute the task's metrics. Batches go to
    the model's device; logits stay there until the end (one copy back, no per-batch sync)."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer)
    device = next(model.parameters()).device
    preds, labels = [], []
    rows = data.with_format(None)
    with torch.no_grad():
        for start in tqdm(range(0, len(rows), batch_size), desc="eval", unit="batch"):
            batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
            labels.append(batch.pop("labels").numpy())
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            preds.append(model(**batch).logits.float())
    logits = torch.cat(preds).cpu().numpy()
    return task.compute_metrics(logits, np.concatenate(labels))


def run(path: str, overrides: list[str], output: str | None = None,
        device: str | None = None) -> dict[str, Any]:
    """Evaluate ``path`` (recipe or checkpoint) on ``device`` (``--device``; None: auto);
    returns and writes the results."""
    from qat import models
    from qat.density import density_report
    from qat.glue import get_task, load_glue, tokenize_glue

    if output is not None:
        check_output_file(output)
    src = resolve_source(path, overrides)
    args, targs = src.recipe.args, src.recipe.training_args
    out = Path(output) if output else (src.checkpoint or Path(targs.output_dir)) / "eval_qat.json"
    check_output_file(out)
    dev = models.resolve_device(device, targs.use_cpu)
    task = get_task(args.task_name)
    raw = load_glue(task.name, args.data_dir, splits=task.validation_splits)
    if args.max_eval_samples:  # before tokenising
        for s in task.validation_splits:
            raw[s] = raw[s].select(range(min(args.max_eval_samples, len(raw[s]))))
    model, tokenizer = load_model(src, task.num_labels, dev)
    data = tokenize_glue(raw, task, tokenizer, args.max_length)
    metrics: dict[str, dict[str, float]] = {}
    for split in task.validation_splits:
        metrics[split] = evaluate(model, tokenizer, task, data[split],
                                  targs.per_device_eval_batch_size)
    density = density_report(model)
    print(density.format())
    results = {
        "source": str(path), "mode": "checkpoint" if src.checkpoint else "ptq",
        "model_name_or_path": args.model_name_or_path, "task": task.name,
        "quant": None if args.quant is None else args.quant.to_dict(),
        "metrics": metrics, "density": density.to_dict(),
    }
    return write_results(results, out)


def write_results(results: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write a command's results as JSON to ``out`` and record where in ``results["output"]``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    results["output"] = str(out)
    return results


def main(argv: list[str] | None = None) -> int:
    def body(argv: list[str]) -> None:
        opts, rest = split_options(argv[1:], {"output": str, "device": str})
        results = run(argv[0], rest, opts.get("output"), opts.get("device"))
        for split, m in results["metrics"].items():
            print(f"qat eval: {split}: " + ", ".join(f"{k}={v:.4f}" for k, v in m.items()))
        print(f"qat eval: wrote {results['output']}")

    return run_cli("eval", USAGE, argv, body)


if __name__ == "__main__":
    sys.exit(main())
