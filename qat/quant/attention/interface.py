"""Quantised attention registered with transformers' attention-function registry.

``quantize_model`` attaches a ``MatmulQuantizer`` as ``module.qat_matmul`` to each attention
module and switches the model to the ``"qat"`` implementation; modules without one run the
same math in float. This is eager attention with the four matmul operands fake-quantised.

Long sequences (``q_len * k_len >= LONG_SCORES``) run the block path of
``qat.quant.attention.block`` instead: the same forward values (``Q(P) V`` is taken tile by
tile over each tile's keys in both, see ``block_attention``) without keeping the ``L x L``
score matrix for backward. It returns no attention weights, so it steps aside for dropout, for
``output_attentions`` and for a P format whose scale spans more than one row.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from qat.quant.attention.block import block_attention, tile_stops, tiled_values
from qat.quant.attention.flash import flash_applies, flash_attention

ATTN_IMPLEMENTATION = "qat"
# Score-matrix elements per (batch, head) from which the block path runs: 1024 x 1024. Below
# it the eager path's one big matmul is faster and its L x L tensors are small.
LONG_SCORES = 1 << 20


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    """Grouped-query attention: repeat each KV head ``groups`` times along the head dim."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def _use_blocks(
    mq: nn.Module | None, q_len: int, k_len: int, dropout: float, training: bool, kwargs: dict
) -> bool:
    """Whether the linear-memory block path applies (it gives the eager path's values)."""
    if q_len * k_len < LONG_SCORES or kwargs.get("output_attentions"):
        return False
    if dropout > 0 and training:  # dropout draws one mask for the whole P
        return False
    # P quantised row by row is the eager path's P only if no scale spans rows (a per-tensor
    # scale would); formats of row-local blocks are safe, others keep the eager path.
    return mq is None or not mq.p.enabled or mq.p.fmt.prefix_block is not None


def qat_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """Eager attention with quantised ``Q @ K^T`` and ``P @ V`` operands (no weights are
    returned for long sequences, see ``LONG_SCORES``)."""
    mq = getattr(module, "qat_matmul", None)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    if mq is not None:
        query, key = mq.q(query), mq.k(key)
    q_len, k_len = query.shape[-2], key.shape[-2]
    if _use_blocks(mq, q_len, k_len, dropout, module.training, kwargs):
        mask = None if attention_mask is None else attention_mask[..., :k_len]
        if mq is not None:
            value = mq.v(value)
        p = None if mq is None else mq.p
        # CUDA with a P format the Triton kernels take: the fused kernels, else the block path
        attend = flash_attention if flash_applies(query, key, value, mask, p) else block_attention
        out = attend(query, key, value, mask, scaling, p)
        return out.transpose(1, 2).contiguous(), None
    scores = torch.matmul(query, key.transpose(-1, -2))
    if scaling != 1.0:  # x * 1.0 == x: skip an L x L pass (OPT passes 1.0)
        scores = scores * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    p = None
    if mq is not None:
        p = mq.p
        probs, value = p(probs), mq.v(value)
    # Q(P) V tile by tile over each tile's keys, as the block path and its kernel take it: the
    # same numbers whichever path a sequence length picks
    mask = None if attention_mask is None else attention_mask[..., :k_len]
    stops = tile_stops(mask, q_len, k_len, p)
    out = tiled_values(probs, value, stops).transpose(1, 2).contiguous()
    return out, probs


AttentionInterface.register(ATTN_IMPLEMENTATION, qat_attention_forward)


def qat_mask(*args, **kwargs) -> Tensor | None:
    """transformers' eager mask (the full ``[batch, 1, q_len, kv_len]`` mask, no causal skip),
    kept boolean: a quarter of the float mask's bytes, which matters since the block path keeps
    it for backward. ``masked_fill`` of the dtype's minimum gives the scores that adding the
    float mask (0 or the minimum) gives; a fully masked row stays uniform either way."""
    kwargs.pop("dtype", None)
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


AttentionMaskInterface.register(ATTN_IMPLEMENTATION, qat_mask)
