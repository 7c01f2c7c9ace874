"""qat: block-quantisation-aware fine-tuning for Hugging Face transformers.

Importing ``qat`` is cheap: the public names below load on first use, and torch / transformers
are not imported until something needs them, so ``qat --help`` answers at once. ``import qat``
still registers the ``"qat"`` quant method with transformers (packed exports load through
``from_pretrained``): at once if transformers' quantizer registry is already imported, otherwise
the moment it is.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

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
    "QATConfig": ("qat.runs.recipe", "QATConfig"),
    "QATSFTConfig": ("qat.integrations.trl", "QATSFTConfig"),
    "LoraArguments": ("qat.runs.arguments", "LoraArguments"),
    "load_recipe": ("qat.runs.recipe", "load_recipe"),
    "build_model": ("qat.runs.build", "build_model"),
    "train": ("qat.training.run", "train"),
    "evaluate": ("qat.evaluation.evaluate", "evaluate"),
    "perplexity": ("qat.evaluation.perplexity", "perplexity"),
    "generate": ("qat.evaluation.generate", "generate"),
    "export_model": ("qat.export.run", "export_model"),
    "attach_qdec": ("qat.quant.qdec", "attach_qdec"),
    "QatError": ("qat.errors", "QatError"),
}
__all__ = [
    "LoraArguments",
    "QATConfig",
    "QATSFTConfig",
    "QATSFTTrainer",
    "QATTrainer",
    "QatError",
    "QuantConfig",
    "QuantConfigError",
    "attach_qdec",
    "build_model",
    "evaluate",
    "export_model",
    "generate",
    "load_recipe",
    "make_format",
    "perplexity",
    "quantization_summary",
    "quantize_model",
    "train",
]

if TYPE_CHECKING:
    from qat.errors import QatError
    from qat.evaluation.evaluate import evaluate
    from qat.evaluation.generate import generate
    from qat.evaluation.perplexity import perplexity
    from qat.export.run import export_model
    from qat.formats import make_format
    from qat.integrations.trl import QATSFTConfig, QATSFTTrainer
    from qat.quant.config import QuantConfig, QuantConfigError
    from qat.quant.qdec import attach_qdec
    from qat.quant.quantize import quantization_summary, quantize_model
    from qat.runs.arguments import LoraArguments
    from qat.runs.build import build_model
    from qat.runs.recipe import QATConfig, load_recipe
    from qat.training.run import train
    from qat.training.trainer import QATTrainer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'qat' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# Registration hooks: the quant method needs transformers' quantizer registry; the packed model
# class (qat_packed exports) needs PreTrainedModel, complete only once modeling_utils has run.
# The Auto classes (``from transformers import AutoModel...``) import neither: they read an
# export's config.json first, and without qat_packed registered by then ask for
# trust_remote_code, so their package is hooked too and brings modeling_utils in.
_AUTO = "transformers.models.auto"
_HOOKED = ("transformers.quantizers", "transformers.modeling_utils", _AUTO)


def _initialising(name: str) -> bool:
    module = sys.modules.get(name)
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _register(name: str = "") -> None:
    if any(_initialising(n) for n in _HOOKED[:2] if n != name):
        # e.g. the Auto package finishing inside transformers.quantizers' own import: that
        # module's hook registers once it has run (importing it now would be circular)
        return
    if name == _AUTO:  # about to load a model: PreTrainedModel is needed now
        importlib.import_module("transformers.modeling_utils")
    importlib.import_module("qat.export.hf_quantizer").register()


class _RegisterWhenImported(importlib.abc.MetaPathFinder):
    """Registers qat with transformers right after each hooked module has executed, whoever
    imports it; loading is left to the normal finders."""

    def __init__(self, names: set[str]) -> None:
        self.pending = names
        self.busy = False

    def find_spec(self, fullname: str, path: Any, target: Any = None):
        if self.busy or fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        if not self.pending:
            sys.meta_path.remove(self)
        self.busy = True  # the lookup below must not find us again
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.busy = False
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            _register(fullname)

        spec.loader.exec_module = exec_then_register
        return spec


def _register_quant_method() -> None:
    if any(isinstance(f, _RegisterWhenImported) for f in sys.meta_path):
        return
    if _HOOKED[0] in sys.modules:
        _register()
    if _AUTO in sys.modules:
        _register(_AUTO)
    waiting = {n for n in _HOOKED if n not in sys.modules}
    if waiting:
        sys.meta_path.insert(0, _RegisterWhenImported(waiting))


_register_quant_method()


def _quiet_torchao_import_noise() -> None:
    """Drop torch's "<enum 'KernelPreference'> is an Enum subclass ..." warnings about torchao,
    and torchao's own "Failed to load .../torchao/_C....so" warnings.

    qat never imports torchao, but transformers does whenever it is installed
    (``transformers.quantizers.quantizer_torchao``, imported with ``modeling_utils``), and
    torchao's import registers its enums with torch's pytree, which torch now warns about:
    noise on every qat command that loads a model. Only those warnings, and only about torchao,
    are filtered; they are logging filters, so nothing is imported here.
    """
    import logging

    def keep(record: logging.LogRecord) -> bool:
        cls = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not (
            str(record.msg).startswith("%s is an Enum subclass")
            and getattr(cls, "__module__", "").startswith("torchao")
        )

    logging.getLogger("torch.utils._pytree").addFilter(keep)

    def keep_torchao(record: logging.LogRecord) -> bool:
        # A torchao wheel built for CUDA (or another Python) fails to load its _C*.so
        # extensions on import and says so once per file; qat uses none of them.
        msg = str(record.msg)
        return not (msg.startswith("Failed to load") and "torchao" in msg and "_C" in msg)

    logging.getLogger("torchao").addFilter(keep_torchao)


_quiet_torchao_import_noise()
