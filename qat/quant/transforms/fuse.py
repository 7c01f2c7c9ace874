"""Rotations fused into the weights (QuaRot / SpinQuant's R1 and R2): free at inference.

``fuse_rotation(model, spec)`` rewrites a float model's weights so that it computes the same
function with a rotated residual stream (``R1``, ``spec['residual']``) and, per attention
head, a rotated V/O space (``R2``, ``spec['heads']``):

1. a head tied to the token embedding is untied (it reads the stream, the embedding writes it);
2. each norm's weight (RMSNorm) or weight and shift (LayerNorm) moves into the linears that
   read its output, leaving a weight-free norm;
3. ``h -> h R1``: embedding rows ``E R1``, readers ``W R1`` (input side), writers
   ``R1^T W`` and their biases ``b R1`` (output side). A weight-free RMSNorm commutes with any
   orthogonal ``R1``; LayerNorm also subtracts the mean, which commutes with ``R1`` when
   ``R1`` maps the ones vector to itself (then the mean of ``h R1`` is that of ``h``), so for
   LayerNorm models (OPT) a Householder reflection is composed into ``R1`` to fix it;
4. per head, ``v -> v R2``: V's rows ``R2^T W_v`` (and bias), the output projection's
   columns ``W_o R2`` per head (grouped-query heads share one ``R2``).

All of it in float64, cast back to each weight's dtype: the fused float model equals the
original to float rounding. Each of ``residual`` and ``heads`` is ``{kind, size}``: one
matrix of the whole width (``size: full``) or one of ``size`` repeated down the diagonal (a
block rotation, as ``quant.rotation: {kind: hadamard, size: N}`` applies online, but fused).
Kinds: ``hadamard`` (``qat.quant.transforms.hadamard``; the order needs a matrix listed there),
``random_hadamard`` (the same with seeded random signs on the columns), ``random`` (a seeded
random orthogonal matrix; any order). The model's config records what was
fused (``qat_fused_rotation``, saved in ``config.json``): a checkpoint of a fused model is
never fused twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from qat.quant.transforms.hadamard import (
    SUPPORTED_ORDERS_TEXT,
    hadamard_matrix,
    hadamard_order_supported,
    random_orthogonal,
    random_signs,
)
from qat.quant.transforms.layout import (
    LAYERNORM_FAMILY,
    LLAMA_FAMILY,
    FuseError,
    Layout,
    check_fusable,
    head_dims,
    model_layout,
)

MARK = "qat_fused_rotation"  # config attribute (and config.json key) of a fused model
FUSED_PARTS = ("residual", "heads", "seed")


def fused_mark(spec: Mapping[str, Any]) -> dict[str, Any]:
    """What ``MARK`` records for ``spec``: the parts that changed the weights."""
    return {k: spec.get(k) for k in FUSED_PARTS} | {"folded": folds_norms(spec)}


def folds_norms(spec: Mapping[str, Any]) -> bool:
    """Norm weights move into the readers when the stream is rotated, fixed or learned."""
    return bool(spec.get("residual") or spec.get("learned"))


def rotation_matrix(part: Mapping[str, Any], n: int, seed: int, where: str) -> Tensor:
    """The float64 ``n x n`` orthogonal matrix of ``part`` (``{kind, size}``): one matrix of
    the whole width, or one of ``size`` repeated down the diagonal. FuseError naming ``where``
    when ``size`` does not divide ``n``, or when no Hadamard matrix of that order is known."""
    kind, size = part["kind"], part["size"]
    size = n if size == "full" else size
    if n % size:
        raise FuseError(f"{where}.size {size} does not divide the rotated width {n}")
    if kind == "random":
        block = random_orthogonal(size, seed)
    elif not hadamard_order_supported(size):
        raise FuseError(
            f"{where}: hadamard needs a Hadamard matrix of order {size}, which is not known here "
            f"(orders: {SUPPORTED_ORDERS_TEXT}); use random"
        )
    else:
        block = hadamard_matrix(size, torch.float64)
        if kind == "random_hadamard":
            block = block * random_signs(size, seed).unsqueeze(0)
    return block if size == n else torch.block_diag(*[block] * (n // size))


def fixing_ones(r: Tensor) -> Tensor:
    """``P r`` with ``P`` the Householder reflection taking ``r u`` back to ``u`` (``u`` the
    unit ones vector), so the result maps ``u`` to itself: a zero-mean row stays zero-mean."""
    n = r.shape[0]
    u = torch.full((n,), n**-0.5, dtype=r.dtype)
    v = r @ u - u
    norm = v.norm()
    if norm < 1e-12:
        return r
    v = v / norm
    return r - 2 * torch.outer(v, v @ r)


def check_fused_spec(config: Any, spec: Mapping[str, Any]) -> None:
    """Everything the config alone decides: the architecture, then the orders of the widths
    a Hadamard rotation needs (before any weight loads)."""
    check_fusable(config)
    if spec.get("learned") and config.model_type in LAYERNORM_FAMILY:
        raise FuseError(
            "quant.rotation.learned: learned transforms are implemented for RMSNorm decoders "
            f"({', '.join(LLAMA_FAMILY)}); {config.model_type}'s LayerNorm would need every "
            "learned rotation to keep the ones vector fixed"
        )
    hidden, _, _, hd = head_dims(config)
    for key, n in (("residual", hidden), ("heads", hd)):
        part = spec.get(key)
        if part is not None and (part["kind"] != "random" or part["size"] != "full"):
            rotation_matrix(part, n, 0, f"quant.rotation.{key}")


def fuse_rotation(model: nn.Module, spec: Mapping[str, Any]) -> Layout:
    """Fuse ``spec``'s rotations into ``model``'s weights in place (a weightless meta model is
    only checked); returns its layout. A model whose config already records the same fusion
    is left as it is; one fused otherwise is refused.

    >>> import torch, transformers
    >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96,
    ...                                   num_hidden_layers=1, num_attention_heads=3)
    >>> model = transformers.LlamaForCausalLM(config).eval()
    >>> ids = torch.tensor([[1, 5, 9]])
    >>> before = model(ids).logits
    >>> full = {"kind": "hadamard", "size": "full"}
    >>> _ = fuse_rotation(model, {"residual": full, "heads": full, "seed": 0})
    >>> bool(torch.allclose(model(ids).logits, before, atol=1e-5))  # 48 = 12 x 4
    True"""
    config = model.config
    check_fused_spec(config, spec)
    layout = model_layout(model)
    want = fused_mark(spec)
    have = getattr(config, MARK, None)
    if have is not None:
        if dict(have) != want:
            raise FuseError(
                f"quant.rotation: the model's weights are already fused with {dict(have)}; "
                f"they cannot be fused again with {want}"
            )
        return layout
    if next(model.parameters()).is_meta:
        return layout
    seed = int(spec.get("seed") or 0)
    with torch.no_grad():
        if want["folded"]:
            _untie(model, layout)
            _fold_norms(layout)
        if spec.get("residual"):
            where = "quant.rotation.residual"
            r1 = rotation_matrix(spec["residual"], layout.hidden, seed, where)
            _rotate_residual(layout, fixing_ones(r1) if layout.norm == "layer" else r1)
        if spec.get("heads"):
            r2 = rotation_matrix(spec["heads"], layout.head_dim, seed + 1, "quant.rotation.heads")
            for block in layout.blocks:
                rotate_heads(block, r2)
    setattr(config, MARK, want)
    return layout


def _set(p: nn.Parameter, value: Tensor) -> None:
    p.data.copy_(value.to(p.dtype))


def _untie(model: nn.Module, layout: Layout) -> None:
    """Give each stream-reading head tied to an embedding its own copy of the weight."""
    untied = False
    for head, emb in layout.tied:
        if head in layout.final_readers:
            head.weight = nn.Parameter(emb.weight.detach().clone(), emb.weight.requires_grad)
            untied = True
    if untied:
        model.config.tie_word_embeddings = False
        text = getattr(model.config, "get_text_config", lambda: None)()
        if text is not None and text is not model.config:
            text.tie_word_embeddings = False


def _fold_norms(layout: Layout) -> None:
    pairs = [(b.attn_norm, b.attn_readers) for b in layout.blocks]
    pairs += [(b.mlp_norm, b.mlp_readers) for b in layout.blocks]
    pairs.append((layout.final_norm, layout.final_readers))
    for norm, readers in pairs:
        fold_norm(norm, readers)


def fold_norm(norm: nn.Module, readers: list[nn.Module]) -> None:
    """Move ``norm``'s weight (and a LayerNorm's shift) into ``readers``' input side, leaving
    weight 1: into the readers' biases when each has one, else kept in the norm as
    ``shift / weight`` (rotated with the stream later)."""
    weight = getattr(norm, "weight", None)  # None also for no norm at all
    if weight is None:
        return
    w = weight.double()
    shift = getattr(norm, "bias", None)
    into_bias = shift is not None and all(lin.bias is not None for lin in readers)
    if shift is not None and not into_bias and (w == 0).any():
        raise FuseError(
            "quant.rotation: a LayerNorm with a zero weight and a shift feeds a linear "
            "without bias; its shift cannot be fused"
        )
    for lin in readers:
        if into_bias:  # W (x w + b) + c = (W diag w) x + (W b + c)
            _set(lin.bias, lin.bias.double() + lin.weight.double() @ shift.double())
        _set(lin.weight, lin.weight.double() * w.unsqueeze(0))
    if shift is not None:
        _set(shift, torch.zeros_like(w) if into_bias else shift.double() / w)
    _set(weight, torch.ones_like(w))


def _rotate_residual(layout: Layout, r: Tensor) -> None:
    for emb in layout.embeddings:
        _set(emb.weight, emb.weight.double() @ r)
    writers = layout.writers_in + [m for b in layout.blocks for m in (b.o_proj, b.mlp_writer)]
    for lin in writers:
        _set(lin.weight, r.T @ lin.weight.double())
        if lin.bias is not None:
            _set(lin.bias, lin.bias.double() @ r)
    norms = [layout.final_norm] + [n for b in layout.blocks for n in (b.attn_norm, b.mlp_norm)]
    norms = [n for n in norms if n is not None]
    for norm in norms:  # a LayerNorm's kept shift lives in stream coordinates
        shift = getattr(norm, "bias", None)
        if shift is not None:
            _set(shift, shift.double() @ r)
    readers = [m for b in layout.blocks for m in b.attn_readers + b.mlp_readers]
    for lin in readers + layout.final_readers:
        _set(lin.weight, lin.weight.double() @ r)


def rotate_heads(block: Any, r: Tensor) -> None:
    """``v -> v r`` per head: V's output rows and the output projection's input columns."""
    v, o = block.v_proj, block.o_proj
    hd = r.shape[0]
    wv = v.weight.double().reshape(-1, hd, v.weight.shape[1])  # [kv_heads, hd, in]
    _set(v.weight, torch.einsum("ji,hjk->hik", r, wv).reshape(v.weight.shape))
    if v.bias is not None:
        _set(v.bias, (v.bias.double().reshape(-1, hd) @ r).reshape(-1))
    wo = o.weight.double().reshape(o.weight.shape[0], -1, hd)  # [out, heads, hd]
    _set(o.weight, (wo @ r).reshape(o.weight.shape))
