"""Quantised drop-in modules: each owns its fake-quantisers and nothing else."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from qat.quant.rotation import Rotation
from qat.quant.ste import FakeQuantizer


def _share_parameters(new: nn.Module, old: nn.Module) -> None:
    """Give ``new`` (built on the meta device) ``old``'s weight and bias objects: no copy, and
    the state-dict keys, tied weights and optimiser references stay as they were."""
    new.weight, new.bias = old.weight, old.bias
    new.train(old.training)


class _QuantizedOperands:
    """The two quantised operands of a layer that owns ``weight_quantizer`` and
    ``activation_quantizer`` (either may be None: that operand stays float), and optionally a
    ``rotation`` of both along ``in_features`` (the quantisers apply it before quantising; an
    operand without a quantiser is rotated here, so the product stays that of the float layer).
    """

    weight: Tensor
    weight_quantizer: FakeQuantizer | None
    activation_quantizer: FakeQuantizer | None
    rotation: Rotation | None  # set in __init__: a class default would shadow the submodule
    weight_dim: int = -1
    # learned transforms (qat.quant.transforms.learned): effective weight and bias before quantising
    weight_transform: Any = None

    def set_rotation(self, rotation: Rotation | None) -> None:
        """Rotate both operands by ``rotation``: registered here, the one owner; each quantiser
        gets it as its pre-transform (a reference, ``qat.quant.ste.PreTransform``)."""
        self.rotation = rotation
        for q in (self.weight_quantizer, self.activation_quantizer):
            if q is not None:
                q.rotation = rotation

    def quantized_weight(self, weight: Tensor | None = None) -> Tensor:
        w = self.weight if weight is None else weight
        if self.weight_transform is not None:
            w = self.weight_transform.weight(w)
        if self.weight_quantizer is not None:
            return self.weight_quantizer(w)
        return w if self.rotation is None else self.rotation(w, self.weight_dim)

    def effective_bias(self) -> Tensor | None:
        b = self.bias
        return b if self.weight_transform is None else self.weight_transform.bias(b)

    def quantized_input(self, x: Tensor) -> Tensor:
        if self.activation_quantizer is not None:
            return self.activation_quantizer(x)
        return x if self.rotation is None else self.rotation(x, -1)


class QuantLinear(_QuantizedOperands, nn.Linear):
    """``nn.Linear`` whose input (activation) and weight are fake-quantised on every forward.

    The weight is blocked along ``in_features`` (the reduction dim), as is the input's last dim.
    ``from_linear`` shares the parameters of the module it replaces, so state-dict keys are
    unchanged.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        weight_quantizer: FakeQuantizer | None = None,
        activation_quantizer: FakeQuantizer | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.weight_quantizer = weight_quantizer
        self.activation_quantizer = activation_quantizer
        self.rotation = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        weight_quantizer: FakeQuantizer | None,
        activation_quantizer: FakeQuantizer | None,
    ) -> QuantLinear:
        """A QuantLinear that uses ``linear``'s own weight and bias."""
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            weight_quantizer=weight_quantizer,
            activation_quantizer=activation_quantizer,
        )
        _share_parameters(new, linear)
        return new

    def forward_with_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        """Forward with an effective weight (LoRA's ``W + BA``) in place of ``self.weight``."""
        return F.linear(
            self.quantized_input(x), self.quantized_weight(weight), self.effective_bias()
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.effective_bias())


class QuantConv1D(_QuantizedOperands, Conv1D):
    """GPT-2's ``Conv1D`` (weight ``[in, out]``), quantised along ``in`` (dim 0)."""

    weight_dim = 0

    def __init__(
        self,
        nf: int,
        nx: int,
        *,
        weight_quantizer: FakeQuantizer | None = None,
        activation_quantizer: FakeQuantizer | None = None,
    ) -> None:
        super().__init__(nf, nx)
        self.weight_quantizer = weight_quantizer
        self.activation_quantizer = activation_quantizer
        self.rotation = None

    @classmethod
    def from_conv1d(
        cls,
        conv: Conv1D,
        weight_quantizer: FakeQuantizer | None,
        activation_quantizer: FakeQuantizer | None,
    ) -> QuantConv1D:
        """A QuantConv1D that uses ``conv``'s own weight and bias."""
        with torch.device("meta"):  # Conv1D takes no device; skip allocating a throwaway init
            new = cls(
                conv.nf,
                conv.weight.shape[0],
                weight_quantizer=weight_quantizer,
                activation_quantizer=activation_quantizer,
            )
        _share_parameters(new, conv)
        return new

    def forward_with_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        qx, qw = self.quantized_input(x), self.quantized_weight(weight)
        out = qx.reshape(-1, qx.size(-1)) @ qw + self.bias
        return out.reshape(*x.shape[:-1], self.nf)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_weight(x, self.weight)


class MatmulQuantizer(nn.Module):
    """Fake-quantisers for the operands of ``Q @ K^T`` and ``P @ V`` of one attention module.

    Q and K are blocked along head_dim, P along the key dim (one query row), V along head_dim
    or, if asked, along the sequence (the reduction dim of ``P @ V``).

    With a ``rotation``, Q and K are rotated along head_dim before they are quantised (their
    product is unchanged in float); P and V are not.
    """

    def __init__(
        self,
        fmt,
        v_block_axis: str = "head_dim",
        backend: str = "auto",
        rotation: Rotation | None = None,
    ) -> None:
        super().__init__()
        self.rotation = rotation
        self.q = FakeQuantizer(fmt, dim=-1, backend=backend, rotation=rotation)
        self.k = FakeQuantizer(fmt, dim=-1, backend=backend, rotation=rotation)
        self.p = FakeQuantizer(fmt, dim=-1, backend=backend)
        self.v = FakeQuantizer(fmt, dim=-1 if v_block_axis == "head_dim" else -2, backend=backend)
