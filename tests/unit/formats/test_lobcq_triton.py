"""The LO-BCQ Triton kernel (``qat.formats.kernels._lobcq_triton``) equals the reference
``LOBCQ.quantize`` bit for bit: at real sizes, on hostile arrays (the CPU kernel's), in fp32,
fp16 and bf16, along any dim, for other codebook counts and lengths; straight-through and
compiled for sm_90 without contraction or approximate maths.

Without CUDA it runs under Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny import REPO as ROOT

triton = pytest.importorskip("triton")

from test_cpu_lobcq import hostile  # noqa: E402

import qat.formats.kernels._lobcq_ops as lobcq_ops  # noqa: E402
from qat.formats import make_format  # noqa: E402
from qat.formats.fit.lobcq import save_codebooks  # noqa: E402
from qat.formats.kernels import supports_triton, triton_fake_quantize  # noqa: E402
from qat.quant.backends import fake_quantize, resolve_backend  # noqa: E402

REPO = str(ROOT)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
LOBCQ = {"format": "lobcq"}


def check(x: torch.Tensor, fmt, dim: int = -1) -> None:
    got = triton_fake_quantize(x.to(DEVICE), fmt, dim).cpu()
    want = fmt.quantize(x, dim)
    iv = INT_VIEW[x.dtype]
    same = got.view(iv) == want.view(iv)
    assert same.all(), (int((~same).sum()), x[~same][:4], got[~same][:4], want[~same][:4])


@pytest.mark.parametrize(
    "shape,dim", [((2048, 576), -1), ((2, 2048, 64), -2)], ids=["activation", "V"]
)
def test_real_sizes(shape, dim):
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=g) * torch.exp(torch.randn(*shape, generator=g))
    check(x, make_format(LOBCQ), dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [576, 70, 5])
def test_hostile_arrays(n, dtype):
    x = hostile(64, n, seed=n).to(dtype)
    fmt = make_format(LOBCQ)
    check(x, fmt)
    check(x.T.contiguous(), fmt, 0)  # arrays down the columns: neighbouring rows in a tile


@pytest.mark.parametrize(
    "num_codebooks,block_len,array_len", [(1, 8, 64), (5, 3, 48), (17, 8, 64), (64, 16, 128)]
)
def test_other_codebook_counts_and_lengths(tmp_path, num_codebooks, block_len, array_len):
    g = torch.Generator().manual_seed(num_codebooks)
    books = torch.randint(-31, 32, (num_codebooks, 16), generator=g).sort(-1).values
    books[1:2] = books[:1]  # a duplicate codebook: ties go to the lower index
    path = tmp_path / "cb.json"
    save_codebooks(str(path), books.float(), block_len, array_len)
    fmt = make_format(
        {
            "format": "lobcq",
            "num_codebooks": num_codebooks,
            "block_len": block_len,
            "array_len": array_len,
            "codebook_file": str(path),
        }
    )
    assert supports_triton(fmt)
    check(hostile(40, 3 * array_len + block_len + 1, seed=block_len), fmt)


def test_the_gpu_tile_with_partial_tiles(monkeypatch):
    """The tile a GPU launches (32 rows at the defaults), rows and arrays cut mid-tile."""
    monkeypatch.setattr(lobcq_ops, "INTERPRET_TILE_ELEMS", lobcq_ops.TILE_ELEMS)
    x = hostile(45, 150, seed=3)
    check(x, make_format(LOBCQ))
    check(x.reshape(3, 15, 150).transpose(0, 1).contiguous(), make_format(LOBCQ), 0)


def test_backend_triton_runs_the_kernel_straight_through():
    fmt = make_format(LOBCQ)
    assert resolve_backend("triton", fmt, torch.device(DEVICE)) == "triton"
    x = torch.randn(4, 128, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fake_quantize(x, fmt, -1, "triton")
    assert saved == []
    assert torch.equal(y.detach().cpu(), fmt.quantize(x.detach().cpu()))
    upstream = torch.randn(4, 128, device=DEVICE)
    y.backward(upstream)
    assert torch.equal(x.grad, upstream)


def test_custom_op_passes_opcheck():
    x = torch.randn(8, 64, device=DEVICE)
    flat = [v for row in make_format(LOBCQ).codebooks for v in row]
    torch.library.opcheck(torch.ops.qat.lobcq_fake_quantize, (x, -1, 8, 64, flat))


PTX_SCRIPT = r"""
import importlib.util, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def load(name):  # by path: importing the qat package would pull in transformers (slow)
    spec = importlib.util.spec_from_file_location(name, f"{sys.argv[1]}/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

sys.modules["qat.formats.kernels._triton_kernels"] = load("_triton_kernels")
kernel = load("_lobcq_triton").lobcq_kernel
out = []
for dt in ("fp32", "bf16"):
    sig = {"x_ptr": "*" + dt, "y_ptr": "*" + dt, "table_ptr": "*fp32", "n": "i32",
           "inner": "i32", "rows": "i32", "arrays": "i32"}
    const = dict(LB=8, LA=64, LAP=64, NBP=8, NCP=16, TILE=32)
    sig.update({c: "constexpr" for c in const})
    src = ASTSource(kernel, sig, constexprs=const)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": 4, "enable_fp_fusion": False}).asm["ptx"]
    out.append({"ops": sorted(set(re.findall(r"\b(?:fma|ex2|lg2|div|rcp|sqrt)\.[a-z0-9.]+", ptx))),
                "ftz": ".ftz" in ptx})
print(json.dumps(out))
"""


def test_gpu_build_is_exact_by_construction():
    """Compiled for sm_90 (no GPU needed): no FMA contraction, no approximate exp2 / log2 /
    division / reciprocal, no flush-to-zero (a subnormal y keeps its floor); amax / 31 is an
    IEEE division."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    kdir = os.path.join(REPO, "qat", "formats", "kernels")
    res = subprocess.run(
        [sys.executable, "-c", PTX_SCRIPT, kdir],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if res.returncode != 0 and ("ptxas" in res.stderr or "backend" in res.stderr.lower()):
        pytest.skip(f"triton cannot compile for CUDA here: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr
    for case in json.loads(res.stdout.strip().splitlines()[-1]):
        assert not case["ftz"], case
        assert "div.rn.f32" in case["ops"], case
        assert set(case["ops"]) <= {"div.rn.f32", "div.s32", "div.s64"}, case
