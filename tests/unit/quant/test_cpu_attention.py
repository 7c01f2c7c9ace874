"""The block path's fused CPU kernel (qat.quant.attention.cpu): Q(P) bit for bit against the
format's reference quantiser of torch's softmax, outputs and gradients against the PyTorch
block path, the key stops it is given, and where it steps aside."""

import logging

import pytest
import torch
from tiny import BFP4, tiny_batch, tiny_model

import qat.quant.attention.block as block
import qat.quant.attention.cpu as cpu
import qat.quant.attention.interface as attention
from qat import quantize_model
from qat.formats import make_format
from qat.quant.ste import FakeQuantizer

LOWEST = torch.finfo(torch.float32).min


@pytest.fixture(autouse=True)
def kernel_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpu.ENV, raising=False)
    assert cpu.load(), "the CPU attention kernel did not build"


def _int_qk(b: int, h: int, lq: int, lk: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # small integers: every dot product is exact in float32 whatever the GEMM's order, so the
    # kernel's scores are torch's and P can be compared bit for bit
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-3, 4, (b, h, lq, 16), generator=g).float()
    k = torch.randint(-3, 4, (b, h, lk, 16), generator=g).float()
    return q, k


def _masks(b: int, lq: int, lk: int) -> dict[str, torch.Tensor | None]:
    causal = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)[None, None].repeat(b, 1, 1, 1)
    padded = causal.clone()
    padded[-1, :, :, :3] = False  # left padding of the last sequence
    padded[-1, :, 1] = False  # a row that sees no key: uniform P
    additive = torch.zeros(b, 1, lq, lk).masked_fill(~causal, LOWEST)
    additive[0, :, :, 1] -= 2.5  # an ordinary bias as well
    return {"none": None, "causal": causal, "padded": padded, "additive": additive}


def _reference_qp(q, k, mask, scaling, fmt) -> torch.Tensor:
    """The eager path's Q(P): torch's matmul, mask and softmax, the format's reference."""
    s = torch.matmul(q, k.transpose(-1, -2))
    if scaling != 1.0:
        s = s * scaling
    if mask is not None:
        s = s.masked_fill(~mask, LOWEST) if mask.dtype == torch.bool else s + mask
    p = torch.softmax(s, dim=-1)
    return p if fmt is None else fmt.quantize(p, -1)


FORMATS = {
    "bfp4_b16": {"format": "bfp", "width": 4, "exponent_width": 8, "block_size": 16},
    "bfp3_e3_b8": {"format": "bfp", "width": 3, "exponent_width": 3, "block_size": 8},
    "bfp6_b32": {"format": "bfp", "width": 6, "exponent_width": 8, "block_size": 32},
    "bfp8_e4_b4": {"format": "bfp", "width": 8, "exponent_width": 4, "block_size": 4},
    "bfp2_e2_b5": {"format": "bfp", "width": 2, "exponent_width": 2, "block_size": 5},
    "float": None,
}


@pytest.mark.parametrize("fmt_name", list(FORMATS))
@pytest.mark.parametrize("mask_kind", ["none", "causal", "padded", "additive"])
@pytest.mark.parametrize("lq,lk,rows", [(37, 37, 6), (70, 70, 16), (9, 70, 4)])
@pytest.mark.parametrize("scaling", [0.25, 1.0])
def test_q_p_is_the_reference_quantiser_of_torchs_softmax(
    fmt_name, mask_kind, lq, lk, rows, scaling
):
    # with V the identity the output is Q(P) itself (one nonzero term per sum): every
    # element of every row, with ragged blocks, exponents clamped by a narrow exponent width
    # (bfp3_e3, bfp2_e2), blocks that are not a vector's width (scalar code), key tails
    # skipped on causal rows
    fmt = None if FORMATS[fmt_name] is None else make_format(FORMATS[fmt_name])
    quantize_p = None if fmt is None else FakeQuantizer(fmt)
    q, k = _int_qk(2, 3, lq, lk, seed=lq + lk)
    mask = _masks(2, lq, lk)[mask_kind]
    v = torch.eye(lk).expand(2, 3, lk, lk)
    stops = block.key_stops(mask, lq, lk, rows, block.p_block_size(quantize_p))
    if mask_kind == "causal" and lk == 70 and lq == 70:
        assert stops is not None and min(stops) < lk  # some blocks skip their key tail
    got = cpu.cpu_block_attention(q, k, v, mask, scaling, quantize_p, rows, stops)
    want = _reference_qp(q, k, mask, scaling, fmt)
    assert torch.equal(got, want), float((got - want).abs().max())
    if fmt is not None:
        assert (want != torch.softmax(want, -1)).any()  # it did quantise


def _grads(fn, q, k, v, seed: int = 1):
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out = fn(qq, kk, vv)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * g).sum().backward()
    return out.detach(), qq.grad, kk.grad, vv.grad


def _sums_of_abs_terms(q, k, v, mask, scaling, fmt) -> tuple[torch.Tensor, ...]:
    """For the output and each gradient of ``_grads``' loss, the sum of its terms' absolute
    values (``|P| @ |V|``, ``|dS| @ |K|``, ``|dS|^T @ |Q|``, ``|P|^T @ |dO|``), P and dS from
    the eager path's autograd (the format's quantiser of P as a straight-through estimator)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).requires_grad_()
    s = scores * scaling
    if mask is not None:
        s = s.masked_fill(~mask, LOWEST) if mask.dtype == torch.bool else s + mask
    p = torch.softmax(s, dim=-1)
    if fmt is not None:
        p = p + (fmt.quantize(p.detach(), -1) - p).detach()
    out = torch.matmul(p, v)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * g).sum().backward()
    ds, p = scores.grad.abs(), p.detach().abs()
    t = (-1, -2)
    return p @ v.abs(), ds @ k.abs(), ds.transpose(*t) @ q.abs(), p.transpose(*t) @ g.abs()


@pytest.mark.parametrize("mask_kind", ["none", "causal", "padded", "additive"])
@pytest.mark.parametrize("fmt_name", ["bfp4_b16", "bfp3_e3_b8", "float"])
@pytest.mark.parametrize("scaling", [0.125, 1.0])
def test_outputs_and_gradients_are_the_pytorch_block_paths_up_to_summation_order(
    mask_kind, fmt_name, scaling, monkeypatch
):
    # the kernel takes every sum in the PyTorch path's shapes (tiles of 16 rows here, the
    # PyTorch path in blocks of two tiles; 70 rows end on a tile that reaches back)
    monkeypatch.setattr(block, "TILE_ROWS", 16)
    fmt = None if FORMATS[fmt_name] is None else make_format(FORMATS[fmt_name])
    quantize_p = None if fmt is None else FakeQuantizer(fmt)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 70, 24, generator=g) * 2 for _ in range(3))
    mask = _masks(2, 70, 70)[mask_kind]
    stops = block.tile_stops(mask, 70, 70, quantize_p)

    def kernel(q, k, v):
        return cpu.cpu_block_attention(q, k, v, mask, scaling, quantize_p, 16, stops)

    def torch_path(q, k, v):
        return block.BlockAttention.apply(q, k, v, mask, scaling, quantize_p, 32)

    got, want = _grads(kernel, q, k, v), _grads(torch_path, q, k, v)
    # The kernel takes one 2-D GEMM per head and tile, the PyTorch path a batched matmul of
    # the same shapes over the same terms, and BLAS picks its summation order by thread count
    # (with one thread some sums differ in the last bit). Two orders of the same n = 70 terms
    # differ by at most 2 * n * eps * (sum of the terms' |values|); those sums come from a
    # float32 recomputation on the eager path (a factor of 2 to spare).
    eps = torch.finfo(torch.float32).eps
    bounds = _sums_of_abs_terms(q, k, v, mask, scaling, fmt)
    for name, a, b, bound in zip(("out", "q", "k", "v"), got, want, bounds):
        diff = (a - b).abs()
        assert (diff <= 4 * 70 * eps * bound).all(), (name, float(diff.max()))
    if mask_kind == "padded":  # the row that sees no key passes no gradient to q
        assert not got[1][-1, :, 1].any()


def test_a_model_runs_the_kernel_with_the_key_stops_of_its_causal_mask(monkeypatch):
    assert block.kernel_agrees()  # its first-use check (cached) runs the kernel too
    seen: list[tuple[int, list[int] | None]] = []
    inner = cpu.cpu_block_attention

    def recorded(q, k, v, mask, scaling, quantize_p, rows, stops):
        seen.append((rows, stops))
        return inner(q, k, v, mask, scaling, quantize_p, rows, stops)

    monkeypatch.setattr(cpu, "cpu_block_attention", recorded)
    monkeypatch.setattr(attention, "LONG_SCORES", 0)
    monkeypatch.setattr(block, "TILE_ROWS", 4)
    monkeypatch.setattr(block, "MIN_KEYS", 1)
    model = tiny_model("llama")
    quantize_model(model, {"weight": BFP4, "activation": BFP4, "matmul": BFP4})
    batch = tiny_batch(seq=23)
    model(**batch).loss.backward()
    assert len(seen) == model.config.num_hidden_layers
    rows, stops = seen[0]
    assert rows == 4
    # rows 0-3 see keys up to 4, rounded up to P's block of 16; the last block sees all 23
    assert stops == [16, 16, 16, 16, 23, 23]


@pytest.mark.parametrize(
    "case",
    ["bf16", "autocast", "mse", "rotation", "env", "not_built", "not_a_qat_quantiser", "wide"],
)
def test_steps_aside_where_it_does_not_apply(case, monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=g) for _ in range(3))
    p = FakeQuantizer(make_format(BFP4))
    assert cpu.applies(q, k, v, None, p)
    if case == "bf16":
        q = q.bfloat16()
    elif case == "mse":
        p = FakeQuantizer(make_format({**BFP4, "scale": "mse"}))
    elif case == "wide":
        p = FakeQuantizer(make_format({**BFP4, "block_size": 512}))
    elif case == "rotation":
        from qat.quant.rotation import Rotation

        p = FakeQuantizer(make_format(BFP4), rotation=Rotation(16))
    elif case == "env":
        monkeypatch.setenv(cpu.ENV, "0")
    elif case == "not_built":
        monkeypatch.setattr(cpu, "load", lambda: False)
    elif case == "not_a_qat_quantiser":
        p = lambda t: t  # noqa: E731 - a plain callable: its format is unknown
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not cpu.applies(q, k, v, None, p)
    else:
        assert not cpu.applies(q, k, v, None, p)


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, caplog):
    from torch.utils import cpp_extension

    from qat.formats.kernels import cpu_build

    def broken(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\nmore detail")

    monkeypatch.setattr(cpp_extension, "load", broken)
    with caplog.at_level(logging.WARNING, logger="qat.formats.kernels.cpu_build"):
        assert cpu_build.build.__wrapped__("qat_block_attention_cpu", cpu.SOURCE) is False
    assert "Ninja is required to load C++ extensions" in caplog.text
    assert "more detail" not in caplog.text  # one line


def test_a_w4a4_model_scores_alike_on_every_attention_path(monkeypatch):
    # A seeded random Llama with real head sizes (64, GQA) on a batch of an 1,089-token row and
    # a left-padded 1,043-token one, W4A4 with BFP attention matmuls (a 1-ulp difference in an
    # attention output moves 4-bit activations, as in a SmolLM2 W4A4 run: the kernel
    # gave another loss than the PyTorch path and the eager path). The eager path, the PyTorch
    # block path and the kernel give the same logits and loss; the kernel's gradients are the
    # PyTorch block path's bit for bit.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(config)
    quantize_model(model, {"weight": BFP4, "activation": BFP4, "matmul": BFP4})
    n, pad = 1089, 46
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 100, (2, n), generator=g)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :pad] = 0
    labels = ids.masked_fill(attention_mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": attention_mask, "labels": labels}

    def step(path: str):
        monkeypatch.setattr(attention, "LONG_SCORES", 1 << 60 if path == "eager" else 1 << 20)
        monkeypatch.setenv(cpu.ENV, "0" if path == "torch" else "1")
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        return out.logits.detach(), out.loss.detach(), grads

    assert block.kernel_agrees()  # its first-use check (cached) runs the kernel too
    kernel_calls = []
    inner = cpu.cpu_block_attention
    monkeypatch.setattr(cpu, "cpu_block_attention", lambda *a: kernel_calls.append(1) or inner(*a))
    eager, torch_path, kernel = step("eager"), step("torch"), step("kernel")
    assert len(kernel_calls) == config.num_hidden_layers
    assert torch.equal(torch_path[0], eager[0]) and torch.equal(kernel[0], eager[0])
    assert float(kernel[1]) == float(torch_path[1]) == float(eager[1])
    for name, grad in torch_path[2].items():
        assert torch.equal(kernel[2][name], grad), name


def _op_args(**change):
    """Arguments of a valid block_attention_forward call, with ``change`` applied."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    args = {
        "q": q,
        "k": k,
        "v": v,
        "mask": torch.ones(1, 2, 40, 40, dtype=torch.bool).tril(),
        "scaling": 0.25,
        "stops": torch.tensor([40], dtype=torch.int64),
        "rows": 64,
        "block": 16,
        "m_bits": 3,
        "e_lo": -127,
        "e_hi": 128,
    }
    return {**args, **change}


@pytest.mark.parametrize(
    "change,words",
    [
        ({"block": 512}, "P block 512 out of range [0, 256]"),  # a stack buffer of 256 keys
        ({"block": -1}, "P block -1 out of range"),
        ({"m_bits": 40}, "P format out of range (m_bits 40"),
        ({"q": torch.randn(1, 2, 40, 16).double()}, "q must be a float32 CPU tensor"),
        ({"k": torch.randn(2, 40, 16)}, "k must be a float32 CPU tensor"),
        ({"v": torch.randn(1, 2, 39, 16)}, "does not match k"),
        ({"mask": torch.ones(1, 2, 40, 41, dtype=torch.bool)}, "the mask must be [batch"),
        ({"mask": torch.ones(1, 2, 40, 40, dtype=torch.int32)}, "the mask must be bool or"),
        ({"stops": torch.tensor([41])}, "key stop 41 out of range [1, 40]"),
        ({"stops": torch.tensor([40.0])}, "stops must be int64"),
        ({"rows": 0}, "rows must be > 0"),
    ],
)
def test_the_ops_check_their_own_inputs(change, words):
    # a direct call (not through cpu_block_attention) gets a one-line error, never a write past
    # a buffer
    with pytest.raises(RuntimeError) as info:
        torch.ops.qat_cpu.block_attention_forward(*_op_args(**change).values())
    message = str(info.value).strip()
    assert words in message and len(message.splitlines()) == 1, message
    out, stats = torch.ops.qat_cpu.block_attention_forward(*_op_args().values())
    with pytest.raises(RuntimeError, match="grad_out .* is not the output's shape"):
        torch.ops.qat_cpu.block_attention_backward(
            out[..., :-1], *list(_op_args().values())[:4], stats, *list(_op_args().values())[4:]
        )


@pytest.fixture()
def recheck():
    """The kernel's first-use check runs again in the test (and after it, for the next)."""
    block.kernel_agrees.cache_clear()
    yield
    block.kernel_agrees.cache_clear()


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_the_first_use_check_runs_whatever_the_callers_grad_mode(mode, recheck):
    # the first long attention of a run may come from `qat perplexity` (no_grad) or lm-eval
    # (inference mode): the check differentiates its own tensors regardless
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        assert block.kernel_agrees()


def test_a_kernel_that_differs_from_the_pytorch_path_is_not_used(recheck, monkeypatch, caplog):
    # what a torch upgrade that changes the ATen internals under the kernel would look like:
    # its output one ulp off in one element
    inner = cpu.cpu_block_attention

    def off_by_one_ulp(*args):
        out = inner(*args)
        with torch.no_grad():
            out.view(-1)[5] = torch.nextafter(out.view(-1)[5], torch.tensor(float("inf")))
        return out

    monkeypatch.setattr(cpu, "cpu_block_attention", off_by_one_ulp)
    fmt = FakeQuantizer(make_format(BFP4))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 100, 16, generator=g) for _ in range(3))
    mask = torch.ones(1, 1, 100, 100, dtype=torch.bool).tril()
    with caplog.at_level(logging.WARNING, logger="qat.quant.attention.block"):
        got = block.block_attention(q, k, v, mask, 0.25, fmt)
        again = block.block_attention(q, k, v, mask, 0.25, fmt)
    want = block.BlockAttention.apply(q, k, v, mask, 0.25, fmt, block.TILE_ROWS)
    assert torch.equal(got, want) and torch.equal(again, want)  # the PyTorch path ran
    warnings = [r.message for r in caplog.records if "attention kernel" in r.message]
    assert len(warnings) == 1, warnings
    assert "another output" in warnings[0] and "the PyTorch path runs instead" in warnings[0]


def test_turning_the_kernel_off_by_its_variable_warns_once(monkeypatch, caplog):
    # the same numbers either way (above), but a run should not change path unannounced
    cpu._warn_off.cache_clear()
    monkeypatch.setenv(cpu.ENV, "0")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 70, 16, generator=g) for _ in range(3))
    p = FakeQuantizer(make_format(BFP4))
    with caplog.at_level(logging.WARNING, logger="qat.quant.attention.cpu"):
        assert not cpu.applies(q, k, v, None, p)
        assert not cpu.applies(q, k, v, None, p)
    assert [r.message for r in caplog.records] == [
        "qat: QAT_CPU_ATTENTION=0: long attention runs the PyTorch block path (the kernel's "
        "numbers, slower)"
    ]
    cpu._warn_off.cache_clear()
