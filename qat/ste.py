"""The straight-through estimator: quantise in the forward pass, identity in the backward."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qat.formats import Format


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, fmt: Format, dim: int) -> Tensor:  # noqa: D102
        return fmt.quantize(x, dim=dim)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        return grad, None, None


def ste_quantize(x: Tensor, fmt: Format, dim: int = -1) -> Tensor:
    """Fake-quantise ``x`` with ``fmt``; gradients pass through unchanged."""
    return _STE.apply(x, fmt, dim)


class FakeQuantizer(nn.Module):
    """A format bound to a blocking dim, as a module so it shows up in ``print(model)``.

    Holds no parameters: every call re-quantises what it is given, so training always sees
    the current weights.
    """

    def __init__(self, fmt: Format, dim: int = -1) -> None:
        super().__init__()
        self.fmt = fmt
        self.dim = dim
        self.enabled = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        return ste_quantize(x, self.fmt, self.dim)

    def extra_repr(self) -> str:
        return f"{self.fmt}, dim={self.dim}"
