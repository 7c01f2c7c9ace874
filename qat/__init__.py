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
__all__ = ["QuantConfig", "QuantConfigError", "make_format", "quantization_summary",
           "quantize_model"]

_LAZY = {"QuantConfig": "qat.quant_config", "QuantConfigError": "qat.quant_config",
         "make_format": "qat.formats", "quantization_summary": "qat.quantize",
         "quantize_model": "qat.quantize"}

if TYPE_CHECKING:
    from qat.formats import make_format
    from qat.quant_config import QuantConfig, QuantConfigError
    from qat.quantize import quantization_summary, quantize_model


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'qat' has no attribute {name!r}")


# The package holding transformers' quant-method registry (quantizers/auto.py); hooked as a
# whole because registering while only auto.py has run meets a half-initialised package.
_REGISTRY = "transformers.quantizers"


class _RegisterWhenImported(importlib.abc.MetaPathFinder):
    """Runs ``qat.hf_quantizer`` (the registration) right after transformers' quantizers
    package has executed, whoever imports it; loading is left to the normal finders."""

    def find_spec(self, fullname: str, path: Any, target: Any = None):
        if fullname != _REGISTRY:
            return None
        sys.meta_path.remove(self)  # once; also keeps the lookup below from finding us
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            importlib.import_module("qat.hf_quantizer")

        spec.loader.exec_module = exec_then_register
        return spec


def _register_quant_method() -> None:
    if _REGISTRY in sys.modules:
        importlib.import_module("qat.hf_quantizer")
    elif not any(isinstance(f, _RegisterWhenImported) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWhenImported())


_register_quant_method()
