"""Fused Triton fake-quantisers, equal bit for bit to the reference ``Format.quantize``.

``triton_fake_quantize(x, fmt, dim)`` runs one kernel (one read, one write of ``x``; float32
maths in registers; blocks along any dim without a transposed copy) through the custom ops
``torch.ops.qat.{bfp,mx,codebook,ggml,nvfp4}_fake_quantize``; NVFP4 first reads ``x`` once more
for its tensor-wide scale. It runs on CUDA tensors, and on CPU tensors only under Triton's
interpreter (``TRITON_INTERPRET=1``, set before triton is imported; tests).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from qat.formats.base import Format
from qat.formats.bfp import BFP
from qat.formats.codebook import AF4, BOF4, BOF4S, NF4
from qat.formats.ggml import GGMLQ4_0, GGMLQ8_0
from qat.formats.lobcq import LOBCQ
from qat.formats.mx import MXFP4, MXFP6E2M3, MXFP6E3M2, MXFP8E4M3, MXFP8E5M2, MXINT8
from qat.formats.nvfp4 import NVFP4

__all__ = ["MAX_BLOCK_SIZE", "supports_triton", "triton_available", "triton_fake_quantize"]

# A block lives in registers; beyond this it would spill (no format in use comes close).
MAX_BLOCK_SIZE = 8192
# LO-BCQ (qat.formats.kernels._lobcq_ops, not imported without triton): a block's scalars are
# unrolled, an array is one tile.
LOBCQ_MAX_BLOCK_LEN, LOBCQ_MAX_ARRAY_LEN = 128, 8192
_MX_TYPES = (MXFP8E4M3, MXFP8E5M2, MXFP6E2M3, MXFP6E3M2, MXFP4, MXINT8)
_CODEBOOK_TYPES = (NF4, AF4, BOF4, BOF4S)
_GGML_TYPES = (GGMLQ4_0, GGMLQ8_0)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _load_ops() -> bool:
    """Import triton and register the custom ops; False if triton is missing or broken."""
    try:
        if importlib.util.find_spec("triton") is None:
            return False
        importlib.import_module("qat.formats.kernels._ops")
        importlib.import_module("qat.formats.kernels._lobcq_ops")
    except Exception:  # ImportError, or a triton that fails on import: no kernels then
        return False
    return True


# Resolved once at import: the wrapper below must stay traceable by torch.compile (no imports
# or environment reads inside it). Triton itself reads TRITON_INTERPRET when kernels are defined.
_AVAILABLE = _load_ops()
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    """Whether triton can be imported (never raises)."""
    return _AVAILABLE


def supports_triton(fmt: Format) -> bool:
    """Whether a fused kernel implements ``fmt`` (BFP, the six MX, either scale choice; 4-bit
    codebooks w/o OPQ; llama.cpp's Q4_0 and Q8_0; NVFP4; LO-BCQ, ``_lobcq_ops``' limits)."""
    if type(fmt) is LOBCQ:
        return (
            fmt.block_len <= LOBCQ_MAX_BLOCK_LEN
            and fmt.array_len <= LOBCQ_MAX_ARRAY_LEN
            and fmt.num_codebooks <= 256
        )
    block = getattr(fmt, "block_size", None)
    if not isinstance(block, int) or not 1 <= block <= MAX_BLOCK_SIZE:
        return False
    # Exact types: a subclass may change the maths.
    if type(fmt) in (BFP, NVFP4) or type(fmt) in _MX_TYPES or type(fmt) in _GGML_TYPES:
        return True
    if type(fmt) in _CODEBOOK_TYPES:
        return fmt.outliers == "none" and len(fmt.levels) == 16
    return False


def triton_fake_quantize(x: Tensor, fmt: Format, dim: int = -1) -> Tensor:
    """``fmt.quantize(x, dim)`` bit for bit, in one fused kernel (see the module docstring)."""
    if not supports_triton(fmt):
        raise ValueError(f"no triton kernel for format {fmt}; use fmt.quantize")
    if x.dtype not in _DTYPES:
        raise TypeError(
            f"{fmt.name}: triton kernels take float32, float16 or bfloat16 tensors, got {x.dtype}"
        )
    nd = max(x.dim(), 1)
    if not -nd <= dim < nd:  # the reference's check and message
        raise IndexError(
            f"{fmt.name}: dim {dim} is out of range for a {x.dim()}-D tensor "
            f"(expected -{nd} <= dim < {nd})"
        )
    if not _AVAILABLE:
        raise RuntimeError("triton is not installed (pip install triton)")
    if x.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            f"triton kernels run on CUDA tensors, got a {x.device.type} tensor "
            f"(set TRITON_INTERPRET=1 before importing triton to interpret them)"
        )
    q = torch.ops.qat
    if type(fmt) is LOBCQ:
        flat = [v for row in fmt.codebooks for v in row]
        return q.lobcq_fake_quantize(x, dim, fmt.block_len, fmt.array_len, flat)
    if type(fmt) is BFP:
        return q.bfp_fake_quantize(
            x, dim, fmt.width, fmt.exponent_width, fmt.block_size, fmt.scale == "mse"
        )
    if type(fmt) in _MX_TYPES:
        return q.mx_fake_quantize(
            x,
            dim,
            fmt.block_size,
            fmt.mantissa_bits,
            fmt.emax,
            fmt.emin,
            fmt.max_value,
            type(fmt) is MXINT8,
            fmt.scale == "mse",
        )
    if type(fmt) in _GGML_TYPES:
        return q.ggml_fake_quantize(x, dim, type(fmt) is GGMLQ4_0)
    if type(fmt) is NVFP4:
        return q.nvfp4_fake_quantize(x, dim)
    return q.codebook_fake_quantize(
        x, dim, fmt.block_size, list(fmt.levels), fmt.normalization == "signed_absmax"
    )
