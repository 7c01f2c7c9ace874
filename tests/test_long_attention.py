"""The block path of the quantised attention (long sequences): the eager path's values and
gradients, in memory linear in the sequence length."""

import pytest
import torch
from tiny import ARCHS, tiny_batch, tiny_model
from tiny import BFP4 as W4

import qat.quant.attention as attention
import qat.quant.block_attention as block
from qat import QuantConfig, quantize_model
from qat.formats import make_format
from qat.quant.modules import MatmulQuantizer

ROWS = 6  # query rows per block in these tests: 20- and 23-token sequences end on a ragged one


@pytest.fixture()
def blocks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Switch the block path on for any length, with ROWS rows per block; the returned list
    counts the block-path calls."""
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        return block.block_attention(*args, **kwargs)

    monkeypatch.setattr(attention, "block_attention", counted)
    monkeypatch.setattr(block, "BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(block, "MIN_ROWS", ROWS)
    return calls


def _step(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and parameter gradients of one forward/backward (eval mode: no dropout)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def _assert_same(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    # Forward values are the eager path's bit for bit; a gradient that flows through K or V
    # sums over query blocks in another order: float32 rounding, relative to the tensor's scale.
    tol = 1e-5 * max(1.0, float(a.abs().max()))
    assert torch.allclose(a, b, rtol=1e-5, atol=tol), (name, float((a - b).abs().max()))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("seq", [20, 23])
def test_block_path_equals_eager_path(arch, seq, blocks, monkeypatch):
    model = tiny_model(arch)
    quantize_model(model, QuantConfig(weight=W4, activation=W4, matmul=W4))
    batch = tiny_batch(seq=seq)  # one row padded: padding mask, plus causal for the decoders
    monkeypatch.setattr(attention, "LONG_SCORES", 1 << 60)
    ref_logits, ref_grads = _step(model, batch)
    assert not blocks
    monkeypatch.setattr(attention, "LONG_SCORES", 0)
    got_logits, got_grads = _step(model, batch)
    assert len(blocks) == 2  # both layers ran the block path
    assert torch.equal(got_logits, ref_logits)
    assert got_grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        _assert_same(got_grads[name], g, name)


class _Attn(torch.nn.Module):
    """What transformers hands the attention function: a module with ``qat_matmul``."""

    def __init__(self, fmt_spec: dict, groups: int = 1) -> None:
        super().__init__()
        self.qat_matmul = MatmulQuantizer(make_format(fmt_spec), backend="reference")
        self.num_key_value_groups = groups


def _qkv(seq: int, heads: int = 4, kv_heads: int = 4, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, seq, dim, generator=g).requires_grad_()
    k = torch.randn(2, kv_heads, seq, dim, generator=g).requires_grad_()
    v = torch.randn(2, kv_heads, seq, dim, generator=g).requires_grad_()
    return q, k, v


def _masks(seq: int) -> dict[str, torch.Tensor | None]:
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    keep = causal[None, None].repeat(2, 1, 1, 1)
    keep[1, :, :, seq - 5:] = False  # padded keys in the second sequence
    keep[1, :, seq - 5:, 0] = True  # (padded query rows still see one key, as transformers does)
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    return {"none": None, "bool": keep, "additive": additive,
            "broadcast_row": additive[:, :, -1:, :]}


def _run(module, q, k, v, mask, **kwargs):
    out, probs = attention.qat_attention_forward(module, q, k, v, mask, scaling=0.3, **kwargs)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return out.detach(), probs, grads


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "broadcast_row"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_function_equals_eager_under_masks_and_gqa(mask_kind, kv_heads, blocks, monkeypatch):
    seq = 23
    module = _Attn({**W4, "block_size": 8}, groups=4 // kv_heads)
    q, k, v = _qkv(seq, kv_heads=kv_heads)
    mask = _masks(seq)[mask_kind]
    monkeypatch.setattr(attention, "LONG_SCORES", 1 << 60)
    ref, ref_probs, ref_grads = _run(module, q, k, v, mask)
    monkeypatch.setattr(attention, "LONG_SCORES", 0)
    got, probs, grads = _run(module, q, k, v, mask)
    assert ref_probs is not None and probs is None and len(blocks) == 1
    assert torch.equal(got, ref)
    assert torch.equal(grads[0], ref_grads[0])  # dQ: each block's own rows, no cross-block sum
    for name, g, r in zip("kv", grads[1:], ref_grads[1:]):
        _assert_same(g, r, name)


def test_float_p_and_disabled_quantisers_take_the_block_path_too(blocks, monkeypatch):
    seq = 20
    q, k, v = _qkv(seq)
    for module in (torch.nn.Module(), _Attn(W4)):  # no qat_matmul: float attention
        for m in module.modules():
            if hasattr(m, "enabled"):
                m.enabled = False
        monkeypatch.setattr(attention, "LONG_SCORES", 1 << 60)
        ref, _, ref_grads = _run(module, q, k, v, _masks(seq)["additive"])
        monkeypatch.setattr(attention, "LONG_SCORES", 0)
        got, _, grads = _run(module, q, k, v, _masks(seq)["additive"])
        assert torch.equal(got, ref)
        for g, r in zip(grads, ref_grads):
            _assert_same(g, r, "grad")
    assert len(blocks) == 2


@pytest.mark.parametrize("case", ["dropout", "output_attentions", "row_scale_format"])
def test_falls_back_to_eager_where_blocks_would_change_the_result(case, blocks, monkeypatch):
    monkeypatch.setattr(attention, "LONG_SCORES", 0)
    spec = {"format": "int", "width": 8} if case == "row_scale_format" else W4
    module = _Attn(spec)
    assert case != "row_scale_format" or module.qat_matmul.p.fmt.independent_block is None
    q, k, v = _qkv(20)
    kwargs = {"dropout": 0.1} if case == "dropout" else {}
    if case == "output_attentions":
        kwargs["output_attentions"] = True
    _, probs, _ = _run(module, q, k, v, None, **kwargs)
    assert probs is not None and not blocks


def _saved_bytes(seq: int) -> int:
    """Bytes autograd saves for backward in one quantised attention call of ``seq`` tokens."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    q, k, v = _qkv(seq, heads=2, kv_heads=2, dim=8)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = attention.qat_attention_forward(_Attn(W4), q, k, v, None)
    out.sum().backward()
    return sum(seen.values())


def test_saved_memory_grows_linearly_with_length(blocks, monkeypatch):
    monkeypatch.setattr(attention, "LONG_SCORES", 1 << 60)
    eager = _saved_bytes(256), _saved_bytes(512)
    monkeypatch.setattr(attention, "LONG_SCORES", 0)
    monkeypatch.setattr(block, "MIN_ROWS", 64)
    lean = _saved_bytes(256), _saved_bytes(512)
    assert eager[1] / eager[0] > 3.5  # the eager path keeps P and Q(P): quadratic
    assert lean[1] / lean[0] == pytest.approx(2.0, rel=0.05)
    # what it keeps is Q(Q), Q(K), Q(V): 3 x batch x heads x seq x dim float32
    assert lean[1] == 3 * 2 * 2 * 512 * 8 * 4
    assert lean[1] < eager[1] / 20


def test_block_path_equals_eager_under_bf16_autocast(blocks, monkeypatch):
    # the backward recomputes each block under the forward's autocast state, so the
    # recomputed P is the forward's (float32 q, k, v; bf16 matmuls)
    seq = 23
    module = _Attn(W4)
    q, k, v = _qkv(seq)
    mask = _masks(seq)["additive"]
    results = []
    for threshold in (1 << 60, 0):
        monkeypatch.setattr(attention, "LONG_SCORES", threshold)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = attention.qat_attention_forward(module, q, k, v, mask, scaling=0.3)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        results.append((out.detach(), [t.grad.clone() for t in (q, k, v)]))
        for t in (q, k, v):
            t.grad = None
    (ref, ref_grads), (got, grads) = results
    assert len(blocks) == 1
    assert torch.equal(got, ref)
    assert torch.equal(grads[0], ref_grads[0])
    for name, g, r in zip("kv", grads[1:], ref_grads[1:]):
        # bf16 products summed over blocks in float32 vs one bf16 matmul: bf16 rounding
        assert torch.allclose(g, r, rtol=1e-2, atol=1e-2 * float(r.abs().max())), name


def test_block_path_never_syncs_with_the_host(blocks, monkeypatch):
    from test_no_sync import no_host_sync

    monkeypatch.setattr(attention, "LONG_SCORES", 0)
    module = _Attn(W4, groups=2)
    q, k, v = _qkv(23, kv_heads=2)
    attention.qat_attention_forward(module, q, k, v, _masks(23)["bool"])  # warm-up
    with no_host_sync():
        out, _ = attention.qat_attention_forward(module, q, k, v, _masks(23)["bool"])
        out.sum().backward()
    assert len(blocks) == 2 and all(t.grad is not None for t in (q, k, v))


@pytest.mark.parametrize("arch", ARCHS)
def test_boolean_mask_gives_the_float_masks_values_and_gradients(arch):
    # the "qat" mask is transformers' eager mask kept boolean; the float one gave the same
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    model = tiny_model(arch)
    quantize_model(model, QuantConfig(weight=W4, activation=W4, matmul=W4))
    batch = tiny_batch()
    got_logits, got_grads = _step(model, batch)
    AttentionMaskInterface.register(attention.ATTN_IMPLEMENTATION, eager_mask)
    try:
        ref_logits, ref_grads = _step(model, batch)
    finally:
        AttentionMaskInterface.register(attention.ATTN_IMPLEMENTATION, attention.qat_mask)
    assert torch.equal(got_logits, ref_logits)
    for name, g in ref_grads.items():
        assert torch.equal(got_grads[name], g), name
