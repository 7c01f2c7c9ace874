"""Quantised drop-in modules: each owns its fake-quantisers and nothing else."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from qat.quant.ste import FakeQuantizer


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose input and weight are fake-quantised on every forward.

    The weight is blocked along ``in_features`` (the reduction dim), as is the input's last dim.
    Parameters are shared with the module it replaces, so state-dict keys are unchanged.
    """

    weight_quantizer: FakeQuantizer | None
    input_quantizer: FakeQuantizer | None

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_q: FakeQuantizer | None,
                    input_q: FakeQuantizer | None) -> QuantLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.weight_quantizer, new.input_quantizer = weight_q, input_q
        return new

    def quantized_weight(self, weight: Tensor | None = None) -> Tensor:
        w = self.weight if weight is None else weight
        return w if self.weight_quantizer is None else self.weight_quantizer(w)

    def quantized_input(self, x: Tensor) -> Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def forward_with_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        """Forward with an effective weight (LoRA's ``W + BA``) in place of ``self.weight``."""
        return F.linear(self.quantized_input(x), self.quantized_weight(weight), self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantConv1D(Conv1D):
    """GPT-2's ``Conv1D`` (weight ``[in, out]``), quantised along ``in`` (dim 0)."""

    weight_quantizer: FakeQuantizer | None
    input_quantizer: FakeQuantizer | None

    @classmethod
    def from_conv1d(cls, conv: Conv1D, weight_q: FakeQuantizer | None,
                    input_q: FakeQuantizer | None) -> QuantConv1D:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.nf, new.nx = conv.nf, getattr(conv, "nx", conv.weight.shape[0])
        new.weight, new.bias = conv.weight, conv.bias
        new.weight_quantizer, new.input_quantizer = weight_q, input_q
        return new

    def forward_with_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        qx = x if self.input_quantizer is None else self.input_quantizer(x)
        qw = weight if self.weight_quantizer is None else self.weight_quantizer(weight)
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
