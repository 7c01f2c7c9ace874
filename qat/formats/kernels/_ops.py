"""The ``torch.library`` custom ops (namespace ``qat``) around the Triton kernels.

One op per format family, so ``torch.compile``, DDP and FSDP see a single opaque op. The
backward is the straight-through estimator: the upstream gradient passes unchanged and the op
saves no tensor. Launching reads only shapes (Python ints): no host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qat.formats.codebook import level_tensors
from qat.formats.ggml import GGML_BLOCK
from qat.formats.kernels._plan import (
    ABSMAX_CHUNK,
    KIND_BFP,
    KIND_CODEBOOK,
    KIND_GGML,
    KIND_MX,
    KIND_NVFP4,
    bfp_params,
    codebook_params,
    ggml_params,
    mx_params,
    plan,
)
from qat.formats.kernels._triton_kernels import fake_quantize_kernel, finite_absmax_kernel
from qat.formats.nvfp4 import NVFP4_BLOCK, global_scale
from qat.formats.scale import fixed_point_bits


def _launch(
    x: Tensor,
    dim: int,
    kind: int,
    block: int,
    params: tuple,
    tables: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Run the kernel on ``x`` with blocks of ``block`` along ``dim``."""
    if x.numel() == 0:
        return x.clone()  # a custom op may not return its input
    xc = x.contiguous()
    p = plan(tuple(xc.shape), dim, block)
    y = torch.empty_like(xc)
    lv, mids = tables if tables is not None else (xc, xc)  # unused pointers for bfp/mx
    fake_quantize_kernel[(p.grid,)](
        xc,
        y,
        lv,
        mids,
        p.n,
        p.inner,
        p.nb,
        p.total,
        p.n_col_tiles,
        KIND=kind,
        BLOCK=block,
        BP=p.bp,
        TILE=p.tile,
        LAYOUT=p.layout,
        P0=params[0],
        P1=params[1],
        P2=params[2],
        P3=params[3],
        P4=params[4],
        P5=params[5],
        num_warps=p.num_warps,
        enable_fp_fusion=False,
    )
    return y.view(x.shape)


def _fake(x: Tensor, *args) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _setup_context(ctx, inputs, output) -> None:
    """The STE saves nothing."""


def _ste_backward(nargs: int):
    def backward(ctx, grad: Tensor):
        return (grad,) + (None,) * (nargs - 1)

    return backward


@torch.library.custom_op("qat::bfp_fake_quantize", mutates_args=())
def bfp_fake_quantize(
    x: Tensor, dim: int, width: int, exponent_width: int, block_size: int, scale_mse: bool = False
) -> Tensor:
    """BFP fake quantisation (``qat.formats.bfp.BFP.quantize``) in one kernel."""
    frac = fixed_point_bits(block_size) if scale_mse else 0
    return _launch(x, dim, KIND_BFP, block_size, bfp_params(width, exponent_width, frac))


@torch.library.custom_op("qat::mx_fake_quantize", mutates_args=())
def mx_fake_quantize(
    x: Tensor,
    dim: int,
    block_size: int,
    mantissa_bits: int,
    emax: int,
    emin: int,
    max_value: float,
    is_int: bool,
    scale_mse: bool = False,
) -> Tensor:
    """OCP MX fake quantisation (``qat.formats.mx``) in one kernel."""
    frac = fixed_point_bits(block_size) if scale_mse else 0
    params = mx_params(mantissa_bits, emax, emin, max_value, is_int, frac)
    return _launch(x, dim, KIND_MX, block_size, params)


@torch.library.custom_op("qat::codebook_fake_quantize", mutates_args=())
def codebook_fake_quantize(
    x: Tensor, dim: int, block_size: int, levels: list[float], signed_absmax: bool
) -> Tensor:
    """4-bit codebook fake quantisation (``qat.formats.codebook``, no outliers) in one kernel."""
    lv = tuple(levels)
    # The reference's own float32 levels and midpoints, cached per device.
    tables = level_tensors(lv, x.device)
    params = codebook_params(lv, signed_absmax)
    return _launch(x, dim, KIND_CODEBOOK, block_size, params, tables)


@torch.library.custom_op("qat::ggml_fake_quantize", mutates_args=())
def ggml_fake_quantize(x: Tensor, dim: int, q4: bool) -> Tensor:
    """llama.cpp Q4_0 (``q4``) or Q8_0 fake quantisation (``qat.formats.ggml``) in one kernel."""
    return _launch(x, dim, KIND_GGML, GGML_BLOCK, ggml_params(q4))


@torch.library.custom_op("qat::nvfp4_fake_quantize", mutates_args=())
def nvfp4_fake_quantize(x: Tensor, dim: int) -> Tensor:
    """NVFP4 fake quantisation (``qat.formats.nvfp4``): a pass for the tensor's largest finite
    |x| (one read, a float per 4096 elements), then the one-read, one-write kernel."""
    if x.numel() == 0:
        return x.clone()
    xc = x.contiguous()
    parts = torch.empty(-(-xc.numel() // ABSMAX_CHUNK), dtype=torch.float32, device=x.device)
    finite_absmax_kernel[(parts.numel(),)](xc, parts, xc.numel(), CHUNK=ABSMAX_CHUNK)
    g = global_scale(parts).reshape(1)  # the reference's own maths on the partial maxima
    return _launch(xc, dim, KIND_NVFP4, NVFP4_BLOCK, (0, 0, 0, 0, 0, 0), (g, g))


for _op, _nargs in (
    (bfp_fake_quantize, 6),
    (mx_fake_quantize, 9),
    (codebook_fake_quantize, 5),
    (ggml_fake_quantize, 3),
    (nvfp4_fake_quantize, 2),
):
    _op.register_fake(_fake)
    _op.register_autograd(_ste_backward(_nargs), setup_context=_setup_context)
