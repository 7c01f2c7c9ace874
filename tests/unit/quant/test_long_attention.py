"""The block path of the quantised attention (long sequences): the eager path's values and
gradients, in memory linear in the sequence length."""

import pytest
import torch
from tiny import ARCHS, tiny_batch, tiny_model
from tiny import BFP4 as W4

import qat.quant.attention.block as block
import qat.quant.attention.cpu as cpu_attention
import qat.quant.attention.interface as attention
from qat import QuantConfig, quantize_model
from qat.formats import make_format
from qat.quant.modules import MatmulQuantizer

ROWS = 6  # query rows per block in these tests: 20- and 23-token sequences end on a ragged one


@pytest.fixture(params=["kernel", "torch"])
def block_impl(request, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which implementation of the block path runs on these float32 CPU tensors: the fused
    C++ kernel (qat.quant.attention.cpu) or the PyTorch one ($QAT_CPU_ATTENTION=0)."""
    if request.param == "torch":
        monkeypatch.setenv(cpu_attention.ENV, "0")
    else:
        monkeypatch.delenv(cpu_attention.ENV, raising=False)
        assert cpu_attention.load(), "the CPU attention kernel did not build"
        # its once-per-process self-check runs at the first kernel call: run it here, so a
        # test that counts what one call saves or allocates does not count the check's too
        assert block.kernel_agrees()
    return request.param


def _blocks_on(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        return block.block_attention(*args, **kwargs)

    monkeypatch.setattr(attention, "block_attention", counted)
    monkeypatch.setattr(block, "BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(block, "TILE_ROWS", ROWS)
    return calls


@pytest.fixture()
def blocks(monkeypatch: pytest.MonkeyPatch, block_impl: str) -> list[int]:
    """Switch the block path on for any length, with ROWS rows per block (by either
    implementation, ``block_impl``); the returned list counts the block-path calls."""
    return _blocks_on(monkeypatch)


@pytest.fixture()
def torch_blocks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``blocks`` by the PyTorch implementation only: for tests that watch its P quantiser
    (the kernel quantises P inside; tests/unit/quant/test_cpu_attention.py checks its Q(P))."""
    monkeypatch.setenv(cpu_attention.ENV, "0")
    return _blocks_on(monkeypatch)


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
    keep[1, :, :, seq - 5 :] = False  # padded keys in the second sequence
    keep[1, :, seq - 5 :, 0] = True  # (padded query rows still see one key, as transformers does)
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    return {
        "none": None,
        "bool": keep,
        "additive": additive,
        "broadcast_row": additive[:, :, -1:, :],
    }


def _run(module, q, k, v, mask, **kwargs):
    out, probs = attention.qat_attention_forward(module, q, k, v, mask, scaling=0.3, **kwargs)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return out.detach(), probs, grads


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "broadcast_row"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_function_equals_eager_under_masks_and_gqa(
    mask_kind, kv_heads, blocks, block_impl, monkeypatch
):
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
    if block_impl == "torch":  # dQ: each block's own rows, no cross-block sum
        assert torch.equal(grads[0], ref_grads[0])
    else:  # the kernel's one GEMM per head, whose summation order BLAS picks by thread count
        _assert_same(grads[0], ref_grads[0], "q")
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


def test_saved_memory_grows_linearly_with_length(blocks, block_impl, monkeypatch):
    monkeypatch.setattr(attention, "LONG_SCORES", 1 << 60)
    eager = _saved_bytes(256), _saved_bytes(512)
    monkeypatch.setattr(attention, "LONG_SCORES", 0)
    monkeypatch.setattr(block, "TILE_ROWS", 64)
    lean = _saved_bytes(256), _saved_bytes(512)
    assert eager[1] / eager[0] > 3.5  # the eager path keeps P and Q(P): quadratic
    assert lean[1] / lean[0] == pytest.approx(2.0, rel=0.05)
    # what it keeps is Q(Q), Q(K), Q(V): 3 x batch x heads x seq x dim float32; the kernel
    # also each row's softmax max and 1 / sum (float32) and the key count of each block of 64
    # query rows (int64)
    extra = 2 * 2 * 512 * 2 * 4 + 512 // 64 * 8 if block_impl == "kernel" else 0
    assert lean[1] == 3 * 2 * 2 * 512 * 8 * 4 + extra
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
    # the CPU path reads the mask's extent on the host (free there); a device where that
    # read would sync keeps whole rows, as here
    monkeypatch.setattr(block, "HOST_READ_DEVICES", frozenset())
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


# --- masked key tails: a query block computes only the keys its rows see ----------------------
#
# A tail's P is exactly 0, and Q(P) on the kept keys is the eager path's bit for bit; the sums
# over keys (Q(P) V, dS K, dS^T Q) run over fewer terms, which BLAS may group differently: the
# outputs and gradients are the eager path's up to float32 rounding (``_assert_same``).

TAIL_ROWS = 16  # rows per block in these tests: lengths 37, 61, 70, 130, 200 end ragged


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("seq", [37, 61])
def test_blocks_that_skip_masked_key_tails_match_the_eager_path(arch, seq, blocks, monkeypatch):
    monkeypatch.setattr(block, "TILE_ROWS", TAIL_ROWS)
    # 16 keys: still a whole AVX-512 vector of the softmax, and short enough for these lengths
    monkeypatch.setattr(block, "MIN_KEYS", 16)
    model = tiny_model(arch)
    quantize_model(model, QuantConfig(weight=W4, activation=W4, matmul=W4))
    batch = tiny_batch(seq=seq)
    monkeypatch.setattr(attention, "LONG_SCORES", 1 << 60)
    ref_logits, ref_grads = _step(model, batch)
    monkeypatch.setattr(attention, "LONG_SCORES", 0)
    got_logits, got_grads = _step(model, batch)
    assert len(blocks) == 2
    _assert_same(got_logits, ref_logits, "logits")
    assert got_grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        _assert_same(got_grads[name], g, name)


def _block_probs(module: torch.nn.Module, seen: list[torch.Tensor]):
    """Record what the P quantiser returns (one tensor per block and pass)."""
    return module.qat_matmul.p.register_forward_hook(lambda m, a, out: seen.append(out))


@pytest.mark.parametrize("seq", [37, 70, 130])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "broadcast_row"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_key_tails_under_masks_and_gqa(seq, mask_kind, kv_heads, torch_blocks, monkeypatch):
    monkeypatch.setattr(block, "TILE_ROWS", TAIL_ROWS)
    module = _Attn({**W4, "block_size": 8}, groups=4 // kv_heads)
    q, k, v = _qkv(seq, kv_heads=kv_heads, seed=seq)
    mask = _masks(seq)[mask_kind]
    monkeypatch.setattr(attention, "LONG_SCORES", 1 << 60)
    ref, ref_probs, ref_grads = _run(module, q, k, v, mask)
    monkeypatch.setattr(attention, "LONG_SCORES", 0)
    seen: list[torch.Tensor] = []
    hook = _block_probs(module, seen)
    try:
        got, _, grads = _run(module, q, k, v, mask)
    finally:
        hook.remove()
    assert len(torch_blocks) == 1
    _assert_same(got, ref, "out")
    for name, g, r in zip("qkv", grads, ref_grads):
        _assert_same(g, r, name)
    # Q(P) of each block: the eager Q(P)'s rows and first keys bit for bit, and 0 past them
    # (the last block reaches back to compute TAIL_ROWS rows, see block.spans)
    spans = block.spans(seq, TAIL_ROWS)
    assert spans[-1][0] == seq - TAIL_ROWS < spans[-1][1]
    assert len(seen) == 2 * len(spans)  # forward, then the backward's recompute
    for (first, _, stop), p, again in zip(spans, seen, seen[len(spans) :]):
        rows = ref_probs[..., first:stop, :]
        assert torch.equal(p, rows[..., : p.shape[-1]]) and torch.equal(again, p)
        assert not rows[..., p.shape[-1] :].any()
    if mask_kind in ("bool", "additive") and seq > 70:
        assert min(p.shape[-1] for p in seen) < seq  # some block skipped a tail


def _p_lengths(module: torch.nn.Module, seq: int, mask: torch.Tensor | None) -> list[int]:
    """Key lengths of the P blocks that the P quantiser sees in one forward and backward."""
    seen: list[torch.Tensor] = []
    hook = _block_probs(module, seen)
    try:
        _run(module, *_qkv(seq), mask)
    finally:
        hook.remove()
    return [p.shape[-1] for p in seen]


CAUSAL_200 = torch.ones(200, 200, dtype=torch.bool).tril()[None, None]
# 200 rows in blocks of 16: block i sees keys up to 16 (i + 1), at least MIN_KEYS = 64
SEEN_200 = [64, 64, 64, 64, 80, 96, 112, 128, 144, 160, 176, 192, 200]


@pytest.mark.parametrize(
    "block_size,want",
    [
        (16, SEEN_200),
        (8, SEEN_200),
        (32, [64, 64, 64, 64, 96, 96, 128, 128, 160, 160, 192, 192, 200]),
    ],
)
def test_causal_blocks_compute_only_the_keys_they_see(block_size, want, torch_blocks, monkeypatch):
    # rounded up to whole blocks of P's format; the forward and the backward's recompute each
    # see every block once
    monkeypatch.setattr(attention, "LONG_SCORES", 0)
    monkeypatch.setattr(block, "TILE_ROWS", TAIL_ROWS)
    module = _Attn({**W4, "block_size": block_size})
    assert block.MIN_KEYS == 64
    assert _p_lengths(module, 200, CAUSAL_200) == want + want
    # a mask the block path may not read on the host (an accelerator's): whole rows
    monkeypatch.setattr(block, "HOST_READ_DEVICES", frozenset())
    assert _p_lengths(module, 200, CAUSAL_200) == [200] * 26


def test_key_tails_are_kept_where_a_row_sees_no_key_or_p_blocks_are_unknown(
    torch_blocks, monkeypatch
):
    monkeypatch.setattr(attention, "LONG_SCORES", 0)
    monkeypatch.setattr(block, "TILE_ROWS", TAIL_ROWS)
    mask = CAUSAL_200.repeat(2, 1, 1, 1)
    mask[1, :, 20:40] = False  # rows 20-39 of the second sequence see nothing: uniform P
    want = [64, 200, 200] + SEEN_200[3:]
    assert _p_lengths(_Attn(W4), 200, mask) == want + want
    # a P quantiser whose blocks the block path cannot know: whole rows
    assert block.p_block_size(lambda p: p) is None
    assert block.key_stops(CAUSAL_200, 200, 200, 16, None) is None


def test_key_stops_by_hand(monkeypatch):
    assert block.key_stops(CAUSAL_200, 200, 200, 16, 16) == SEEN_200
    monkeypatch.setattr(block, "MIN_KEYS", 1)
    k = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 0, 0, 0, 1, 0, 0],
            [0, 0, 0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert block.key_stops(k, 5, 7, 2, 1) == [2, 5, 7]  # last block: a row that sees nothing
    assert block.key_stops(k, 5, 7, 2, 2) == [2, 6, 7]
    assert block.key_stops(k, 5, 7, 2, 4) == [4, 7, 7]
    assert block.key_stops(k[:4], 4, 7, 3, 1) == [3, 5]
    additive = torch.zeros(5, 7).masked_fill(~k, torch.finfo(torch.float32).min)
    assert block.key_stops(additive[None, None, :4], 4, 7, 2, 1) == [2, 5]
    additive[3, 4] = float("-inf")  # -inf masks too
    assert block.key_stops(additive[:4], 4, 7, 2, 1) == [2, 3]
    # batch and head dims: a key counts as seen if any of them sees it
    two = torch.stack([k[:4], k[:4].roll(1, -1)])[:, None]
    assert block.key_stops(two, 4, 7, 2, 1) == [3, 6]
    # a broadcast row: every block sees that row's keys
    assert block.key_stops(k[1:2], 5, 7, 2, 1) == [2, 2, 2]
    assert block.key_stops(None, 5, 7, 2, 1) is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert block.key_stops(k, 5, 7, 2, 1) is None  # no host read inside a compiled graph


LOBCQ = {"format": "lobcq"}


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("backend", ["reference", "compile"])
def test_lobcq_p_takes_the_block_path_and_skips_whole_arrays(
    mask_kind, backend, torch_blocks, monkeypatch
):
    """LO-BCQ quantises each row's arrays on their own (no independent blocks: padding is
    ignored): P row by row is the eager path's, and a causal tail is skipped in whole arrays
    of 64 keys. ``compile`` runs its C++ kernel on P."""
    monkeypatch.setattr(block, "TILE_ROWS", TAIL_ROWS)
    seq = 200
    module = _Attn(LOBCQ)
    for quantizer in module.qat_matmul.children():
        quantizer.backend = backend
    q, k, v = _qkv(seq, seed=1)
    mask = _masks(seq)[mask_kind]
    monkeypatch.setattr(attention, "LONG_SCORES", 1 << 60)
    ref, ref_probs, ref_grads = _run(module, q, k, v, mask)
    monkeypatch.setattr(attention, "LONG_SCORES", 0)
    seen: list[torch.Tensor] = []
    hook = _block_probs(module, seen)
    try:
        got, _, grads = _run(module, q, k, v, mask)
    finally:
        hook.remove()
    assert len(torch_blocks) == 1
    _assert_same(got, ref, "out")
    for name, g, r in zip("qkv", grads, ref_grads):
        _assert_same(g, r, name)
    spans = block.spans(seq, TAIL_ROWS)  # the last block reaches back (see block.spans)
    for (first, _, stop), p in zip(spans, seen):
        rows = ref_probs[..., first:stop, :]
        assert torch.equal(p, rows[..., : p.shape[-1]]) and not rows[..., p.shape[-1] :].any()
    lengths = [p.shape[-1] for p in seen[: len(spans)]]
    if mask_kind == "none":
        assert lengths == [seq] * len(spans)
    else:  # whole arrays: 64 (at least MIN_KEYS), 128, 192, then the row's 200
        assert set(lengths) == {64, 128, 192, 200} and lengths == sorted(lengths)


def test_p_block_size_follows_the_p_quantiser():
    mq = MatmulQuantizer(make_format({**W4, "block_size": 8}), backend="reference")
    assert block.p_block_size(mq.p) == 8
    assert block.p_block_size(None) == 1
    mq.p.enabled = False
    assert block.p_block_size(mq.p) == 1
    row_scale = MatmulQuantizer(make_format({"format": "int", "width": 8}), backend="reference")
    assert block.p_block_size(row_scale.p) is None
    lobcq = MatmulQuantizer(make_format({"format": "lobcq"}), backend="reference")
    assert block.p_block_size(lobcq.p) == 64  # its arrays


def test_cpu_block_path_reads_the_mask_once_per_forward(blocks, monkeypatch):
    monkeypatch.setattr(attention, "LONG_SCORES", 0)
    monkeypatch.setattr(block, "TILE_ROWS", TAIL_ROWS)
    reads = []
    tolist = torch.Tensor.tolist

    def counted(self):
        reads.append(tuple(self.shape))
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    _run(_Attn(W4), *_qkv(200), CAUSAL_200)
    assert reads == [(13,)]  # one read of the 13 blocks' key counts, none in backward


def test_key_tails_under_bf16_autocast(blocks, monkeypatch):
    # the recompute under the forward's autocast state sees the forward's blocks and keys; the
    # shorter bf16 sums over keys round to bf16 differently at most
    monkeypatch.setattr(block, "TILE_ROWS", TAIL_ROWS)
    module = _Attn(W4)
    q, k, v = _qkv(130)
    mask = _masks(130)["bool"]
    results = []
    for threshold in (1 << 60, 0):
        monkeypatch.setattr(attention, "LONG_SCORES", threshold)
        seen: list[torch.Tensor] = []
        hook = _block_probs(module, seen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = attention.qat_attention_forward(module, q, k, v, mask, scaling=0.3)
        hook.remove()
        out.float().square().sum().backward()
        results.append((out.detach().float(), [t.grad.clone() for t in (q, k, v)], seen))
        for t in (q, k, v):
            t.grad = None
    (ref, ref_grads, _), (got, grads, seen) = results
    assert len(blocks) == 1 and min(p.shape[-1] for p in seen) == 64
    assert torch.allclose(got, ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))
    for name, g, r in zip("qkv", grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-2, atol=1e-2 * float(r.abs().max())), name


@pytest.mark.parametrize("matmul", ["float", "bfp4"])
def test_eager_and_block_paths_give_the_same_forward_at_real_sizes(matmul, monkeypatch):
    # Seeded random floats at a real head size (64) and length (1,089 tokens: a last tile of
    # one row), a left-padded row, attention matmuls in float (a recipe that quantises only
    # weights and activations) or BFP4, and the memory heuristic's blocks for 240 heads (64
    # rows). A block's sum over 320 keys (MKL groups 208 to 368 terms otherwise than 1,089,
    # zeros or not) once made the block path's outputs differ from the eager path's (float
    # attention: 27,420 of 278,784 elements; BFP4 V makes most of these sums exact).
    monkeypatch.setenv(cpu_attention.ENV, "0")
    g = torch.Generator().manual_seed(0)
    n = 1089
    q, k, v = (torch.randn(2, 2, n, 64, generator=g) for _ in range(3))
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    mask[1, :, :, :46] = False
    mask[1, :, :46, 0] = True  # padded query rows see one key, as transformers does
    monkeypatch.setattr(block, "BLOCK_ELEMENTS", 64 * 2 * 2 * n)  # 64 rows for these 4 heads
    module = torch.nn.Module() if matmul == "float" else _Attn(W4)
    outs = []
    for threshold in (1 << 60, 0):
        monkeypatch.setattr(attention, "LONG_SCORES", threshold)
        with torch.no_grad():
            outs.append(attention.qat_attention_forward(module, q, k, v, mask, scaling=0.125))
    (eager, probs), (blocks, none) = outs
    assert probs is not None and none is None
    assert torch.equal(blocks, eager), int((blocks != eager).sum())
