"""The block path's fused CPU kernel (``csrc/block_attention_cpu.cpp``), built at first use.

The PyTorch block path (``block_attention.BlockAttention``) runs each op over a block of
``heads x rows x keys`` scores, tens of MiB that leave the cache between the matmul, the mask,
the softmax and the quantiser. The C++ kernel takes one head and one tile of query rows
(``block_attention.TILE_ROWS``) at a time: their rows of scores stay in cache from ``QK^T`` to
``Q(P) V``, the pointwise work is one vectorised pass per row, and the two cores work on
different tiles (single-threaded GEMMs, no sync inside a tile). It computes what the block path
computes, in the same order: ATen's GEMMs on each tile's keys, ATen's softmax formula summed
lane by lane in ATen's order, the BFP quantiser of P, and in backward each tile's GEMM followed
by one add into dK and dV. So its outputs and gradients are the PyTorch block path's bit for
bit; ``block_attention.kernel_agrees`` checks that once per process on random data, and where
a torch version or BLAS breaks it the PyTorch path runs, after one warning.

It takes float32 CPU tensors outside autocast with a boolean or float32 mask, and P in BFP
with the ``max`` scale rule (any width, exponent width, block size up to ``MAX_BLOCK``) or in
float; everything else (bf16, autocast, ``scale: mse``, other P formats, a P rotation) runs the
PyTorch block path, as does every call when the kernel cannot be built (no C++ compiler or
``ninja``: one warning) or ``$QAT_CPU_ATTENTION=0`` (the same numbers, slower). The ops check
their own inputs (dtypes, shapes, key stops, the P block bound) and raise a one-line error. The
build (about 15 s, once per machine and source) is ``qat.formats.kernels.cpu_build``'s.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from qat.formats.bfp import BFP, exponent_range
from qat.formats.kernels.cpu_build import build

logger = logging.getLogger(__name__)

ENV = "QAT_CPU_ATTENTION"  # "0": always the PyTorch block path
# P blocks of at most this many keys (one block is staged on the stack; the op checks it too)
MAX_BLOCK = 256
SOURCE = Path(__file__).parent / "csrc" / "block_attention_cpu.cpp"


def enabled() -> bool:
    """Whether the kernel may run (``$QAT_CPU_ATTENTION`` is not ``0``; once off, one warning
    says so: the same numbers, more time)."""
    if os.environ.get(ENV, "1") != "0":
        return True
    _warn_off()
    return False


@functools.cache
def _warn_off() -> None:
    logger.warning(
        "qat: %s=0: long attention runs the PyTorch block path (the kernel's numbers, slower)",
        ENV,
    )


def load() -> bool:
    """Whether the kernel is built and loaded (built at the first call; False, with one
    warning, where it cannot be built here)."""
    return build("qat_block_attention_cpu", SOURCE)


def p_params(quantize_p: Callable[[Tensor], Tensor] | None) -> tuple[int, int, int, int] | None:
    """``(block, m_bits, e_lo, e_hi)`` of a P quantiser the kernel runs (``block`` 0: float P),
    or None where it does not (another format or scale rule, a rotation, another dim)."""
    if quantize_p is None:
        return (0, 0, 0, 0)

    fmt = getattr(quantize_p, "fmt", None)
    if getattr(quantize_p, "rotation", None) is not None or getattr(quantize_p, "dim", 0) != -1:
        return None
    if fmt is not None and not getattr(quantize_p, "enabled", True):
        return (0, 0, 0, 0)
    if not isinstance(fmt, BFP) or fmt.scale != "max" or fmt.block_size > MAX_BLOCK:
        return None
    return (fmt.block_size, fmt.width - 1, *exponent_range(fmt.exponent_width))


def applies(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, quantize_p: Callable | None
) -> bool:
    """Whether the kernel runs this call (see the module docstring)."""
    if not enabled() or q.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if any(t.dtype != torch.float32 or t.dim() != 4 for t in (q, k, v)) or k.shape[-2] == 0:
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    if mask is not None and (mask.dtype not in (torch.bool, torch.float32) or mask.dim() > 4):
        return False
    return p_params(quantize_p) is not None and load()


class CpuBlockAttention(torch.autograd.Function):
    """``block_attention`` by the C++ kernel: saves Q, K, V, the mask and the key stops."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scaling, params, rows, stops):  # noqa: D102
        ctx.scaling, ctx.params, ctx.rows = scaling, params, rows
        # detached: the kernel's own matmuls must not be seen by autograd
        out, stats = torch.ops.qat_cpu.block_attention_forward(
            q.detach(),
            k.detach(),
            v.detach(),
            None if mask is None else mask.detach(),
            scaling,
            stops,
            rows,
            *params,
        )
        ctx.save_for_backward(q, k, v, mask, stats, stops)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        q, k, v, mask, stats, stops = ctx.saved_tensors
        gq, gk, gv = torch.ops.qat_cpu.block_attention_backward(
            grad_out.detach(),
            q.detach(),
            k.detach(),
            v.detach(),
            mask,
            stats,
            ctx.scaling,
            stops,
            ctx.rows,
            *ctx.params,
        )
        return gq, gk, gv, None, None, None, None, None


def cpu_block_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    scaling: float,
    quantize_p: Callable[[Tensor], Tensor] | None,
    rows: int,
    stops: list[int] | None,
) -> Tensor:
    """The kernel's attention output ``[batch, heads, q_len, dim]`` (``applies`` must hold);
    ``stops``: keys per block of ``rows`` query rows (None: all keys); ``rows``: the tile."""
    if not load():
        raise RuntimeError("qat: the CPU attention kernel is not built (see the warning above)")
    b, h, q_len, _ = q.shape
    k_len = k.shape[-2]
    if mask is not None:
        mask = mask.expand(b, h, q_len, k_len)
    n_blocks = -(-q_len // rows)
    stop_t = torch.tensor(stops if stops is not None else [k_len] * n_blocks, dtype=torch.int64)
    return CpuBlockAttention.apply(q, k, v, mask, scaling, p_params(quantize_p), rows, stop_t)
