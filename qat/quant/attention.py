"""Quantised attention registered with transformers' attention-function registry.

``quantize_model`` attaches a ``MatmulQuantizer`` as ``module.qat_matmul`` to each attention
module and switches the model to the ``"qat"`` implementation; modules without one run the
same math in float. This is eager attention with the four matmul operands fake-quantised.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

ATTN_IMPLEMENTATION = "qat"


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    """Grouped-query attention: repeat each KV head ``groups`` times along the head dim."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def qat_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Eager attention with quantised ``Q @ K^T`` and ``P @ V`` operands."""
    mq = getattr(module, "qat_matmul", None)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    if mq is not None:
        query, key = mq.q(query), mq.k(key)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    if mq is not None:
        probs, value = mq.p(probs), mq.v(value)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


AttentionInterface.register(ATTN_IMPLEMENTATION, qat_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)
