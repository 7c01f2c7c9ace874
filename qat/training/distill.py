"""Distillation losses: how far the student's softened distribution is from the teacher's.

``divergence`` works on logits of any shape ``[..., vocab]`` and returns one value per row, in
float32, from ``log_softmax`` (never ``softmax`` then ``log``), multiplied by ``T^2`` so the
gradients keep their size as the temperature changes (Hinton et al.'s scaling):

- ``kl``: ``KL(teacher || student) = sum_v p_t (log p_t - log p_s)``.
- ``jsd``: ``0.5 KL(p_t || m) + 0.5 KL(p_s || m)`` with ``m = (p_t + p_s) / 2``; symmetric,
  bounded by ``log 2`` (times ``T^2``).

Both are exactly 0 when the two logits are equal (``jsd`` reads ``log m - log p`` as
``log((1 + e^d) / 2)`` of the log-ratio ``d``, which is 0 at ``d = 0`` and never overflows).

``distill_loss_sum`` picks the rows the task loss covers: for a causal LM, position ``i``'s
logits predict token ``i + 1`` and count where that (shifted) label is not -100 (masked prompt
tokens and padding stay out); for a classifier, every example. It returns the sum and the row
count as tensors, so the caller normalises as the task loss does, without a host sync (the
mask is applied with ``where``, not boolean indexing).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qat.errors import ConfigError, DataError

IGNORE_INDEX = -100  # transformers' label for "no loss here"
_LOG2 = math.log(2.0)


def divergence(
    student_logits: Tensor, teacher_logits: Tensor, kind: str = "kl", temperature: float = 1.0
) -> Tensor:
    """Per-row ``kind`` (``kl`` | ``jsd``) divergence of the softened distributions, times
    ``T^2``, in float32; shape ``student_logits.shape[:-1]``."""
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    log_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "kl":
        per_class = _plogp_ratio(log_t, log_t - log_s)
    elif kind == "jsd":
        # log p - log m = -log((1 + e^d) / 2), d = log q - log p
        per_class = 0.5 * (
            _plogp_ratio(log_t, -_log_mean_exp1(log_s - log_t))
            + _plogp_ratio(log_s, -_log_mean_exp1(log_t - log_s))
        )
    else:
        raise ConfigError(f"distill loss must be kl or jsd, got {kind!r}")
    return per_class.sum(dim=-1) * temperature**2


def _plogp_ratio(log_p: Tensor, log_ratio: Tensor) -> Tensor:
    """``p * log_ratio``, 0 where ``p`` is 0 (a class the model rules out with a -inf logit
    would otherwise give 0 * inf = nan)."""
    return torch.where(log_p > -math.inf, log_p.exp() * log_ratio, 0.0)


def _log_mean_exp1(d: Tensor) -> Tensor:
    """``log((1 + e^d) / 2)``: exactly 0 at ``d = 0``; each branch sees only the inputs it is
    stable for (clamped), so neither forward nor backward overflows."""
    pos, neg = d.clamp(min=0), d.clamp(max=0)
    return torch.where(
        d > 0, pos + torch.log1p(torch.exp(-pos)) - _LOG2, torch.log1p(0.5 * torch.expm1(neg))
    )


def distill_loss_sum(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    *,
    causal: bool,
    kind: str = "kl",
    temperature: float = 1.0,
    shift_labels: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(sum of the per-row divergence over the rows the task loss covers, their count)``.

    ``causal``: logits ``[batch, seq, vocab]``; row ``i`` counts where ``labels[:, i + 1]``
    (or ``shift_labels[:, i]``, as padding-free collators give) is not -100. Otherwise logits
    ``[batch, classes]``, every example counts."""
    if not causal:
        per_row = divergence(student_logits, teacher_logits, kind, temperature)
        # a fill on the device, not a copy from the host (which would wait for the stream)
        return per_row.sum(), torch.full((), per_row.numel(), device=per_row.device)
    if shift_labels is None:
        if labels is None:
            raise DataError(
                "distillation of a causal LM needs the batch's labels (to know "
                "which tokens the task loss covers)"
            )
        student_logits, teacher_logits = student_logits[:, :-1], teacher_logits[:, :-1]
        shift_labels = labels[:, 1:]
    mask = shift_labels.to(student_logits.device) != IGNORE_INDEX
    per_row = divergence(student_logits, teacher_logits, kind, temperature)
    return torch.where(mask, per_row, 0.0).sum(), mask.sum()
