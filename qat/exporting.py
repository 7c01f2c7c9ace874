"""``export_model``: a recipe, run folder, model name or model in memory, written for one target.

The order is the same for every target (``qat.export.targets``): the options and ``out`` are
checked, then the target's own ``check_target(quant, config, head)`` (the quant config and the
model's config, before any weights load), then the source is resolved and loaded as every entry
point loads it (``qat.runs``) and ``write_export`` writes it atomically, with a
``qat_export.json`` that lets a later ``overwrite`` recognise it. This module sits above
``qat.export`` so that the writers never reach into run folders and recipes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qat import models
from qat.errors import ExportError
from qat.export import gguf
from qat.export.targets import TARGETS, Exported, check_options, holds_export, write_export
from qat.files import check_destination, check_not_source
from qat.models import base_model
from qat.runs.build import Source, find_recipe_yaml, resolve
from qat.runs.entry import Loaded, load_for_command
from qat.runs.recipe.text import load_recipe_dict
from qat.tasks.registry import get_task


def export_model(
    source: Any,
    out: str | os.PathLike,
    tokenizer: Any = None,
    *,
    to: str = "packed",
    overrides: Sequence[str] | Mapping[str, Any] = (),
    overwrite: bool = False,
    device: Any = None,
    calibration_samples: int | None = None,
    gguf_embeddings: str | None = None,
) -> Exported:
    """Write ``source`` for the engine ``to`` names (``packed``, ``compressed-tensors`` or
    ``gguf``) into the folder ``out``, as ``qat export SOURCE --to TO --out OUT`` does.

    >>> import os, tempfile, transformers, qat
    >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                                   num_hidden_layers=1, num_attention_heads=2)
    >>> model = qat.quantize_model(transformers.LlamaForCausalLM(config),
    ...                            {"weight": {"format": "ggml_q4_0"}})
    >>> done = qat.export_model(model, os.path.join(tempfile.mkdtemp(), "gguf"), to="gguf")
    >>> sorted(os.listdir(done.out)), done.density.quantized_bits_per_element
    (['model.gguf', 'qat_export.json'], 4.5)

    ``source``: a recipe file or ``Recipe``, a run / checkpoint folder, a Hub id / model folder
    / ``pkg://`` path, or a model in memory (quantised by ``quantize_model``; ``tokenizer`` is
    saved with it). ``overrides``: recipe keys, as ``build_model`` takes them. ``out`` must be
    new or empty, or ``overwrite`` and hold an earlier qat export; it may never be, lie inside
    or contain the source. ``calibration_samples`` (compressed-tensors, nvfp4 activations:
    training chunks of the recipe that set the input global scale; default 32) and
    ``gguf_embeddings`` (gguf: ``f16``, ``q8_0`` or ``f32`` for ``token_embd`` and an
    unquantised ``output``; default f16) belong to their target alone.
    """
    options = check_options(to, calibration_samples, gguf_embeddings)
    src = resolve(source, overrides, tokenizer)
    check_not_source(Path(out), *_protected(src))  # before the slow part
    out = check_destination(out, overwrite, holds_export)
    head = src.require_head()
    TARGETS[to].check_target(src.args.quant, _config(src, to), head)
    loaded = load_for_command(src, device=device, head=head)
    args = loaded.args
    return write_export(
        loaded.model,
        loaded.tokenizer,
        out,
        to,
        quant=args.quant,
        density=loaded.density(),
        overwrite=overwrite,
        options=options,
        calibration=lambda n: _calibration_batches(loaded, n),
        source_gguf=source_gguf(loaded.source) if to == "gguf" else None,
        name=Path(args.gguf_file or args.model_name_or_path).stem,
    )


def _config(src: Source, to: str) -> Any:
    """The model's config without its weights; for a GGUF source the gguf target reads the
    file's architecture key (its config is known only once loaded)."""
    if src.model is not None:
        return base_model(src.model).config
    args = src.args
    config = models.load_config(args.model_name_or_path, args.gguf_file)
    if config is None and to == "gguf":
        return gguf.source_config(
            Path(models.resolve_model_path(args.model_name_or_path)) / args.gguf_file
        )
    return config


def _protected(src: Source) -> tuple[dict[str, Path], dict[str, Path]]:
    """(sources ``out`` may not touch at all, paths ``out`` may not contain)."""
    args = src.args
    sources: dict[str, Path] = {}
    keep: dict[str, Path] = {"current directory": Path(os.getcwd())}
    if src.checkpoint is not None:
        sources["source checkpoint"] = src.checkpoint
        yaml_path = find_recipe_yaml(src.checkpoint)
        if yaml_path is not None:
            keep["run folder"] = yaml_path.parent
    elif src.recipe is not None and src.recipe.source and Path(src.recipe.source).is_file():
        keep["recipe"] = Path(src.recipe.source)
    for what, value in (
        ("model", args.model_name_or_path),
        ("tokenizer", args.tokenizer_name_or_path),
    ):
        if value and Path(value).expanduser().exists():
            keep[what] = Path(value)
    if getattr(args, "data_dir", None):
        keep["data folder"] = Path(args.data_dir)
    return sources, keep


def _calibration_batches(loaded: Loaded, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` training chunks of the decoder recipe, as batches of 8 on the model's device."""

    if loaded.source.recipe is None:
        raise ExportError(
            "--to compressed-tensors: nvfp4 activations are calibrated on a recipe's "
            "training text; export from a recipe or run folder"
        )
    args = loaded.args
    train, _, collate = get_task(args.task_name).data(args, loaded.tokenizer)
    rows = [train[i] for i in range(min(n, len(train)))]
    return [
        {k: v.to(loaded.device) for k, v in collate(rows[i : i + 8]).items() if k != "labels"}
        for i in range(0, len(rows), 8)
    ]


def source_gguf(src: Source) -> Path | None:
    """The GGUF file the model came from, whose tokenizer keys the export copies: the recipe's
    ``gguf_file``, or for a trained run (whose folder replaces the model path) the one its
    ``recipe.yaml`` started from, so llama.cpp tokenises as in training (a tokenizer rebuilt
    from the Hugging Face files lacks llama.cpp's pre-tokenizer name)."""

    args = src.args
    if args.gguf_file:
        return Path(models.resolve_model_path(args.model_name_or_path)) / args.gguf_file
    yaml_path = None if src.checkpoint is None else find_recipe_yaml(Path(src.checkpoint))
    data = load_recipe_dict(yaml_path) if yaml_path else {}
    if not (data.get("gguf_file") and data.get("model_name_or_path")):
        return None
    try:
        path = Path(models.resolve_model_path(str(data["model_name_or_path"]))) / data["gguf_file"]
    except models.ModelLoadError:  # the base model moved: fall back to the Hugging Face tokenizer
        return None
    return path if path.is_file() else None
