"""QDEC: dynamic error compensation of quantised linears at inference (DecDEC, arXiv 2412.20185).

For every ``QuantLinear`` (or GPT-2 ``QuantConv1D``) with a weight quantiser, the residual
``R = W - Q(W)`` is computed once with the model's own weight quantiser and quantised to
``residual_bits`` (symmetric, one scale per output channel, scale by an MSE grid search over
fractions of the row's max |R|).
At inference each layer adds ``R_hat[:, S] @ x[S]`` to its output, ``S`` being the ``k`` input
channels of largest |x| (``x`` as the layer multiplies it: after its input quantiser, so that
``k = d_in`` gives exactly the layer with weight ``Q(W) + R_hat``).

``k = round(k_chunk * d_in / 1024)``, Python's ``round`` (half to even), clamped to
``[0, d_in]``; ``k_chunk = 1024`` is every channel, ``0`` none.

Which channels, for an input ``[..., T, d_in]`` (every leading dim a sequence, ``T`` tokens of
the step; a 2-D input is one token per row):

- decode, ``T == 1``: per token, exactly as the paper (top-k of that token's |x|).
- several tokens per sequence (prefill), ``prefill: step`` (the default): per sequence, the
  top-k of ``max over the step's tokens of |x|``; that one set ``S`` serves every token of the
  sequence, so one gather of ``k`` residual columns per sequence and step.
- ``prefill: token``: per token, as if each token were decoded alone (what ``qat perplexity``
  uses unless told otherwise, so perplexity measures decode-time quality). Computed densely
  (mask the unselected channels, multiply by the whole ``R_hat``): an evaluation mode, it moves
  all of ``R_hat`` to the model's device for the call.

Where the residual lives: ``residual_device: cpu`` keeps the int8 codes and fp32 scales in CPU
memory (pinned once the model runs on CUDA); only the ``k`` selected columns (and the scales)
are copied to the model's device, ``non_blocking``, from a pinned staging buffer.
``residual_device: same`` moves them to the model's device on first use (no host sync; more
device memory). Nothing is registered as a parameter or buffer: ``model.to()``,
``state_dict()`` and optimisers never see the residual. Codes are stored as int8 (not packed),
transposed to ``[d_in, d_out]`` so that a selected input channel is one contiguous row.

QDEC is inference-only: a forward under grad mode raises ``QDECError`` (run under
``torch.no_grad()`` / ``torch.inference_mode()``, as ``generate`` and evaluation do, or
``detach_qdec`` first), so it can never leak into training.

This module is the entry the commands call, ``apply_qdec``; the rest is one job per module of
``qat.quant.qdec``: ``config`` (the ``qdec:`` section), ``residual`` (the residual's maths and
storage), ``attach`` (hooks on a model) and ``files`` (save and load).
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from qat.quant.qdec.attach import attach_qdec
from qat.quant.qdec.config import QDECConfig
from qat.quant.qdec.files import has_saved_qdec, load_qdec, qdec_fingerprint, read_qdec_meta

logger = logging.getLogger(__name__)


def apply_qdec(
    model: nn.Module, config: QDECConfig | None, model_dir: str | Path | None
) -> QDECConfig | None:
    """What the commands do: residuals saved in ``model_dir`` (by ``save_qdec``, same
    ``residual_bits``) are loaded, others computed; a saved QDEC is used even without a
    ``qdec`` section (with its saved settings). Returns the config in use (None: no QDEC)."""
    saved = model_dir is not None and has_saved_qdec(model_dir)
    if saved:
        meta = read_qdec_meta(model_dir)
        if meta.get("fingerprint") != qdec_fingerprint(model):
            # a retrained model or another quantiser: those residuals would be wrong
            logger.warning(
                "%s: the saved QDEC residuals belong to other weights or another "
                "weight quantiser; recomputing them",
                model_dir,
            )
            config = config if config is not None else QDECConfig.from_dict(meta["config"])
        elif config is None or config.residual_bits == meta["config"].get("residual_bits"):
            load_qdec(model, model_dir, config)
            return model.qdec_config
    if config is None:
        return None
    attach_qdec(model, config)
    return config
