"""Which implementation fake-quantises a tensor (``quant.backend`` in a recipe).

- ``triton``: the fused kernels of ``qat.formats.kernels`` (one read, one write; CUDA tensors;
  bit-identical to the reference). Formats without a kernel fall back to ``compile``.
- ``compile``: ``torch.compile`` of the reference (inductor fuses it into a couple of loops; C++
  on the CPU, Triton on a GPU), applied to a ``[rows, block]`` view so that one graph per format
  serves every shape. Formats without independent blocks (int, fixed, LO-BCQ, OPQ) run the
  reference. BFP (scale ``max``) on float32 CPU tensors runs the C++ kernel of
  ``qat.formats.kernels.cpu`` instead (the same values, about 4x faster than the graph), and
  LO-BCQ on float32 CPU tensors that of ``qat.formats.kernels.cpu_lobcq``.
- ``reference``: the readable definition in ``qat.formats`` (eager PyTorch).
- ``auto``: ``triton`` on CUDA where a kernel exists, else ``compile`` where a compiler works,
  else ``reference``. ``$QAT_BACKEND`` replaces what ``auto`` picks (the test suite sets it to
  ``reference`` so that hundreds of tiny models do not each pay for compilation).

Every backend is a straight-through estimator: the backward pass hands the gradient back
unchanged and saves no tensor.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch
from torch import Tensor

from qat.errors import ConfigError
from qat.formats import Format
from qat.formats.kernels.cpu import cpu_quantize_blocks, cpu_supports
from qat.formats.kernels.cpu_lobcq import cpu_lobcq_quantize, cpu_lobcq_supports

BACKENDS = ("auto", "triton", "compile", "reference")
BACKEND_ENV = "QAT_BACKEND"
logger = logging.getLogger(__name__)


class _STE(torch.autograd.Function):
    """Forward: ``fn(x)``; backward: identity. Nothing is saved for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:  # noqa: D102
        return fn(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        return grad, None


def _reference(fmt: Format, dim: int) -> Callable[[Tensor], Tensor]:
    return functools.partial(fmt.quantize, dim=dim)


@functools.cache
def _compiled_blocks(fmt: Format) -> Callable[[Tensor], Tensor]:
    """``fmt.quantize`` of a ``[rows, B]`` tensor of whole blocks, compiled once per distinct
    format (formats are frozen, hashable dataclasses, so equal formats share it).

    Only the row count is dynamic: with the block length static inductor emits one vectorised
    loop, where fully dynamic shapes gave code slower than eager (measured in bench/speed.py).
    """
    import torch._dynamo

    # Every format's graph hangs off the one code object Format.quantize: allow many.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(functools.partial(fmt.quantize, dim=-1), dynamic=False)


@functools.cache
def _compiled(fmt: Format, dim: int) -> Callable[[Tensor], Tensor]:
    """Compiled quantiser for block formats; others (row or tensor scales, LO-BCQ, OPQ) run
    the reference, whose compiled form would need fully dynamic shapes, except LO-BCQ on
    float32 CPU tensors: its C++ kernel."""
    block = fmt.independent_block
    if block is None:
        ref = _reference(fmt, dim)

        def kernel_or_reference(x: Tensor) -> Tensor:
            if cpu_lobcq_supports(fmt, x):  # LO-BCQ on float32 CPU tensors: the C++ kernel
                return cpu_lobcq_quantize(x.detach(), fmt, dim)
            return ref(x)

        return kernel_or_reference
    fn = _compiled_blocks(fmt)

    def run(x: Tensor) -> Tensor:
        moved = x.movedim(dim, -1) if x.dim() else x.reshape(1)
        n = moved.shape[-1]
        pad = -n % block
        flat = moved.reshape(-1, n)
        if pad:  # a ragged last block: zero padding is neutral for these formats
            flat = torch.nn.functional.pad(flat, (0, pad))
        blocks = flat.reshape(-1, block)
        if cpu_supports(fmt, blocks):  # BFP on float32 CPU tensors: the C++ kernel
            out = cpu_quantize_blocks(blocks.detach(), fmt).reshape(flat.shape)
        else:
            torch._dynamo.maybe_mark_dynamic(blocks, 0)
            out = fn(blocks).reshape(flat.shape)
        if pad:
            out = out[:, :n]
        return out.reshape(moved.shape).movedim(-1, dim) if x.dim() else out.reshape(())

    return run


@functools.cache
def compile_works() -> bool:
    """Whether torch.compile can build CPU code here (it needs a C++ compiler)."""
    try:
        f = torch.compile(lambda t: t * 2 + 1, dynamic=False)
        return bool(torch.equal(f(torch.ones(4)), torch.full((4,), 3.0)))
    except Exception as e:  # noqa: BLE001 - any failure means: do not use it
        logger.warning(
            "qat: torch.compile does not work here (%s); quantisers run eagerly",
            str(e).splitlines()[0] if str(e) else type(e).__name__,
        )
        return False


def _triton_supports(fmt: Format) -> bool:
    try:
        from qat.formats.kernels import supports_triton, triton_available
    except ImportError:
        return False
    return triton_available() and supports_triton(fmt)


class BackendError(ConfigError):
    """``quant.backend`` (or ``$QAT_BACKEND``) cannot run here (one line, exit code 2)."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, fmt: Format, device: torch.device) -> str:
    """The backend that will run ``fmt`` on ``device`` (never ``auto``)."""
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV) or "auto"
        if backend not in BACKENDS:
            raise BackendError(f"${BACKEND_ENV}={backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type == "cuda" and _triton_supports(fmt):
            return "triton"
        return "compile" if device.type == "cuda" or compile_works() else "reference"
    if backend == "triton":
        if device.type != "cuda" and not _interpreting():
            raise BackendError(
                f"quant.backend triton runs on CUDA tensors; got a {device.type} "
                "tensor (use quant.backend auto)"
            )
        return "triton" if _triton_supports(fmt) else "compile"
    return backend


def fake_quantize(x: Tensor, fmt: Format, dim: int = -1, backend: str = "auto") -> Tensor:
    """STE fake quantisation of ``x`` with ``fmt`` blocked along ``dim`` by ``backend``."""
    return run_backend(resolve_backend(backend, fmt, x.device), x, fmt, dim)


def run_backend(impl: str, x: Tensor, fmt: Format, dim: int) -> Tensor:
    """``fake_quantize`` with an already resolved backend (``FakeQuantizer`` resolves once per
    device, so the training step does no resolution work)."""
    if impl == "triton":
        from qat.formats.kernels import triton_fake_quantize

        return triton_fake_quantize(x, fmt, dim)  # a custom op with an identity backward
    fn = _compiled(fmt, dim) if impl == "compile" else _reference(fmt, dim)
    return _STE.apply(x, fn)
