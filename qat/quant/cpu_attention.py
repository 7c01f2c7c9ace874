"""The block path's fused CPU kernel (``csrc/block_attention_cpu.cpp``), built at first use.

The PyTorch block path (``block_attention.BlockAttention``) runs each op over a block of
``heads x rows x keys`` scores, tens of MiB that leave the cache between the matmul, the mask,
the softmax and the quantiser. The C++ kernel takes one head and a few dozen query rows at a
time (``CPU_ROWS``): their rows of scores stay in cache from ``QK^T`` to ``Q(P) V``, the
pointwise work is one vectorised pass per row, and the two cores work on different blocks
(single-threaded GEMMs, no sync inside a block). It computes what the block path computes (the
same whole rows, the same skipped key tails, a straight-through P quantiser): P equal to
ATen's softmax up to its rounding (the same formula, vectorised the same way; sums over a row
may be grouped otherwise), hence ``Q(P)`` equal except where P sits on a rounding boundary of
the grid, and outputs and gradients equal to float32 rounding (tested).

It takes float32 CPU tensors outside autocast with a boolean or float32 mask, and P in BFP
with the ``max`` scale rule (any width, exponent width, block size) or in float; everything
else (bf16, autocast, ``scale: mse``, other P formats, a P rotation) runs the PyTorch block
path, as does every call when the kernel cannot be built (no C++ compiler or ``ninja``: one
warning) or ``$QAT_CPU_ATTENTION=0``. The build (about a minute, once per machine and source)
is cached by ``torch.utils.cpp_extension`` under ``$TORCH_EXTENSIONS_DIR``.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

ENV = "QAT_CPU_ATTENTION"  # "0": always the PyTorch block path
# Query rows per task: a task's score rows (CPU_ROWS x keys float32, three buffers in
# backward) stay in a core's L2 up to a few thousand keys.
CPU_ROWS = 64
MAX_BLOCK = 256  # P blocks of at most this many keys (one block is staged on the stack)
SOURCE = Path(__file__).parent / "csrc" / "block_attention_cpu.cpp"
# ISA flags per ATen CPU capability: the kernel's at::vec code uses the vector width ATen's own
# kernels use on this machine (so the softmax vectorises as ATen's does).
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


def enabled() -> bool:
    """Whether the kernel may run (``$QAT_CPU_ATTENTION`` is not ``0``)."""
    return os.environ.get(ENV, "1") != "0"


@functools.cache
def load() -> bool:
    """Build (or find in the cache) and load the kernel; False, with one warning, where it
    cannot be built here."""
    try:
        from torch.utils import cpp_extension

        cap = torch.backends.cpu.get_cpu_capability()
        logger.info("qat: loading the CPU attention kernel (built once per machine, ~15 s)")
        # OpenMP: at::parallel_for is serial in a unit built without it; fp-contract off: no
        # fused multiply-adds that ATen's own kernels do not take
        flags = ["-O3", "-fopenmp", "-ffp-contract=off", *_ISA_FLAGS.get(cap, [])]
        if cap in _ISA_FLAGS:
            flags.append(f"-DCPU_CAPABILITY_{cap}")
        cpp_extension.load(
            name=f"qat_block_attention_cpu_{cap.lower()}",
            sources=[str(SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        return True
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a failed build: fall back
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        logger.warning(
            "qat: the CPU attention kernel could not be built (%s); long sequences run the "
            "PyTorch block path",
            first,
        )
        return False


def p_params(quantize_p: Callable[[Tensor], Tensor] | None) -> tuple[int, int, int, int] | None:
    """``(block, m_bits, e_lo, e_hi)`` of a P quantiser the kernel runs (``block`` 0: float P),
    or None where it does not (another format or scale rule, a rotation, another dim)."""
    if quantize_p is None:
        return (0, 0, 0, 0)
    from qat.formats.bfp import BFP, exponent_range

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
    ``stops``: keys per block of ``rows`` query rows (None: all keys)."""
    if not load():
        raise RuntimeError("qat: the CPU attention kernel is not built (see the warning above)")
    b, h, q_len, _ = q.shape
    k_len = k.shape[-2]
    if mask is not None:
        mask = mask.expand(b, h, q_len, k_len)
    n_blocks = -(-q_len // rows)
    stop_t = torch.tensor(stops if stops is not None else [k_len] * n_blocks, dtype=torch.int64)
    return CpuBlockAttention.apply(q, k, v, mask, scaling, p_params(quantize_p), rows, stop_t)
