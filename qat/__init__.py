"""qat: block-quantisation-aware fine-tuning for Hugging Face transformers.

Importing ``qat`` is cheap: the public names below load on first use, and torch / transformers
are not imported until something needs them, so ``qat --help`` answers at once. ``import qat``
still registers the ``"qat"`` quant method with transformers (packed exports load through
``from_pretrained``): at once if transformers' quantizer registry is already imported, otherwise
the moment it is.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qat.startup import quiet_torchao_import_noise, register_quant_method

__version__ = "0.1.0"
# public name -> (module, attribute there)
_LAZY = {
    "QuantConfig": ("qat.quant.config", "QuantConfig"),
    "QuantConfigError": ("qat.quant.config", "QuantConfigError"),
    "make_format": ("qat.formats", "make_format"),
    "quantization_summary": ("qat.quant.quantize", "quantization_summary"),
    "quantize_model": ("qat.quant.quantize", "quantize_model"),
    "QATTrainer": ("qat.training.trainer", "QATTrainer"),
    "QATSFTTrainer": ("qat.integrations.trl", "QATSFTTrainer"),
    "QATConfig": ("qat.runs.recipe.config", "QATConfig"),
    "QATSFTConfig": ("qat.integrations.trl", "QATSFTConfig"),
    "LoraArguments": ("qat.runs.recipe.arguments", "LoraArguments"),
    "load_recipe": ("qat.runs.recipe.load", "load_recipe"),
    "build_model": ("qat.runs.build", "build_model"),
    "train": ("qat.training.run", "train"),
    "evaluate": ("qat.evaluation.evaluate", "evaluate"),
    "perplexity": ("qat.evaluation.perplexity", "perplexity"),
    "generate": ("qat.evaluation.generate", "generate"),
    "export_model": ("qat.exporting", "export_model"),
    "attach_qdec": ("qat.quant.qdec.attach", "attach_qdec"),
    "QatError": ("qat.errors", "QatError"),
}
__all__ = sorted(_LAZY)

if TYPE_CHECKING:
    from qat.errors import QatError as QatError
    from qat.evaluation.evaluate import evaluate as evaluate
    from qat.evaluation.generate import generate as generate
    from qat.evaluation.perplexity import perplexity as perplexity
    from qat.exporting import export_model as export_model
    from qat.formats import make_format as make_format
    from qat.integrations.trl import QATSFTConfig as QATSFTConfig
    from qat.integrations.trl import QATSFTTrainer as QATSFTTrainer
    from qat.quant.config import QuantConfig as QuantConfig
    from qat.quant.config import QuantConfigError as QuantConfigError
    from qat.quant.qdec.attach import attach_qdec as attach_qdec
    from qat.quant.quantize import quantization_summary as quantization_summary
    from qat.quant.quantize import quantize_model as quantize_model
    from qat.runs.build import build_model as build_model
    from qat.runs.recipe.arguments import LoraArguments as LoraArguments
    from qat.runs.recipe.config import QATConfig as QATConfig
    from qat.runs.recipe.load import load_recipe as load_recipe
    from qat.training.run import train as train
    from qat.training.trainer import QATTrainer as QATTrainer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'qat' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


register_quant_method()
quiet_torchao_import_noise()
