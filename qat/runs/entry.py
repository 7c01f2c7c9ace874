"""What the library's entry points (``qat.evaluate``, ``qat.perplexity``, ``qat.generate``,
``qat.export_model``, the profile and lm-eval entries) share, written once: ``load_for_command``
(resolve the source, pick the device, build the model with its task's head; the density report
on demand) and ``write_results``.

An entry first resolves its source (``qat.runs.build.resolve``: cheap, so bad input fails in a
second) and checks its own inputs and output path, then calls ``load_for_command`` with the
resolved ``Source`` (or a model in memory).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from qat import models
from qat.models import base_model
from qat.quant.density import density_report
from qat.runs.build import Source, build_model, resolve
from qat.tasks.language_modeling import check_causal


@dataclasses.dataclass
class Loaded:
    """A built model (eval mode, on ``device``), its tokenizer, where it came from and the
    head it was built with (``causal_lm`` or ``sequence_classification``)."""

    model: Any
    tokenizer: Any
    source: Source
    device: Any  # torch.device
    head: str

    @property
    def args(self) -> Any:
        """The recipe's arguments (``ModelArgs`` for a bare model name)."""
        return self.source.args

    def density(self) -> Any:
        """The model's ``qat.quant.density.DensityReport`` (bits per element, per layer)."""

        return density_report(self.model)


def load_for_command(
    source: Any,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    device: Any = None,
    *,
    head: str | None = None,
    check: Callable[[Any], None] | None = None,
    tokenizer: Any = None,
) -> Loaded:
    """Build ``source`` (any kind ``resolve`` takes) on ``device`` (``--device``: cpu, cuda,
    cuda:N, auto or None; auto honours the recipe's ``use_cpu``) with ``head`` (default: the
    source's, ``Source.head``; a bare model name must say). ``check(config)`` runs before the
    weights load, as in ``build_model``. A model in memory (``trainer.model``) is taken as it
    is, with ``tokenizer``, checked the same way; ``device`` given, it is moved there."""
    src = resolve(source, overrides, tokenizer)
    head = head or src.require_head()
    if src.model is not None:  # built and quantised already: what its config decides
        config = base_model(src.model).config
        if head == "causal_lm":
            check_causal(config, src.args.model_name_or_path)
        if check is not None:
            check(config)
        dev = models.resolve_device(device) if device is not None else _device_of(src.model)
        return Loaded(src.model.to(dev), src.tokenizer, src, dev, head)
    dev = models.resolve_device(device, bool(getattr(src.args, "use_cpu", False)))
    built = build_model(src, head=head, device=dev, check=check)
    return Loaded(built.model, built.tokenizer, src, dev, head)


def _device_of(model: Any) -> Any:
    return next(model.parameters()).device


def write_results(results: dict[str, Any], out: str | Path | None) -> dict[str, Any]:
    """Write an entry's results as JSON to ``out`` (None: nowhere) and record where in
    ``results["output"]``."""
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    results["output"] = None if out is None else str(out)
    return results
