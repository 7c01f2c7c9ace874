"""``qat export``: write a quantised model in its packed form (``qat.export.packed``), or for an
engine: ``--to compressed-tensors`` (vLLM; ``qat.export.compressed_tensors``) or ``--to gguf``
(llama.cpp; ``qat.export.gguf``).

    qat export recipes/minilm_sst2.yaml --out exported/minilm_w4
    qat export outputs/minilm_sst2 --out exported/minilm_qat
    qat export outputs/llama_nvfp4 --to compressed-tensors --out exported/llama_nvfp4
    qat export outputs/smollm2_q4_0 --to gguf --out exported/smollm2_q4_0
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from qat.cli.base import run_cli, split_options
from qat.errors import UsageError

USAGE = """usage: qat export RECIPE.yaml|CHECKPOINT_DIR --out DIR
                  [--to packed|compressed-tensors|gguf] [--overwrite] [--key value ...]

--to packed (default) writes DIR/qat_packed.safetensors (packed codes + scales; float for
unquantised modules), DIR/config.json (model_type qat_packed), DIR/modeling_qat_packed.py and
the tokenizer. Load it
with AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True) (a decoder,
task_name causal_lm / chat: AutoModelForCausalLM, and model.generate works), or without
trust_remote_code after `import qat`. DIR must be new or empty unless --overwrite;
it can never be, lie inside or contain the source checkpoint.
--to compressed-tensors writes a vLLM checkpoint (model.safetensors, config.json with
quantization_config, tokenizer) for nvfp4 (nvfp4-pack-quantized) or mxfp4 (mxfp4-pack-quantized)
linears, weight-only or with the same format on activations (W4A4); nvfp4 activations get their
input_global_scale from --calibration_samples N (default 32) training chunks of the recipe.
--to gguf writes DIR/model.gguf (llama.cpp) of a Llama-family decoder whose linears are
ggml_q4_0, ggml_q8_0 or mxfp4 (activations null or ggml_q8_0); --gguf_embeddings f16 (default),
q8_0 or f32 for token_embd and an unquantised output; tokenizer from the source GGUF if any.
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
    for what, value in (
        ("model", args.model_name_or_path),
        ("tokenizer", args.tokenizer_name_or_path),
    ):
        if value and Path(value).expanduser().exists():
            keep[what] = Path(value)
    if getattr(args, "data_dir", None):
        keep["data folder"] = Path(args.data_dir)
    return sources, keep


TARGETS = ("packed", "compressed-tensors", "gguf")


def _precheck(target: str, quant: Any) -> None:
    """Refuse, before loading anything, formats the target engine cannot hold or run."""
    from qat.export.compressed_tensors import check_ct_format
    from qat.export.gguf import check_gguf_formats
    from qat.export.packed import ExportError, refuse_rotation
    from qat.formats import make_format

    if target == "packed":
        return
    if quant is None:
        if target == "gguf":
            return  # a float export (F16 linears): the baseline an engine compares against
        raise ExportError(f"--to {target}: the model is not quantised (quant: null)")
    rotated = [quant.rotation] + [o.get("rotation") for o in quant.overrides.values()]
    if any(r is not None for r in rotated):
        refuse_rotation(target)
    weight, act = (
        None if quant.weight is None else make_format(quant.weight),
        None if quant.activation is None else make_format(quant.activation),
    )
    if target == "gguf":
        check_gguf_formats(weight, act, quant.matmul is not None)
    else:
        check_ct_format(weight, act, quant.matmul is not None)


def _precheck_gguf(src: Any, embeddings: str) -> None:
    """A decoder of an architecture the GGUF writer knows (reads the config only)."""
    from qat.export.gguf import EMBEDDING_TYPES, check_gguf_arch
    from qat.export.packed import ExportError
    from qat.models import load_config
    from qat.tasks.language_modeling import LM_TASKS

    if embeddings not in EMBEDDING_TYPES:
        raise UsageError(
            f"--gguf_embeddings {embeddings!r} is not one of {', '.join(EMBEDDING_TYPES)}"
        )
    args = src.recipe.args
    if args.task_name not in LM_TASKS:
        raise ExportError(
            f"--to gguf writes decoders; task_name {args.task_name!r} is a classifier"
        )
    config = load_config(args.model_name_or_path, args.gguf_file)
    if config is None:  # a GGUF source: its architecture key, without loading the weights
        import gguf

        from qat.export.gguf import GGUF_ARCHS
        from qat.models import resolve_model_path

        path = Path(resolve_model_path(args.model_name_or_path)) / args.gguf_file
        arch = gguf.GGUFReader(str(path)).fields["general.architecture"].contents()
        if arch not in GGUF_ARCHS.values():
            raise ExportError(
                f"--to gguf: source architecture {arch!r} is not one the GGUF "
                f"writer knows; known: {', '.join(GGUF_ARCHS.values())}"
            )
        return
    check_gguf_arch(config)


def _calibration_batches(src: Any, tokenizer: Any, n: int, device: Any) -> list[dict[str, Any]]:
    """Up to ``n`` training chunks of a decoder recipe, as batches of 8, on ``device``."""
    from qat.export.packed import ExportError
    from qat.tasks.language_modeling import LM_TASKS
    from qat.training.causal_lm import decoder_data

    args = src.recipe.args
    if args.task_name not in LM_TASKS:
        raise ExportError(
            "--to compressed-tensors: nvfp4 activations are calibrated on a "
            f"decoder recipe's text; task_name {args.task_name!r} is not one"
        )
    train, _, collate = decoder_data(args, tokenizer)
    rows = [train[i] for i in range(min(n, len(train)))]
    return [
        {k: v.to(device) for k, v in collate(rows[i : i + 8]).items() if k != "labels"}
        for i in range(0, len(rows), 8)
    ]


def run(path: str, argv: list[str]) -> dict[str, Any]:
    from qat.export.packed import check_destination, export_model
    from qat.models import resolve_device
    from qat.quant.density import density_report
    from qat.runs.build import build_model, resolve_source
    from qat.runs.folders import check_not_source
    from qat.tasks.glue import get_task
    from qat.tasks.language_modeling import LM_TASKS

    opts, overrides = split_options(
        argv,
        {
            "out": str,
            "overwrite": bool,
            "device": str,
            "to": str,
            "calibration_samples": int,
            "gguf_embeddings": str,
        },
    )
    if not opts.get("out"):
        raise UsageError("--out DIR is required")
    target = opts.get("to") or "packed"
    if target not in TARGETS:
        raise UsageError(f"--to {target!r} is not one of {', '.join(TARGETS)}")
    overwrite = bool(opts.get("overwrite"))
    src = resolve_source(path, overrides)
    check_not_source(Path(opts["out"]), *_protected(path, src))  # before the slow part
    check_destination(opts["out"], overwrite)
    _precheck(target, src.recipe.args.quant)
    if target == "gguf":
        _precheck_gguf(src, opts.get("gguf_embeddings") or "f16")
    decoder = src.recipe.args.task_name in LM_TASKS  # a causal LM: no classification head
    num_labels = None if decoder else get_task(src.recipe.args.task_name).num_labels
    device = resolve_device(opts.get("device"), src.recipe.args.use_cpu)
    built = build_model(
        src,
        head="causal_lm" if decoder else "sequence_classification",
        device=device,
        num_labels=num_labels,
    )
    model, tokenizer = built.model, built.tokenizer
    density = density_report(model)
    info: dict[str, Any] = {"out": str(opts["out"]), "density": density.to_dict(), "to": target}
    if target == "compressed-tensors":
        out = _export_ct(model, opts, src, tokenizer, device, overwrite)
        info["weight_file_bytes"] = (out / "model.safetensors").stat().st_size
    elif target == "gguf":
        out = _export_gguf(model, opts, src, tokenizer, overwrite)
        info["weight_file_bytes"] = (out / "model.gguf").stat().st_size
    else:
        out = export_model(model, opts["out"], tokenizer, overwrite=overwrite, info=info)
    print(density.format(per_layer=False))
    info["out"] = str(out)
    return info


def _export_ct(
    model: Any, opts: dict[str, Any], src: Any, tokenizer: Any, device: Any, overwrite: bool
) -> Path:
    from qat.export.compressed_tensors import (
        check_model,
        export_compressed_tensors,
        record_input_amax,
    )

    _, _, act = check_model(model)
    amax = None
    if act is not None and act.name == "nvfp4":
        n = opts.get("calibration_samples") or 32
        amax = record_input_amax(model, _calibration_batches(src, tokenizer, n, device))
    return export_compressed_tensors(
        model, opts["out"], tokenizer, overwrite=overwrite, input_amax=amax
    )


def source_gguf(src: Any) -> Path | None:
    """The GGUF file the model came from, whose tokenizer keys the export copies: the recipe's
    ``gguf_file``, or for a trained run (whose folder replaces the model path) the one its
    ``recipe.yaml`` started from, so llama.cpp tokenises as in training (a tokenizer rebuilt
    from the Hugging Face files lacks llama.cpp's pre-tokenizer name)."""
    from qat.models import ModelLoadError, resolve_model_path
    from qat.runs.build import find_recipe_yaml
    from qat.runs.recipe import load_recipe_dict

    args = src.recipe.args
    if args.gguf_file:
        return Path(resolve_model_path(args.model_name_or_path)) / args.gguf_file
    yaml_path = None if src.checkpoint is None else find_recipe_yaml(Path(src.checkpoint))
    data = load_recipe_dict(yaml_path) if yaml_path else {}
    if not (data.get("gguf_file") and data.get("model_name_or_path")):
        return None
    try:
        path = Path(resolve_model_path(str(data["model_name_or_path"]))) / data["gguf_file"]
    except ModelLoadError:  # the base model moved: fall back to the Hugging Face tokenizer
        return None
    return path if path.is_file() else None


def _export_gguf(
    model: Any, opts: dict[str, Any], src: Any, tokenizer: Any, overwrite: bool
) -> Path:
    from qat.export.gguf import export_gguf

    args = src.recipe.args
    source = source_gguf(src)
    return export_gguf(
        model,
        opts["out"],
        tokenizer,
        source_gguf=source,
        overwrite=overwrite,
        embeddings=opts.get("gguf_embeddings") or "f16",
        name=Path(args.gguf_file or args.model_name_or_path).stem,
    )


def main(argv: list[str] | None = None) -> int:
    def body(argv: list[str]) -> None:
        info = run(argv[0], argv[1:])
        weights = {"packed": "qat_packed.safetensors", "gguf": "model.gguf"}.get(
            info["to"], "model.safetensors"
        )
        print(
            f"qat export: wrote {info['out']} ({weights}: "
            f"{info['weight_file_bytes'] / 2**20:.2f} MiB)"
        )

    return run_cli("export", USAGE, argv, body)


if __name__ == "__main__":
    sys.exit(main())
