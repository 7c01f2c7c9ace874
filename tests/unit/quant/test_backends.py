"""Backends (quant.backend) and shared input quantisation."""

import pytest
import torch
from tiny import tiny_batch, tiny_model

import qat.quant.backends as backends
from qat import QuantConfig, QuantConfigError, quantize_model
from qat.errors import QatError
from qat.formats import make_format
from qat.quant.backends import fake_quantize, resolve_backend
from qat.quant.ste import FakeQuantizer

W4A4 = {
    "weight": {"format": "bfp", "width": 4},
    "activation": {"format": "bfp", "width": 4},
    "matmul": {"format": "bfp", "width": 4},
}


def test_backend_key_is_validated_and_recorded():
    cfg = QuantConfig.from_dict({**W4A4, "backend": "compile"})
    assert cfg.to_dict()["backend"] == "compile"
    with pytest.raises(
        QuantConfigError,
        match="quant.backend must be one of auto, triton, compile, reference; got 'cuda'",
    ):
        QuantConfig.from_dict({**W4A4, "backend": "cuda"})


def test_auto_resolution(monkeypatch):
    fmt = make_format({"format": "bfp"})
    cpu = torch.device("cpu")
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    monkeypatch.setattr(backends, "compile_works", lambda: True)
    assert resolve_backend("auto", fmt, cpu) == "compile"
    monkeypatch.setattr(backends, "compile_works", lambda: False)
    assert resolve_backend("auto", fmt, cpu) == "reference"
    monkeypatch.setenv(backends.BACKEND_ENV, "reference")
    assert resolve_backend("auto", fmt, cpu) == "reference"
    assert resolve_backend("compile", fmt, cpu) == "compile"  # explicit beats the variable
    monkeypatch.setenv(backends.BACKEND_ENV, "bogus")
    with pytest.raises(QatError, match="QAT_BACKEND='bogus' is not one of auto, triton"):
        resolve_backend("auto", fmt, cpu)


def test_triton_backend_refuses_cpu_tensors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(QatError, match="quant.backend triton runs on CUDA tensors") as e:
        resolve_backend("triton", make_format({"format": "bfp"}), torch.device("cpu"))
    assert isinstance(e.value, backends.BackendError)


@pytest.mark.parametrize(
    "spec", [{"format": "bfp", "width": 4, "block_size": 16}, {"format": "nf4", "block_size": 32}]
)
def test_compile_backend_equals_reference_bit_for_bit(spec):
    fmt = make_format(spec)
    g = torch.Generator().manual_seed(1)
    for shape, dim in (((37, 70), -1), ((5, 48, 20), 1)):
        x = torch.randn(*shape, generator=g) * torch.rand(*shape, generator=g) ** 4 * 50
        x.view(-1)[3] = float("nan")
        x.view(-1)[11] = -float("inf")
        x.requires_grad_(True)
        y = fake_quantize(x, fmt, dim, "compile")
        ref = fmt.quantize(x.detach(), dim)
        assert torch.equal(y.detach().view(torch.int32), ref.view(torch.int32))
        y.backward(torch.full_like(y, 2.0))
        assert torch.equal(x.grad, torch.full_like(x, 2.0))


def test_fake_quantizer_shows_and_uses_backend():
    fq = FakeQuantizer(make_format({"format": "bfp"}), dim=-1, backend="reference")
    assert "backend=reference" in repr(fq)
    x = torch.randn(3, 32)
    assert torch.equal(fq(x), make_format({"format": "bfp"}).quantize(x))


def _count_quantise_calls(monkeypatch):
    import qat.quant.ste

    calls = []
    real = qat.quant.ste.run_backend

    def counting(impl, x, fmt, dim):
        calls.append(tuple(x.shape))
        return real(impl, x, fmt, dim)

    monkeypatch.setattr(qat.quant.ste, "run_backend", counting)
    return calls


@pytest.mark.parametrize("arch", ["llama", "opt", "bert"])
def test_qkv_share_one_input_quantisation(arch, monkeypatch):
    torch.manual_seed(0)
    shared = quantize_model(tiny_model(arch, seed=3), W4A4)
    plain = quantize_model(tiny_model(arch, seed=3), W4A4)
    for m in plain.modules():
        if isinstance(m, FakeQuantizer):
            m.shared = None
    batch = tiny_batch()
    calls = _count_quantise_calls(monkeypatch)
    torch.manual_seed(5)  # same dropout masks in both runs
    out_s = shared(**batch)
    n_shared = len(calls)
    calls.clear()
    torch.manual_seed(5)
    out_p = plain(**batch)
    n_plain = len(calls)
    # q, k, v read one hidden state: two of the three input quantisations go (per layer);
    # llama's gate/up share too.
    saved = 2 * 2 + (2 if arch == "llama" else 0)
    assert n_plain - n_shared == saved, (n_plain, n_shared)
    assert torch.equal(out_s.logits, out_p.logits)
    out_s.loss.backward()
    out_p.loss.backward()
    for (n, a), (_, b) in zip(shared.named_parameters(), plain.named_parameters()):
        if a.grad is not None or b.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-5), n


def test_shared_cache_is_invalidated_by_in_place_change_and_holds_no_dead_input():
    import gc

    from qat.quant.ste import SharedInput

    fmt = make_format({"format": "bfp", "width": 3})
    a, b = FakeQuantizer(fmt), FakeQuantizer(fmt)
    a.shared = b.shared = SharedInput()
    x = torch.randn(4, 32)
    qa = a(x)
    assert b(x) is qa
    x.mul_(2)  # in place: the cached result is stale
    assert not torch.equal(b(x), qa)
    cache = a.shared
    del x
    gc.collect()
    assert cache._out is None  # the result dies with its input


def test_inference_mode_runs_and_sees_in_place_changes():
    """Inference tensors track no version: the shared cache must step aside, not crash, and
    a quantised model gives the same logits under inference_mode as under no_grad."""
    from qat.quant.ste import SharedInput

    fmt = make_format({"format": "bfp", "width": 3})
    a, b = FakeQuantizer(fmt), FakeQuantizer(fmt)
    a.shared = b.shared = SharedInput()
    with torch.inference_mode():
        x = torch.randn(4, 32)
        qa = a(x)
        x.mul_(2)
        assert torch.equal(b(x), FakeQuantizer(fmt)(x))  # x as it is now, not the stale qa
        assert not torch.equal(b(x), qa)
    model = quantize_model(tiny_model("llama", seed=3), W4A4).eval()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    assert torch.equal(got, want)


def test_triton_backend_in_a_model_equals_reference():
    """quant.backend triton (interpreted on the CPU) gives the reference model's logits and
    gradients bit for bit; formats without a kernel (int here) fall back to compile."""
    import os

    from qat.formats.kernels import triton_available

    if not triton_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs triton's interpreter (TRITON_INTERPRET=1, no GPU)")
    quant = {
        "weight": {"format": "nf4", "block_size": 32},
        "activation": {"format": "bfp", "width": 4},
        "matmul": {"format": "mxfp4"},
    }
    models = {}
    for backend in ("triton", "reference"):
        m = quantize_model(tiny_model("llama", seed=2), {**quant, "backend": backend}).eval()
        out = m(**tiny_batch())
        out.loss.backward()
        models[backend] = (m, out)
    (mt, ot), (mr, orf) = models["triton"], models["reference"]
    assert torch.equal(ot.logits, orf.logits)
    for (n, a), (_, b) in zip(mt.named_parameters(), mr.named_parameters()):
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad), n
    fq = mt.model.layers[0].self_attn.q_proj.weight_quantizer
    assert fq._impl == {"cpu": "triton"}


@pytest.mark.parametrize(
    "name,kernel", [("ggml_q4_0", True), ("ggml_q8_0", True), ("nvfp4", True), ("int", False)]
)
def test_llama_cpp_and_nvfp4_dispatch(name, kernel, monkeypatch):
    """auto picks the fused kernel on CUDA for the llama.cpp block types and NVFP4 (int has
    none and compiles). Under the interpreter the triton backend runs the kernel on CPU
    tensors, bit-equal to the reference, with an identity backward."""
    from qat.formats.kernels import triton_available

    if not triton_available():
        pytest.skip("triton is not installed")
    fmt = make_format({"format": name})
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    assert resolve_backend("auto", fmt, torch.device("cuda")) == ("triton" if kernel else "compile")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", fmt, torch.device("cpu")) == (
        "triton" if kernel else "compile"
    )
    import qat.formats.kernels as kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not kernel or (device == "cpu" and not kernels._INTERPRET):
        return  # no kernel, or triton was imported without its interpreter
    x = torch.randn(6, 70, generator=torch.Generator().manual_seed(3)) * 5
    x = x.to(device).requires_grad_()
    y = fake_quantize(x, fmt, -1, "triton")
    assert torch.equal(y.detach().view(torch.int32), fmt.quantize(x.detach()).view(torch.int32))
    y.backward(torch.full_like(y, 3.0))
    assert torch.equal(x.grad, torch.full_like(x, 3.0))
