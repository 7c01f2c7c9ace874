"""The export targets and the one write: each target's module, weight file and options, the
``qat_export.json`` every export carries, and the atomic write of a loaded model's files.

Targets: ``packed`` (``qat.export.packed``: the formats' own codes, loaded back by
``from_pretrained``), ``compressed-tensors`` (vLLM) and ``gguf`` (llama.cpp). Each target module
owns its ``check_target(quant, config, head)``; its writer does not repeat it. Resolving and
loading what to export (a recipe, a run, a model name) is ``qat.exporting``'s, one layer up.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qat.errors import UsageError, check_one_of
from qat.export import compressed_tensors, gguf, packed
from qat.export import modeling_qat_packed as mqp
from qat.files import write_atomically

TARGETS = {"packed": packed, "compressed-tensors": compressed_tensors, "gguf": gguf}
EXPORT_INFO = "qat_export.json"  # every target's: the target, its weight file, quant, density
WEIGHTS = {
    "packed": mqp.WEIGHTS_NAME,
    "compressed-tensors": compressed_tensors.WEIGHTS_NAME,
    "gguf": gguf.GGUF_NAME,
}
CALIBRATION_SAMPLES = 32  # training chunks whose inputs set nvfp4's input global scale


@dataclasses.dataclass
class Exported:
    """What ``export_model`` wrote: the folder, the target, its weight file and the model's
    density report (``qat.quant.density.DensityReport``)."""

    out: Path
    to: str
    weights: Path
    density: Any = dataclasses.field(repr=False)  # one entry per layer: too long to print

    @property
    def weight_file_bytes(self) -> int:
        return self.weights.stat().st_size


def holds_export(folder: Path) -> bool:
    """``folder`` holds a qat export of any target (what ``overwrite`` may replace): its
    ``qat_export.json`` names a target and that target's weight file is there; or, written
    without one (before it existed, or by ``write_packed`` alone), a packed export's
    config.json and weights. Anything else (a run, notes, another tool's files) is kept."""
    info = _read_json(folder / EXPORT_INFO)
    if isinstance(info, dict) and info.get("to") in TARGETS:
        weights = WEIGHTS[info["to"]]
        return info.get("weights") == weights and (folder / weights).is_file()
    config = _read_json(folder / "config.json")
    return (
        isinstance(config, dict)
        and config.get("model_type") == mqp.MODEL_TYPE
        and (folder / mqp.WEIGHTS_NAME).is_file()
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


def check_options(to: str, samples: int | None, embeddings: str | None) -> dict[str, Any]:
    """The target's own options, checked before anything loads; an option of another target
    is refused rather than silently ignored, and no value stands for its default."""
    check_one_of("--to", to, tuple(TARGETS), UsageError)
    if samples is not None and to != "compressed-tensors":
        raise UsageError(f"--calibration_samples applies to --to compressed-tensors, not {to}")
    if embeddings is not None and to != "gguf":
        raise UsageError(f"--gguf_embeddings applies to --to gguf, not {to}")
    if samples is not None and (isinstance(samples, bool) or samples < 1):
        raise UsageError(f"--calibration_samples must be >= 1, got {samples!r}")
    embeddings = "f16" if embeddings is None else embeddings
    check_one_of("--gguf_embeddings", embeddings, gguf.EMBEDDING_TYPES, UsageError)
    return {
        "samples": CALIBRATION_SAMPLES if samples is None else samples,
        "embeddings": embeddings,
    }


def write_export(
    model: Any,
    tokenizer: Any,
    out: Path,
    to: str,
    *,
    quant: Any,
    density: Any,
    overwrite: bool,
    options: dict[str, Any],
    calibration: Callable[[int], list[dict[str, Any]]],
    source_gguf: Path | None,
    name: str,
) -> Exported:
    """The target's files and ``qat_export.json``, into a temporary folder renamed to ``out``
    once complete (``overwrite``: replacing only an export). ``calibration(n)`` gives ``n``
    training batches, asked for only when the target calibrates (nvfp4 input scales)."""
    amax = None
    if to == "compressed-tensors" and any(
        compressed_tensors.needs_calibration(f.activation) for f in quant.all_formats()
    ):
        amax = compressed_tensors.record_input_amax(model, calibration(options["samples"]))

    def write(tmp: Path) -> None:
        if to == "gguf":
            gguf.write_gguf(
                model,
                tmp,
                tokenizer,
                source_gguf=source_gguf,
                embeddings=options["embeddings"],
                name=name,
            )
        elif to == "compressed-tensors":
            compressed_tensors.write_compressed_tensors(model, tmp, tokenizer, input_amax=amax)
        else:
            packed.write_packed(model, tmp, tokenizer)
        info = {
            "to": to,
            "weights": WEIGHTS[to],
            "weight_file_bytes": (tmp / WEIGHTS[to]).stat().st_size,
            "quant": None if quant is None else quant.to_dict(),
            "density": density.to_dict(),
        }
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2))

    write_atomically(out, write, overwrite, holds_export)
    return Exported(out, to, out / WEIGHTS[to], density)
