"""C++ CPU kernels of the formats (``csrc/bfp_cpu.cpp``): BFP with the ``max`` scale on
float32, one vectorised pass over whole blocks, equal bit for bit to the reference (tested).

``backend: compile`` (what ``auto`` is on a CPU) hands such a quantiser to it instead of the
``torch.compile`` graph, whose exponent code (frexp) does not vectorise: on this 2-core CPU the
kernel runs a 4096 x 1024 tensor in about a quarter of the compiled graph's time
(``bench/speed.py --part kernels``). Everything else keeps the compiled graph, as does every
call where the kernel cannot be built or ``$QAT_CPU_QUANTIZERS=0``.

At its first load the kernel is checked against the reference on seeded hostile blocks (its
three code paths: AVX512 blocks of 16, whole vectors, scalar); on any difference (a torch
upgrade may change the ATen vector code it is built on) it is not used, after one warning.
The op checks its own inputs (dtype, dims, the format's range) and raises a one-line error.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from qat.formats.base import Format
from qat.formats.bfp import BFP, exponent_range
from qat.formats.kernels.cpu_build import build

logger = logging.getLogger(__name__)

ENV = "QAT_CPU_QUANTIZERS"  # "0": never the C++ kernel
SOURCE = Path(__file__).parent / "csrc" / "bfp_cpu.cpp"


@functools.cache
def load() -> bool:
    """Whether the kernel is built, loaded and equal to the reference here (built and checked
    at the first call)."""
    return build("qat_bfp_cpu", SOURCE) and kernel_agrees()


def kernel_agrees() -> bool:
    """Whether the kernel gives the reference's bits on seeded blocks at every scale, with
    zeros of both signs, subnormals and non-finite values; False, with one warning, if not."""
    g = torch.Generator().manual_seed(0)
    for fmt in (BFP(4, 8, 16), BFP(8, 8, 32), BFP(3, 3, 5)):
        scale = torch.exp2(torch.randint(-150, 128, (256, 1), generator=g).float())
        x = torch.randn(256, fmt.block_size, generator=g) * scale
        x[0, 0], x[1, -1], x[2, 0], x[3] = float("nan"), float("inf"), -1e-30, -0.0
        x[4] = 1e-41
        got = cpu_quantize_blocks(x, fmt).view(torch.int32)
        want = fmt.quantize(x, -1).view(torch.int32)
        if not torch.equal(got, want):
            logger.warning(
                "qat: the CPU BFP kernel differs from the reference here (%s, %d of %d "
                "values; torch %s): the compiled graph runs instead",
                fmt,
                int((got != want).sum()),
                got.numel(),
                torch.__version__,
            )
            return False
    return True


def cpu_supports(fmt: Format, x: Tensor) -> bool:
    """Whether the kernel quantises ``x`` with ``fmt``: BFP, scale ``max``, float32 on CPU."""
    return (
        isinstance(fmt, BFP)
        and fmt.scale == "max"
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and enabled()
        and not torch.compiler.is_compiling()
        and load()
    )


def enabled() -> bool:
    """Whether the kernel may run (``$QAT_CPU_QUANTIZERS`` is not ``0``; once off, one warning
    says so: the same values, more time)."""
    if os.environ.get(ENV, "1") != "0":
        return True
    _warn_off()
    return False


@functools.cache
def _warn_off() -> None:
    logger.warning("qat: %s=0: BFP runs the compiled graph (the kernel's values, slower)", ENV)


def cpu_quantize_blocks(blocks: Tensor, fmt: BFP) -> Tensor:
    """``fmt.quantize(blocks, -1)`` of float32 ``[n, fmt.block_size]`` blocks by the kernel."""
    lo, hi = exponent_range(fmt.exponent_width)
    return torch.ops.qat_cpu_formats.bfp_quantize(blocks, fmt.width - 1, lo, hi)
