"""Quantised drop-in modules: each owns its fake-quantisers and nothing else."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from qat.quant.ste import FakeQuantizer


def _share_parameters(new: nn.Module, old: nn.Module) -> None:
    """Give ``new`` (built on the meta device) ``old``'s weight and bias objects: no copy, and
    the state-dict keys, tied weights and optimiser references stay as they were."""
    new.weight, new.bias = old.weight, old.bias
    new.train(old.training)


class _QuantizedOperands:
    """The two quantised operands of a layer that owns ``weight_quantizer`` and
    ``activation_quantizer`` (either may be None: that operand stays float)."""

    weight: Tensor
    weight_quantizer: FakeQuantizer | None
    activation_quantizer: FakeQuantizer | None

    def quantized_weight(self, weight: Tensor | None = None) -> Tensor:
        w = self.weight if weight is None else weight
        return w if self.weight_quantizer is None else self.weight_quantizer(w)

    def quantized_input(self, x: Tensor) -> Tensor:
        return x if self.activation_quantizer is None else self.activation_quantizer(x)


class QuantLinear(_QuantizedOperands, nn.Linear):
    """``nn.Linear`` whose input (activation) and weight are fake-quantised on every forward.

    The weight is blocked along ``in_features`` (the reduction dim), as is the input's last dim.
    ``from_linear`` shares the parameters of the module it replaces, so state-dict keys are
    unchanged.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
                 weight_quantizer: FakeQuantizer | None = None,
                 activation_quantizer: FakeQuantizer | None = None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.weight_quantizer = weight_quantizer
        self.activation_quantizer = activation_quantizer

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_quantizer: FakeQuantizer | None,
                    activation_quantizer: FakeQuantizer | None) -> QuantLinear:
        """A QuantLinear that uses ``linear``'s own weight and bias."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device="meta", weight_quantizer=weight_quantizer,
                  activation_quantizer=activation_quantizer)
        _share_parameters(new, linear)
        return new

    def forward_with_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        """Forward with an effective weight (LoRA's ``W + BA``) in place of ``self.weight``."""
        return F.linear(self.quantized_input(x), self.quantized_weight(weight), self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantConv1D(_QuantizedOperands, Conv1D):
    """GPT-2's ``Conv1D`` (weight ``[in, out]``), quantised along ``in`` (dim 0)."""

    def __init__(self, nf: int, nx: int, *, weight_quantizer: FakeQuantizer | None = None,
                 activation_quantizer: FakeQuantizer | None = None) -> None:
        super().__init__(nf, nx)
        self.weight_quantizer = weight_quantizer
        self.activation_quantizer = activation_quantizer

    @classmethod
    def from_conv1d(cls, conv: Conv1D, weight_quantizer: FakeQuantizer | None,
                    activation_quantizer: FakeQuantizer | None) -> QuantConv1D:
        """A QuantConv1D that uses ``conv``'s own weight and bias."""
        with torch.device("meta"):  # Conv1D takes no device; skip allocating a throwaway init
            new = cls(conv.nf, conv.weight.shape[0], weight_quantizer=weight_quantizer,
                      activation_quantizer=activation_quantizer)
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
    """

    def __init__(self, fmt, v_block_axis: str = "head_dim", backend: str = "auto") -> None:
        super().__init__()
        self.q = FakeQuantizer(fmt, dim=-1, backend=backend)
        self.k = FakeQuantizer(fmt, dim=-1, backend=backend)
        self.p = FakeQuantizer(fmt, dim=-1, backend=backend)
        self.v = FakeQuantizer(fmt, dim=-1 if v_block_axis == "head_dim" else -2, backend=backend)
