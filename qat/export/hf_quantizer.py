"""The ``qat`` quant method for transformers' quantizer hooks (``HfQuantizer``).

Kept to load version-1 exports; current exports (``model_type: qat_packed``) load through
``qat.export.modeling_qat_packed``, registered here too. A version-1
directory has ``quantization_config: {quant_method: qat, quant, packed}`` in its
``config.json``. With this module imported (``import qat`` does it),
``AutoModelFor...from_pretrained(dir)`` goes through ``QatHfQuantizer``: before the weights
load, every packed linear becomes a ``PackedLinear`` placeholder whose buffers match the
packed tensors' names, shapes and dtypes; after loading, the codes are unpacked to float
weights, ordinary linears are put back and ``quantize_model`` re-inserts the weight,
activation and attention-matmul quantisers.

The unpacked weights already lie on the format's grid, so the packed layers' weight quantisers
are switched off (``enabled = False``): the forward is then bit-identical to the fake-quantised
model that was exported. (Re-quantising is not always a no-op: a BFP block whose max rounds to
``2^(M-1)`` gets a smaller exponent the second time.) Turn them back on for further QAT.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from qat.models import ModelLoadError

QUANT_METHOD = "qat"


class QatQuantizationConfig(QuantizationConfigMixin):
    """``config.json``'s ``quantization_config`` for a packed qat export."""

    def __init__(
        self,
        quant: dict[str, Any] | None = None,
        packed: dict[str, dict[str, Any]] | None = None,
        version: int = 1,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.quant = quant
        self.packed = packed or {}
        self.version = version

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "version": self.version,
            "quant": self.quant,
            "packed": self.packed,
        }


class PackedLinear(nn.Module):
    """Load-time placeholder: the packed tensors of one linear's weight, plus its bias."""

    def __init__(self, meta: dict[str, Any], bias: bool, device: Any, dtype: torch.dtype):
        super().__init__()
        self.meta = meta
        for key, t in meta["tensors"].items():
            self.register_buffer(
                f"weight_{key}",
                torch.empty(t["shape"], dtype=getattr(torch, t["dtype"]), device=device),
            )
        out_dim = meta["shape"][1] if meta.get("kind") == "conv1d" else meta["shape"][0]
        self.bias = nn.Parameter(torch.empty(out_dim, dtype=dtype, device=device)) if bias else None

    def packed(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, f"weight_{k}") for k in self.meta["tensors"]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("PackedLinear is a loading placeholder; the qat quantizer replaces it")


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def unpacked_module(packed: PackedLinear) -> nn.Module:
    """An ``nn.Linear`` (or GPT-2 ``Conv1D``) holding the unpacked, fake-quantised weight."""
    from transformers.pytorch_utils import Conv1D

    from qat.export.packed import unpack_weight

    meta = packed.meta
    weight = unpack_weight(meta, packed.packed())
    if meta.get("kind") == "conv1d":
        mod: nn.Module = Conv1D(weight.shape[1], weight.shape[0])
    else:
        mod = nn.Linear(weight.shape[1], weight.shape[0], bias=packed.bias is not None)
    mod.weight = nn.Parameter(weight, requires_grad=False)
    if packed.bias is not None:
        mod.bias = nn.Parameter(packed.bias.detach(), requires_grad=False)
    return mod


class QatHfQuantizer(HfQuantizer):
    """Loads ``qat export`` directories; quantising a float model at load time is not offered
    (use ``qat.quantize_model``)."""

    requires_calibration = True
    quantization_config: QatQuantizationConfig

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        for name, meta in self.quantization_config.packed.items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise ModelLoadError(
                    f"quantization_config.packed names module {name!r}, "
                    f"which {type(model).__name__} does not have"
                ) from None
            placeholder = PackedLinear(
                meta, getattr(old, "bias", None) is not None, old.weight.device, old.weight.dtype
            )
            _set_module(model, name, placeholder)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from qat.quant.quantize import quantize_model

        packed_names = list(self.quantization_config.packed)
        for name in packed_names:
            _set_module(model, name, unpacked_module(model.get_submodule(name)))
        quantize_model(model, self.quantization_config.quant)
        for name in packed_names:
            wq = getattr(model.get_submodule(name), "weight_quantizer", None)
            if wq is not None:
                wq.enabled = False  # the weights are already quantised (see module docstring)
                wq.rotation = None  # and rotated, where the quant config rotates
        model.eval()
        return model

    def is_serializable(self) -> bool:
        return False  # write packed models with `qat export`, not save_pretrained

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the ``qat`` quant method (version-1 exports) and the ``qat_packed`` model type
    (current exports) with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(QatQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(QatHfQuantizer)
    # The packed model class derives from PreTrainedModel: only once modeling_utils is complete,
    # and not while qat.export.modeling_qat_packed is itself half-imported (it registers at its
    # end).
    utils = sys.modules.get("transformers.modeling_utils")
    packed = sys.modules.get("qat.export.modeling_qat_packed")
    if hasattr(utils, "PreTrainedModel") and (packed is None or hasattr(packed, "register")):
        from qat.export.modeling_qat_packed import register as register_packed

        register_packed()


register()
