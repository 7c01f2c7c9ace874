"""Outlier-preserving quantisation (OPQ, BOF4 paper; docs/formats.md).

In each block of ``I`` elements, ``w`` is an outlier when ``|w| > sigma_b * F_M^-1(q)``:
``sigma_b`` is the block's sample standard deviation (``1/(I-1)``, over all its elements,
outliers included) and ``F_M(m) = (2 Phi(m) - 1)^I`` is the CDF of the absolute max of ``I``
standard Gaussians, so ``F_M^-1(q) = Phi^-1((q^(1/I) + 1) / 2)``. Outliers are stored in bf16
with their index, set to 0 before the block's (signed) max search, and restored after.

A ragged last block uses its real element count ``I`` (padding is not data); a block with fewer
than 2 real elements has no sample std and no outliers.

Storage (a static property, so expected not measured): under the Gaussian model each element
is an outlier with probability ``p = 1 - q^(1/I)`` (the threshold is the q-quantile of the block
max), i.e. ``I * p`` outliers per block (about ``-ln q``, 0.0513 for q = 0.95), each costing a
16-bit bf16 value plus a ``ceil(log2 I)``-bit index: ``p * (16 + ceil(log2 I))`` bits per
element (0.0176 at I = 64, q = 0.95). The ragged last block is costed like a full one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

OUTLIER_VALUE_BITS = 16  # bf16


def max_quantile(count: Tensor | int, q: float) -> Tensor:
    """``F_M^-1(q) = Phi^-1((q^(1/I) + 1) / 2)`` for block sizes ``count`` (float64)."""
    i = torch.as_tensor(count, dtype=torch.float64)
    return torch.special.ndtri((q ** (1.0 / i) + 1.0) / 2.0)


def outlier_rate(block_size: int, q: float) -> float:
    """Expected fraction of elements that are outliers for Gaussian data: ``1 - q^(1/I)``."""
    return 1.0 - q ** (1.0 / block_size)


def opq_bits(block_size: int, q: float) -> float:
    """Expected extra bits per element for outlier storage (bf16 value + in-block index)."""
    index_bits = math.ceil(math.log2(block_size)) if block_size > 1 else 0
    return outlier_rate(block_size, q) * (OUTLIER_VALUE_BITS + index_bits)


def block_counts(nblocks: int, block_size: int, n: int, device: torch.device) -> Tensor:
    """Real (unpadded) element count of each of ``nblocks`` blocks of a row of length ``n``."""
    starts = torch.arange(nblocks, device=device) * block_size
    return (n - starts).clamp(max=block_size)


def outlier_mask(xb: Tensor, n: int, q: float) -> Tensor:
    """Boolean ``[..., nblocks, B]``: which elements of the blocked tensor are outliers.

    ``xb`` comes from ``to_blocks`` (zero-padded); ``n`` is the row's real length.
    """
    nblocks, bsz = xb.shape[-2], xb.shape[-1]
    count = block_counts(nblocks, bsz, n, xb.device)  # [nblocks]
    valid = torch.arange(bsz, device=xb.device) < count[:, None]  # [nblocks, B]
    cnt = count.to(xb.dtype)
    mean = xb.sum(-1) / cnt
    centred = torch.where(valid, xb - mean.unsqueeze(-1), torch.zeros_like(xb))
    var = centred.square().sum(-1) / (cnt - 1).clamp_min(1)
    factor = max_quantile(count.clamp_min(2), q).to(xb.dtype)
    thresh = torch.where(count >= 2, var.sqrt() * factor, torch.full_like(var, math.inf))
    return (xb.abs() > thresh.unsqueeze(-1)) & valid


def split_outliers(xb: Tensor, n: int, q: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(inliers, mask, kept)``: outliers zeroed, where they were, their bf16-rounded values."""
    mask = outlier_mask(xb, n, q)
    kept = xb.to(torch.bfloat16).to(xb.dtype)
    return torch.where(mask, torch.zeros_like(xb), xb), mask, kept
