"""The C++ CPU kernel of LO-BCQ (``csrc/lobcq_cpu.cpp``): float32 rows, equal bit for bit to
``qat.formats.lobcq``'s reference (tested), built at first use by ``cpu_build``.

The codebooks are the vector lanes: for each scalar, one row of the transposed lookup table
(its nearest entry in every codebook) updates every codebook's error of its block in a few
vector ops, and the block's choice is a vector argmin; nothing of the reference's ``[blocks,
L_b, N_c]`` candidates touches memory. ``backend: compile`` (what ``auto`` is on a CPU) runs
it for float32 CPU tensors; other dtypes, calls under ``torch.compile``, a kernel that cannot
be built (one warning) and ``$QAT_CPU_QUANTIZERS=0`` run the reference.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from qat.formats.base import Format
from qat.formats.kernels.cpu import ENV
from qat.formats.kernels.cpu_build import build
from qat.formats.lobcq import LOBCQ, _cached_luts

SOURCE = Path(__file__).parent / "csrc" / "lobcq_cpu.cpp"
MAX_BLOCK_LEN = 1024  # a block's scalars are staged on the stack


def load() -> bool:
    """Whether the kernel is built and loaded (built at the first call)."""
    return build("qat_lobcq_cpu", SOURCE)


def cpu_lobcq_supports(fmt: Format, x: Tensor) -> bool:
    """Whether the kernel quantises ``x`` with ``fmt``: LO-BCQ, float32 on CPU."""
    return (
        type(fmt) is LOBCQ  # exact type: a subclass may change the maths
        and fmt.block_len <= MAX_BLOCK_LEN
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and os.environ.get(ENV, "1") != "0"
        and not torch.compiler.is_compiling()
        and load()
    )


def cpu_lobcq_quantize(x: Tensor, fmt: LOBCQ, dim: int = -1) -> Tensor:
    """``fmt.quantize(x, dim)`` of a float32 CPU tensor by the kernel.

    >>> from qat.formats import make_format
    >>> fmt = make_format({"format": "lobcq"})
    >>> x = torch.randn(4, 128)
    >>> torch.equal(cpu_lobcq_quantize(x, fmt), fmt.quantize(x)) if load() else True
    True
    """
    if x.numel() == 0:
        return x.clone()
    moved = x.movedim(dim, -1) if x.dim() else x.reshape(1)
    n = moved.shape[-1]
    _, lut_values = _cached_luts(fmt.codebooks, x.device)
    out = torch.ops.qat_cpu_lobcq.lobcq_quantize(
        moved.reshape(-1, n), lut_values, fmt.block_len, fmt.array_len
    )
    return out.reshape(moved.shape).movedim(-1, dim) if x.dim() else out.reshape(())
