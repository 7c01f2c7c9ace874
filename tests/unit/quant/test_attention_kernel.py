"""The Triton kernels of the quantised attention (qat.quant.attention.flash) against the PyTorch
block path (qat.quant.attention.block), which gives the eager path's values.

Without CUDA they run under Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py) on
CPU tensors; ``DEVICES`` is widened to "cpu" for that. Tolerances: the kernel sums the softmax
normaliser online (another order than torch's softmax) and its matmuls accumulate in tiles, so
float32 values differ from the block path's by a few ulps (measured under the interpreter:
outputs 1e-7, gradients 1e-6 of their scale; half precision equal); a P element on a rounding
boundary of the P format's grid could then land on the neighbouring grid point (measured: none
in 196,608 causal P elements, fp32/fp16/bf16). So quantised P is compared element by element
with at most 0.1% of elements one grid step away, outputs and gradients within ``TOL`` of
their largest magnitude."""

import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from test_no_sync import no_host_sync  # noqa: E402
from tiny import REPO, tiny_batch, tiny_model  # noqa: E402

import qat.quant.attention.flash as flash  # noqa: E402
import qat.quant.attention.interface as attention  # noqa: E402
from qat import QuantConfig, quantize_model  # noqa: E402
from qat.formats import make_format  # noqa: E402
from qat.quant.attention.block import block_attention  # noqa: E402
from qat.quant.modules import MatmulQuantizer  # noqa: E402
from qat.quant.ste import FakeQuantizer  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

W4 = {"format": "bfp", "width": 4, "exponent_width": 8, "block_size": 16}
# Tolerance of outputs and gradients, relative to the tensor's largest magnitude: float32 a few
# ulps of accumulation order; half precision one rounding of the output.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def kernel_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flash, "DEVICES", ("cuda", DEVICE))


def _p(spec: dict = W4) -> FakeQuantizer:
    return FakeQuantizer(make_format(spec), dim=-1, backend="reference")


def _qkv(
    seq: int,
    dtype: torch.dtype,
    heads: int = 1,
    dim: int = 16,
    seed: int = 0,
    v_dim: int | None = None,
):
    g = torch.Generator().manual_seed(seed)

    def t(d: int, scale: float = 1.0) -> torch.Tensor:
        x = torch.randn(2, heads, seq, d, generator=g) * scale
        return x.to(dtype).to(DEVICE).requires_grad_()

    return t(dim, 2.0), t(dim), t(v_dim or dim)


def _mask(kind: str, seq: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Causal + padded keys in the second sequence (a padded query row still sees key 0)."""
    if kind == "none":
        return None
    keep = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    keep[1, :, :, seq - 5 :] = False
    keep[1, :, seq - 5 :, 0] = True
    if kind.startswith("fully_masked_rows"):  # rows that see no key: P uniform over all keys
        keep[0, :, 3] = False
        keep[1, :, seq - 2 :] = False
    if kind in ("bool", "fully_masked_rows_bool"):
        return keep.to(DEVICE)
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(dtype).min).to(dtype)
    if kind == "broadcast_row":
        additive = additive[:, :, -1:, :]
    return additive.to(DEVICE)


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    scale = max(1.0, float(want.abs().max()))
    err = float((got.float() - want.float()).abs().max())
    assert err <= TOL[dtype] * scale, (what, err, scale)


def _fwd_bwd(fn, q, k, v, mask, p, scaling=0.3):
    out = fn(q, k, v, mask, scaling, p)
    weights = torch.linspace(-1, 1, out.shape[-1], device=DEVICE, dtype=out.dtype)
    grads = torch.autograd.grad((out * weights).float().sum(), (q, k, v))
    return out.detach(), grads


def _check_against_block_path(q, k, v, mask, p, dtype, tile=16, scaling=0.3):
    def kernel(*args):
        return flash.flash_attention(*args, tile=tile)

    assert flash.flash_applies(q, k, v, mask, p)
    out, grads = _fwd_bwd(kernel, q, k, v, mask, p, scaling)
    ref, ref_grads = _fwd_bwd(block_attention, q, k, v, mask, p, scaling)
    _assert_close(out, ref, dtype, "out")
    for name, g, r in zip("qkv", grads, ref_grads):
        _assert_close(g, r, dtype, f"d{name}")


@pytest.mark.parametrize(
    ("mask_kind", "dtype"),
    [
        *[
            (kind, torch.float32)
            for kind in (
                "none",
                "bool",
                "additive",
                "broadcast_row",
                "fully_masked_rows_bool",
                "fully_masked_rows_additive",
            )
        ],
        ("bool", torch.bfloat16),
        ("additive", torch.bfloat16),
    ],
)
def test_kernel_matches_block_path_under_masks(mask_kind, dtype):
    q, k, v = _qkv(37, dtype)  # 37 = two full tiles of 16 and a ragged one (masked loads)
    _check_against_block_path(q, k, v, _mask(mask_kind, 37, dtype), _p(), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_block_path_at_length_70(dtype):
    # Tiles of 32 with P blocks of 16; head dims 24 and 40 are not powers of two (padded lanes).
    q, k, v = _qkv(70, dtype, dim=24, v_dim=40, seed=1)
    _check_against_block_path(q, k, v, _mask("bool", 70, dtype), _p(), dtype, tile=32)


@pytest.mark.parametrize(
    "spec", [{**W4, "scale": "mse"}, {**W4, "width": 6, "block_size": 32}, None]
)
def test_kernel_matches_block_path_for_other_p_settings(spec):
    # scale: mse; a P block wider than the tile asked for (the key tile grows to it, query tiles
    # stay 16); P unquantised.
    q, k, v = _qkv(37, torch.float32, seed=2)
    p = None if spec is None else _p(spec)
    _check_against_block_path(q, k, v, _mask("additive", 37, torch.float32), p, torch.float32)


def test_kernel_matches_block_path_with_fewer_queries_than_keys():
    # A cached decoder step: 20 new query rows over 37 keys, the last 20 rows of a causal mask.
    q, k, v = _qkv(37, torch.float32, seed=5)
    q = q.detach()[:, :, 17:].requires_grad_()
    mask = _mask("bool", 37, torch.float32)[:, :, 17:]
    _check_against_block_path(q, k, v, mask, _p(), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantised_p_is_the_reference_p_on_the_grid(dtype):
    # With V = I the output is Q(P) itself: compare it element by element.
    seq = 64
    q, k, _ = _qkv(seq, dtype, seed=3)
    v = torch.eye(seq, dtype=dtype, device=DEVICE).expand(2, 1, seq, seq)
    mask = _mask("bool", seq, dtype)
    with torch.no_grad():
        got = flash.flash_attention(q, k, v, mask, 0.25, _p(), tile=32)
        want = block_attention(q, k, v, mask, 0.25, _p())
    differ = got != want
    assert float(differ.float().mean()) <= 1e-3
    assert float((got.float() - want.float()).abs().max()) <= 0.125  # one step of P's grid
    assert torch.equal(got.sum(-1) > 0.5, torch.ones_like(differ[..., 0]))  # rows hold mass


def test_qat_attention_routes_to_the_kernel_with_gqa(monkeypatch):
    """Through qat_attention_forward (quantised Q, K, V; one KV head repeated for 2 heads): the
    kernel runs where the block path would, with the eager path's values and gradients."""
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        return flash.flash_attention(*args, **kwargs, tile=16)

    monkeypatch.setattr(attention, "flash_attention", counted)
    module = torch.nn.Module()
    module.qat_matmul = MatmulQuantizer(make_format(W4), backend="reference")
    module.num_key_value_groups = 2
    seq = 37
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 2, seq, 16, generator=g).to(DEVICE).requires_grad_()
    k = torch.randn(2, 1, seq, 16, generator=g).to(DEVICE).requires_grad_()
    v = torch.randn(2, 1, seq, 16, generator=g).to(DEVICE).requires_grad_()
    mask = _mask("bool", seq, torch.float32)

    def run():
        out, _ = attention.qat_attention_forward(module, q, k, v, mask, scaling=0.3)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        return out.detach(), grads

    monkeypatch.setattr(attention, "LONG_SCORES", 1 << 60)
    ref, ref_grads = run()
    assert not calls
    monkeypatch.setattr(attention, "LONG_SCORES", 0)
    out, grads = run()
    assert len(calls) == 1
    _assert_close(out, ref, torch.float32, "out")
    for name, a, b in zip("qkv", grads, ref_grads):
        _assert_close(a, b, torch.float32, f"d{name}")


def test_tiny_llama_trains_through_the_kernel(monkeypatch):
    """A W4A4 tiny Llama (GQA, causal + padding mask from transformers, head dim 8): logits and
    parameter gradients with the kernel in both layers equal the eager path's within TOL."""
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        return flash.flash_attention(*args, **kwargs, tile=16)

    monkeypatch.setattr(attention, "flash_attention", counted)
    model = tiny_model("llama").to(DEVICE)
    quantize_model(model, QuantConfig(weight=W4, activation=W4, matmul=W4))
    batch = {k: v.to(DEVICE) for k, v in tiny_batch(seq=20).items()}
    model.eval()

    def step():
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        return out.logits.detach(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }

    monkeypatch.setattr(attention, "LONG_SCORES", 1 << 60)
    ref_logits, ref_grads = step()
    monkeypatch.setattr(attention, "LONG_SCORES", 0)
    logits, grads = step()
    assert len(calls) == 2
    _assert_close(logits, ref_logits, torch.float32, "logits")
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        _assert_close(grads[name], g, torch.float32, name)


@pytest.mark.parametrize(
    "spec",
    [
        {"format": "mxfp4"},
        {"format": "nf4", "block_size": 32},
        {**W4, "block_size": 7},
        {**W4, "block_size": 256},
    ],
)
def test_unsupported_p_formats_take_the_block_path(spec, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(attention, "flash_attention", lambda *a, **k: calls.append("flash"))
    real_block = attention.block_attention

    def block(*args, **kwargs):
        calls.append("block")
        return real_block(*args, **kwargs)

    monkeypatch.setattr(attention, "block_attention", block)
    monkeypatch.setattr(attention, "LONG_SCORES", 0)
    module = torch.nn.Module()
    module.qat_matmul = MatmulQuantizer(make_format(spec), backend="reference")
    q, k, v = _qkv(20, torch.float32)
    assert not flash.flash_applies(q, k, v, None, module.qat_matmul.p)
    attention.qat_attention_forward(module, q, k, v, None, scaling=0.3)
    assert calls == ["block"]


def test_kernel_runs_only_on_its_devices(monkeypatch):
    q, k, v = _qkv(20, torch.float32)
    assert flash.flash_applies(q, k, v, None, _p())
    monkeypatch.setattr(flash, "DEVICES", ("elsewhere",))
    assert not flash.flash_applies(q, k, v, None, _p())
    assert not flash.flash_applies(q, k, v.double(), None, _p())  # mixed dtypes


def test_kernel_saves_no_score_matrix():
    seq = 37
    q, k, v = _qkv(seq, torch.float32)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = flash.flash_attention(q, k, v, None, 0.3, _p(), tile=16)
    shapes = sorted(tuple(t.shape) for t in saved)
    # Q, K, V and the row max and normaliser, nothing of [seq, seq]
    assert shapes == sorted([(2, 1, seq, 16)] * 3 + [(2, 1, seq)] * 2), shapes
    assert out.grad_fn is not None


def test_kernel_launch_reads_no_tensor_values():
    q, k, v = _qkv(20, torch.float32)
    mask = _mask("bool", 20, torch.float32)
    flash.flash_attention(q, k, v, mask, 0.3, _p(), tile=16)  # compile/warm outside the check
    with no_host_sync():
        out = flash.flash_attention(q, k, v, mask, 0.3, _p(), tile=16)
        out.sum().backward()


# --- the GPU build (compiled for an H100 without one) -------------------------------------

PTX_SCRIPT = r"""
import json, re, sys
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qat.quant.attention import flash_kernels

out = []
for name in ("flash_forward_kernel", "flash_backward_dq_kernel", "flash_backward_dkv_kernel"):
    kernel = getattr(flash_kernels, name)
    const = dict(BM=64, BN=64, DP=128, DVP=128, SCALE=True, MASK_KIND=1, ROUND_ADD=False,
                 WIDEN=False, QUANT_P=True, PB=16, P0=3, P1=8.0, P2=7.0, P3=-127, P4=128, P5=0)
    const = {k: v for k, v in const.items() if k in kernel.arg_names}
    sig = {}
    for a in kernel.arg_names:
        if a in const:
            sig[a] = "constexpr"
        elif a == "mask_ptr":
            sig[a] = "*u8"
        elif a in ("m_ptr", "l_ptr", "delta_ptr"):
            sig[a] = "*fp32"
        elif a.endswith("_ptr"):
            sig[a] = "*bf16"
        else:
            sig[a] = "fp32" if a in ("scaling", "FILL", "MASK_MIN") else "i32"
    ptx = triton.compile(ASTSource(kernel, sig, constexprs=const),
                         target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": 4, "enable_fp_fusion": False}).asm["ptx"]
    out.append({"name": name, "wgmma": "wgmma.mma_async" in ptx, "spills": ".local" in ptx,
                "div": sorted(set(re.findall(r"\bdiv\.[a-z0-9.]+f32", ptx)))})
print(json.dumps(out))
"""


def test_gpu_build_compiles_with_tensor_cores():
    """The three kernels (bfloat16, boolean mask, BFP P) compiled for sm_90 without a GPU: they
    build, their matmuls run on tensor cores (wgmma), nothing spills to local memory, and the
    softmax division is the correctly rounded one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo = str(REPO)
    res = subprocess.run(
        [sys.executable, "-c", PTX_SCRIPT, repo],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if res.returncode != 0 and ("ptxas" in res.stderr or "backend" in res.stderr.lower()):
        pytest.skip(f"triton cannot compile for CUDA here: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr
    cases = json.loads(res.stdout.strip().splitlines()[-1])
    assert [c["name"] for c in cases] == [
        "flash_forward_kernel",
        "flash_backward_dq_kernel",
        "flash_backward_dkv_kernel",
    ]
    for c in cases:
        assert c["wgmma"] and not c["spills"] and c["div"] == ["div.rn.f32"], c
