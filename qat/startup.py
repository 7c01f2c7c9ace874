"""What ``import qat`` does besides naming the public API: register the ``"qat"`` quant method
and the packed model class with transformers (now, or the moment transformers' registries are
imported), and filter torchao's import noise out of the logs. Nothing heavy is imported here.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
from typing import Any

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


def register_quant_method() -> None:
    """Register qat with transformers now where its registries are loaded, else when they are."""
    if any(isinstance(f, _RegisterWhenImported) for f in sys.meta_path):
        return
    if _HOOKED[0] in sys.modules:
        _register()
    if _AUTO in sys.modules:
        _register(_AUTO)
    waiting = {n for n in _HOOKED if n not in sys.modules}
    if waiting:
        sys.meta_path.insert(0, _RegisterWhenImported(waiting))


def quiet_torchao_import_noise() -> None:
    """Drop torch's "<enum 'KernelPreference'> is an Enum subclass ..." warnings about torchao,
    and torchao's own "Failed to load .../torchao/_C....so" warnings.

    qat never imports torchao, but transformers does whenever it is installed
    (``transformers.quantizers.quantizer_torchao``, imported with ``modeling_utils``), and
    torchao's import registers its enums with torch's pytree, which torch now warns about:
    noise on every qat command that loads a model. Only those warnings, and only about torchao,
    are filtered.
    """

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
