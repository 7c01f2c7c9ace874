"""Which modules read and write a decoder's residual stream: what a fused rotation needs.

A rotation ``R`` of the residual stream is free in float when every module that writes the
stream (embeddings, the attention output projection, the MLP's down projection) has ``R``
folded into its output side and every module that reads it has ``R^T`` folded into its input
side. Reads go through a norm first, so the norm must commute with ``R``: RMSNorm without its
weight does (``||x R|| = ||x||``); its weight is folded into the next linears. LayerNorm also
subtracts the mean, which commutes with ``R`` when ``R`` maps the ones vector to itself
(``qat.quant.transforms.fuse`` composes a reflection into ``R`` that makes it so).

``model_layout`` reads the modules of the architectures known here: Llama-family decoders
(``llama``, ``mistral``, ``qwen2``: pre-norm RMSNorm) and OPT with ``do_layer_norm_before``
(pre-norm LayerNorm). ``check_fusable`` refuses the others from the config alone, in one
line saying why: post-norm models (BERT and its kin, OPT-350m) normalise the stream itself,
so the norm's scale and shift cannot move into the next linears.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from qat.errors import ConfigError

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
LAYERNORM_FAMILY = ("opt",)
FUSABLE = LLAMA_FAMILY + LAYERNORM_FAMILY
POST_NORM = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2")
HEADS = ("lm_head", "score")  # what reads the final norm's output


class FuseError(ConfigError):
    """A fused rotation asked of a model it cannot be fused into; the message says why."""


@dataclasses.dataclass
class Block:
    """One decoder layer: the norm before attention and the linears reading its output, V and
    the output projection, the norm before the MLP, its readers and its writer."""

    attn_norm: nn.Module
    attn_readers: list[nn.Module]  # q, k, v
    v_proj: nn.Module
    o_proj: nn.Module
    mlp_norm: nn.Module
    mlp_readers: list[nn.Module]  # gate, up (fc1)
    mlp_writer: nn.Module  # down (fc2)
    attention: nn.Module


@dataclasses.dataclass
class Layout:
    """A model's residual stream: who writes it, who reads it, through which norms."""

    norm: str  # "rms" or "layer"
    embeddings: list[nn.Embedding]  # rows added to the stream (tokens, positions)
    writers_in: list[nn.Module]  # linears writing the stream before the layers (project_in)
    blocks: list[Block]
    final_norm: nn.Module | None  # None: the head reads the stream itself (some OPTs)
    final_readers: list[nn.Module]  # lm_head / score, or OPT's project_out
    tied: list[tuple[nn.Module, nn.Embedding]]  # (head, embedding) sharing one weight
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def _text_config(config: Any) -> Any:
    return getattr(config, "get_text_config", lambda: config)()


def check_fusable(config: Any) -> None:
    """Refuse, from the config alone, an architecture no fused rotation fits (one line)."""
    cfg = _text_config(config)
    mt = getattr(cfg, "model_type", None)
    if mt in POST_NORM or (mt == "opt" and not getattr(cfg, "do_layer_norm_before", True)):
        raise FuseError(
            f"quant.rotation: {mt} is a post-norm model (LayerNorm after the residual add): "
            "its scale and shift act on the residual stream itself, so they cannot be folded "
            "into the next linears and no rotation of the stream can be fused; use the "
            "online form {kind: hadamard, size: N}"
        )
    if mt not in FUSABLE:
        raise FuseError(
            f"quant.rotation: fused rotations know the layouts of {', '.join(FUSABLE)} "
            f"(pre-norm OPT); {mt!r} is not one of them; use the online form "
            "{kind: hadamard, size: N}"
        )


def head_dims(config: Any) -> tuple[int, int, int, int]:
    """``(hidden, num_heads, num_kv_heads, head_dim)`` from a config."""
    cfg = _text_config(config)
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.hidden_size, heads, kv, hd


def _heads(model: nn.Module) -> list[nn.Module]:
    return [getattr(model, n) for n in HEADS if isinstance(getattr(model, n, None), nn.Module)]


def model_layout(model: nn.Module) -> Layout:
    """The residual-stream layout of ``model`` (a ``*ForCausalLM`` or
    ``*ForSequenceClassification`` of a fusable architecture, or its base model)."""
    config = getattr(model, "config", None)
    check_fusable(config)
    hidden, heads, kv, hd = head_dims(config)
    base = getattr(model, "model", model)
    if config.model_type == "opt":
        return _opt_layout(model, getattr(base, "decoder", base), hidden, heads, hd)
    blocks = [
        Block(
            attn_norm=layer.input_layernorm,
            attn_readers=[layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
            v_proj=layer.self_attn.v_proj,
            o_proj=layer.self_attn.o_proj,
            mlp_norm=layer.post_attention_layernorm,
            mlp_readers=[layer.mlp.gate_proj, layer.mlp.up_proj],
            mlp_writer=layer.mlp.down_proj,
            attention=layer.self_attn,
        )
        for layer in base.layers
    ]
    head = _heads(model)
    tied = [(h, base.embed_tokens) for h in head if h.weight is base.embed_tokens.weight]
    return Layout(
        "rms", [base.embed_tokens], [], blocks, base.norm, head, tied, hidden, heads, kv, hd
    )


def _opt_layout(model: nn.Module, dec: nn.Module, hidden: int, heads: int, hd: int) -> Layout:
    blocks = [
        Block(
            attn_norm=layer.self_attn_layer_norm,
            attn_readers=[layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
            v_proj=layer.self_attn.v_proj,
            o_proj=layer.self_attn.out_proj,
            mlp_norm=layer.final_layer_norm,
            mlp_readers=[layer.fc1],
            mlp_writer=layer.fc2,
            attention=layer.self_attn,
        )
        for layer in dec.layers
    ]
    head = _heads(model)
    tied = [(h, dec.embed_tokens) for h in head if h.weight is dec.embed_tokens.weight]
    if dec.project_in is not None:  # the token embedding is not on the stream: project_in is
        embeddings, writers_in = [dec.embed_positions], [dec.project_in]
    else:
        embeddings, writers_in = [dec.embed_tokens, dec.embed_positions], []
    readers = [dec.project_out] if dec.project_out is not None else head
    return Layout(
        "layer",
        embeddings,
        writers_in,
        blocks,
        dec.final_layer_norm,
        readers,
        tied,
        hidden,
        heads,
        heads,
        hd,
    )
