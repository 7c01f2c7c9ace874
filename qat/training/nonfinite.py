"""Non-finite losses and quantiser outputs: find the first offending layer, stop or skip.

Checking every module's output on every step would cost a device sync per module, so the
trainer checks only the loss (one scalar) each step. When it is NaN or +-inf,
``find_first_nonfinite`` re-runs the forward pass on the same batch with forward hooks on every
module (quantisers included) and reports the first module, in the order outputs were produced,
whose output is non-finite. The re-run uses a forked RNG so that locating a fault does not shift
dropout masks for the rest of training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from qat.errors import ConfigError, check_one_of
from qat.quant.ste import FakeQuantizer

POLICIES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """Training hit a non-finite loss; the message names the step and the first bad layer."""

    def __init__(
        self, step: int, loss: float, fault: NonFiniteFault | None, where: str = ""
    ) -> None:
        self.step, self.loss, self.fault = step, loss, fault
        layer = (
            fault.describe()
            if fault
            else "none (every module output was finite here; "
            "the loss computation itself overflowed)"
        )
        super().__init__(
            f"non-finite training loss ({loss}){where} at step {step}; first offending layer: "
            f"{layer}. "
            "Training stopped before the optimizer step; the last saved checkpoint is intact. "
            "Set on_nonfinite: skip to skip such steps instead."
        )


@dataclasses.dataclass(frozen=True)
class NonFiniteFault:
    """The first module whose output held NaN or inf during a forward pass."""

    module: str  # the name from model.named_modules(), "" for the model itself
    kind: str  # "quantiser" for a FakeQuantizer, else the module's class name
    nan: int  # count of NaN elements in the output
    inf: int  # count of +-inf elements in the output
    inputs_finite: bool  # False: the module was handed non-finite values

    def describe(self) -> str:
        bad = ", ".join(f"{n} {w}" for n, w in ((self.nan, "NaN"), (self.inf, "inf")) if n)
        origin = (
            "its inputs were finite, so it produced them"
            if self.inputs_finite
            else "its inputs were already non-finite: the fault lies in the code between this "
            "module and the previous one"
        )
        return f"{self.module or '<model>'} ({self.kind}; output has {bad}; {origin})"


def _tensors(obj: Any) -> Iterator[Tensor]:
    """Every floating-point tensor inside nested outputs (tuples, dicts, ModelOutput)."""
    if isinstance(obj, Tensor):
        if torch.is_floating_point(obj):
            yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _counts(obj: Any) -> tuple[int, int]:
    nan = inf = 0
    for t in _tensors(obj):
        nan += int(torch.isnan(t).sum())
        inf += int(torch.isinf(t).sum())
    return nan, inf


def _kind(module: nn.Module) -> str:

    return "quantiser" if isinstance(module, FakeQuantizer) else type(module).__name__


@contextlib.contextmanager
def _forked_rng(device: torch.device | None) -> Iterator[None]:
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def find_first_nonfinite(
    model: nn.Module, inputs: Mapping[str, Any], names_from: nn.Module | None = None
) -> NonFiniteFault | None:
    """Run ``model(**inputs)`` without gradients and return the first non-finite module output.

    "First" is the order in which modules return, so a quantiser inside a linear is reported
    before the linear itself, and an early layer before a later one. ``names_from`` is the
    unwrapped model whose ``named_modules`` names are reported (pass it when ``model`` is a DDP
    or FSDP wrapper, which prefixes names). Returns None when every output is finite.
    The model's train/eval mode is left as it is, so dropout behaves as in the failing step.
    """
    named = names_from if names_from is not None else model
    names = {id(m): n for n, m in named.named_modules()}
    found: list[NonFiniteFault] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if found:
            return
        nan, inf = _counts(output)
        if nan or inf:
            in_nan, in_inf = _counts((args, kwargs))
            found.append(
                NonFiniteFault(
                    names.get(id(module), type(module).__name__),
                    _kind(module),
                    nan,
                    inf,
                    not (in_nan or in_inf),
                )
            )

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in named.modules()]
    device = next((p.device for p in named.parameters()), None)
    try:
        with torch.no_grad(), _forked_rng(device):
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def is_finite(value: Tensor | float) -> bool:
    """True when a loss (tensor or float) is finite."""
    if isinstance(value, Tensor):
        return bool(torch.isfinite(value).all())
    return math.isfinite(value)


def check_policy(policy: str) -> str:
    check_one_of("on_nonfinite", policy, POLICIES, ConfigError)
    return policy
