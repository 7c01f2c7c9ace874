"""C++ CPU kernels of the formats (``csrc/bfp_cpu.cpp``): BFP with the ``max`` scale on
float32, one vectorised pass over whole blocks, equal bit for bit to the reference (tested).

``backend: compile`` (what ``auto`` is on a CPU) hands such a quantiser to it instead of the
``torch.compile`` graph, whose exponent code (frexp) does not vectorise: on this 2-core CPU the
kernel runs a 4096 x 1024 tensor in about a quarter of the compiled graph's time
(``bench/speed.py --part kernels``). Everything else keeps the compiled graph, as does every
call where the kernel cannot be built or ``$QAT_CPU_QUANTIZERS=0``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from qat.formats.base import Format
from qat.formats.bfp import BFP, exponent_range
from qat.formats.kernels.cpu_build import build

ENV = "QAT_CPU_QUANTIZERS"  # "0": never the C++ kernel
SOURCE = Path(__file__).parent / "csrc" / "bfp_cpu.cpp"


def load() -> bool:
    """Whether the kernel is built and loaded (built at the first call)."""
    return build("qat_bfp_cpu", SOURCE)


def cpu_supports(fmt: Format, x: Tensor) -> bool:
    """Whether the kernel quantises ``x`` with ``fmt``: BFP, scale ``max``, float32 on CPU."""
    return (
        isinstance(fmt, BFP)
        and fmt.scale == "max"
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and os.environ.get(ENV, "1") != "0"
        and not torch.compiler.is_compiling()
        and load()
    )


def cpu_quantize_blocks(blocks: Tensor, fmt: BFP) -> Tensor:
    """``fmt.quantize(blocks, -1)`` of float32 ``[n, fmt.block_size]`` blocks by the kernel."""
    lo, hi = exponent_range(fmt.exponent_width)
    return torch.ops.qat_cpu_formats.bfp_quantize(blocks, fmt.width - 1, lo, hi)
