"""``qat export``: write a quantised model in its packed form (``qat.export.packed``).

    qat export recipes/minilm_sst2.yaml --out exported/minilm_w4
    qat export outputs/minilm_sst2 --out exported/minilm_qat
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from qat.cli.base import run_cli, split_options
from qat.errors import UsageError

USAGE = """usage: qat export RECIPE.yaml|CHECKPOINT_DIR --out DIR [--overwrite] [--key value ...]

Writes DIR/qat_packed.safetensors (packed codes + scales; float for unquantised modules),
DIR/config.json (model_type qat_packed), DIR/modeling_qat_packed.py and the tokenizer. Load it
with AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True) (a decoder,
task_name causal_lm / chat: AutoModelForCausalLM, and model.generate works), or without
trust_remote_code after `import qat`. DIR must be new or empty unless --overwrite;
it can never be, lie inside or contain the source checkpoint.
--device D  where the model is loaded: cpu, cuda, cuda:N or auto (default)
Recipe keys override the recipe (or the checkpoint's recipe.yaml), e.g. --quant.weight.width 6."""



def _protected(path: str, src: Any) -> tuple[dict[str, Path], dict[str, Path]]:
    """(sources --out may not touch at all, paths --out may not contain)."""
    import os

    from qat.runs.build import find_recipe_yaml

    args = src.recipe.args
    sources: dict[str, Path] = {}
    keep: dict[str, Path] = {"current directory": Path(os.getcwd())}
    if src.checkpoint is not None:
        sources["source checkpoint"] = src.checkpoint
        yaml_path = find_recipe_yaml(src.checkpoint)
        if yaml_path is not None:
            keep["run folder"] = yaml_path.parent
    else:
        keep["recipe"] = Path(path)
    for what, value in (("model", args.model_name_or_path),
                        ("tokenizer", args.tokenizer_name_or_path)):
        if value and Path(value).expanduser().exists():
            keep[what] = Path(value)
    if getattr(args, "data_dir", None):
        keep["data folder"] = Path(args.data_dir)
    return sources, keep


def run(path: str, argv: list[str]) -> dict[str, Any]:
    from qat.export.packed import check_destination, check_not_source, export_model
    from qat.models import resolve_device
    from qat.quant.density import density_report
    from qat.runs.build import build_model, resolve_source
    from qat.tasks.glue import get_task
    from qat.tasks.language_modeling import LM_TASKS

    opts, overrides = split_options(argv, {"out": str, "overwrite": bool, "device": str})
    if not opts.get("out"):
        raise UsageError("--out DIR is required")
    overwrite = bool(opts.get("overwrite"))
    src = resolve_source(path, overrides)
    check_not_source(Path(opts["out"]), *_protected(path, src))  # before the slow part
    check_destination(opts["out"], overwrite)
    decoder = src.recipe.args.task_name in LM_TASKS  # a causal LM: no classification head
    num_labels = None if decoder else get_task(src.recipe.args.task_name).num_labels
    device = resolve_device(opts.get("device"), src.recipe.training_args.use_cpu)
    built = build_model(src, head="causal_lm" if decoder else "sequence_classification",
                        device=device, num_labels=num_labels)
    model, tokenizer = built.model, built.tokenizer
    density = density_report(model)
    info: dict[str, Any] = {"out": str(opts["out"]), "density": density.to_dict()}
    out = export_model(model, opts["out"], tokenizer, overwrite=overwrite, info=info)
    print(density.format(per_layer=False))
    info["out"] = str(out)
    return info


def main(argv: list[str] | None = None) -> int:
    def body(argv: list[str]) -> None:
        info = run(argv[0], argv[1:])
        print(f"qat export: wrote {info['out']} (qat_packed.safetensors: "
              f"{info['weight_file_bytes'] / 2**20:.2f} MiB)")

    return run_cli("export", USAGE, argv, body)


if __name__ == "__main__":
    sys.exit(main())
