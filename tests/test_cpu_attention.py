"""The block path's fused CPU kernel (qat.quant.cpu_attention): Q(P) bit for bit against the
format's reference quantiser of torch's softmax, outputs and gradients against the PyTorch
block path, the key stops it is given, and where it steps aside."""

import logging

import pytest
import torch
from tiny import BFP4, tiny_batch, tiny_model

import qat.quant.attention as attention
import qat.quant.block_attention as block
import qat.quant.cpu_attention as cpu
from qat import quantize_model
from qat.formats import make_format
from qat.quant.modules import FakeQuantizer

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


@pytest.mark.parametrize("mask_kind", ["none", "causal", "padded", "additive"])
@pytest.mark.parametrize("fmt_name", ["bfp4_b16", "bfp3_e3_b8", "float"])
@pytest.mark.parametrize("scaling", [0.125, 1.0])
def test_outputs_and_gradients_equal_the_pytorch_block_path(mask_kind, fmt_name, scaling):
    fmt = None if FORMATS[fmt_name] is None else make_format(FORMATS[fmt_name])
    quantize_p = None if fmt is None else FakeQuantizer(fmt)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 70, 24, generator=g) * 2 for _ in range(3))
    mask = _masks(2, 70, 70)[mask_kind]
    rows = 16
    stops = block.key_stops(mask, 70, 70, rows, block.p_block_size(quantize_p))

    def kernel(q, k, v):
        return cpu.cpu_block_attention(q, k, v, mask, scaling, quantize_p, rows, stops)

    def torch_path(q, k, v):
        return block.BlockAttention.apply(q, k, v, mask, scaling, quantize_p, rows)

    got, want = _grads(kernel, q, k, v), _grads(torch_path, q, k, v)
    for name, a, b in zip(("out", "q", "k", "v"), got, want):
        # sums over keys may group otherwise in the kernel's GEMMs: float32 rounding
        tol = 1e-6 * float(b.abs().max())
        assert torch.allclose(a, b, rtol=1e-5, atol=tol), (name, float((a - b).abs().max()))
    if mask_kind == "padded":  # the row that sees no key passes no gradient to q
        assert not got[1][-1, :, 1].any()


def test_a_model_runs_the_kernel_with_the_key_stops_of_its_causal_mask(monkeypatch):
    seen: list[tuple[int, list[int] | None]] = []
    inner = cpu.cpu_block_attention

    def recorded(q, k, v, mask, scaling, quantize_p, rows, stops):
        seen.append((rows, stops))
        return inner(q, k, v, mask, scaling, quantize_p, rows, stops)

    monkeypatch.setattr(cpu, "cpu_block_attention", recorded)
    monkeypatch.setattr(attention, "LONG_SCORES", 0)
    monkeypatch.setattr(block, "BLOCK_ELEMENTS", 1)  # MIN_ROWS rows per block
    monkeypatch.setattr(block, "MIN_ROWS", 4)
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
