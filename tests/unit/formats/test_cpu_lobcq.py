"""The C++ LO-BCQ quantiser of ``backend: compile`` on CPU (qat.formats.kernels.cpu_lobcq):
equal bit for bit to the reference ``LOBCQ.quantize`` on real sizes and hostile arrays
(scales from 2^-150 to the float32 maximum, midpoints, ragged rows and blocks, all-zero and
non-finite values, other codebook counts and lengths), and where it steps aside."""

import pytest
import torch

import qat.formats.kernels.cpu_lobcq as cpu_lobcq
import qat.quant.backends as backends
from qat.formats import make_format
from qat.formats.fit.lobcq import save_codebooks
from qat.quant.backends import fake_quantize


@pytest.fixture(autouse=True)
def kernel_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpu_lobcq.ENV, raising=False)
    assert cpu_lobcq.load(), "the CPU LO-BCQ kernel did not build"


def hostile(rows: int, n: int, seed: int) -> torch.Tensor:
    """Heavy-tailed rows, each array at its own scale from 2^-150 to 2^127, with hand-placed
    special values (row r, column c)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * torch.exp(torch.randn(rows, n, generator=g))
    arrays = -(-n // 64)
    scale = torch.exp2(torch.randint(-150, 128, (rows, arrays), generator=g).float())
    x = x * scale.repeat_interleave(64, dim=1)[:, :n]
    x[0, :] = 0.0  # all-zero arrays
    x[1, :] = -0.0
    x[2, :] = 1e-41  # subnormal arrays: the exponent clamps at -127
    x[3, :] = torch.randint(-62, 63, (n,), generator=g).float() / 2  # midpoints and entries
    x[3, ::64] = 31.0  # scale 2^0: y is x
    x[4, :] = torch.finfo(torch.float32).max * torch.rand(n, generator=g)  # values saturate
    x[4, ::64] = torch.finfo(torch.float32).max
    x[5, :] = float("nan")  # an all-NaN row: zeros nowhere, NaN everywhere
    x[6, ::7] = float("nan")
    x[7, ::5] = float("inf")
    x[8, ::3] = -float("inf")
    x[9, :] = torch.exp2(torch.randint(-140, 120, (n,), generator=g).float())  # powers of two
    x[10, :] = 1e-45 * torch.randint(-3, 4, (n,), generator=g)  # amax / 31 underflows
    x[11, 1::2] = -1e-40  # beside values near 1: y subnormal and negative, floor(2 y) = -1
    return x


def same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    same = got.view(torch.int32) == want.view(torch.int32)
    assert same.all(), (int((~same).sum()), got[~same][:4], want[~same][:4])


@pytest.mark.parametrize(
    "shape,dim",
    [((2048, 576), -1), ((576, 1536), -1), ((9, 128, 2048), -1), ((9, 2048, 64), -2)],
    ids=["activation", "weight", "P", "V"],
)
def test_kernel_equals_the_reference_at_real_sizes(shape, dim):
    fmt = make_format({"format": "lobcq"})
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=g) * torch.exp(torch.randn(*shape, generator=g))
    if len(shape) == 3 and dim == -1:  # P: softmax rows, a causal zero tail
        x = torch.softmax(x * 4, dim=-1).tril(diagonal=1000)
    same_bits(cpu_lobcq.cpu_lobcq_quantize(x, fmt, dim), fmt.quantize(x, dim))


@pytest.mark.parametrize("n", [576, 70, 61, 5, 1])
def test_kernel_equals_the_reference_on_hostile_arrays(n):
    fmt = make_format({"format": "lobcq"})
    x = hostile(300, n, seed=n)
    got = cpu_lobcq.cpu_lobcq_quantize(x, fmt)
    same_bits(got, fmt.quantize(x))
    assert got[0].eq(0).all() and not got[1].signbit().any()  # -0.0 -> +0.0
    assert got[5].isnan().all() and got[4].isfinite().all()


@pytest.mark.parametrize(
    "num_codebooks,block_len,array_len",
    [(1, 8, 64), (5, 3, 48), (17, 8, 64), (64, 16, 128), (16, 1, 8), (16, 64, 64)],
)
def test_other_codebook_counts_and_lengths(tmp_path, num_codebooks, block_len, array_len):
    """17 and 64 codebooks take the kernel's generic path (several vectors of lanes)."""
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
    x = hostile(200, 3 * array_len + block_len + 1, seed=block_len)  # ragged array and block
    same_bits(cpu_lobcq.cpu_lobcq_quantize(x, fmt), fmt.quantize(x))


@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_compile_backend_runs_the_kernel_for_lobcq_on_float32(dim, monkeypatch):
    calls: list[int] = []
    inner = backends.cpu_lobcq_quantize

    def counted(x, fmt, d):
        calls.append(d)
        return inner(x, fmt, d)

    monkeypatch.setattr(backends, "cpu_lobcq_quantize", counted)
    fmt = make_format({"format": "lobcq"})
    x = torch.randn(37, 70, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    y = fake_quantize(x, fmt, dim, "compile")
    assert calls == [dim]
    same_bits(y.detach(), fmt.quantize(x.detach(), dim))
    y.backward(torch.ones_like(y))  # straight through
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("case", ["bf16", "env", "not_built"])
def test_other_cases_run_the_reference(case, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the C++ kernel ran")

    monkeypatch.setattr(backends, "cpu_lobcq_quantize", refuse)
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    if case == "bf16":
        x = x.bfloat16()
    elif case == "env":
        monkeypatch.setenv(cpu_lobcq.ENV, "0")
    else:
        monkeypatch.setattr(cpu_lobcq, "load", lambda: False)
    fmt = make_format({"format": "lobcq"})
    assert torch.equal(fake_quantize(x, fmt, -1, "compile"), fmt.quantize(x, -1))


OTHER_ISA = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from test_cpu_lobcq import hostile
import qat.formats.kernels.cpu_lobcq as k
from qat.formats import make_format
assert k.load()
fmt = make_format({"format": "lobcq"})
bad = 0
for n in (576, 70, 5):
    x = hostile(300, n, seed=n)
    got, want = k.cpu_lobcq_quantize(x, fmt), fmt.quantize(x)
    bad += int((got.view(torch.int32) != want.view(torch.int32)).sum())
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "mismatches": bad}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx2", "default"])
def test_other_vector_isas(isa):
    """Built for AVX2 (8 lanes: two vectors of codebooks) and for no vector ISA, as on a CPU
    without AVX512: the same bits (a new process, as ATen reads its ISA at start)."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
    tests = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run(
        [sys.executable, "-c", OTHER_ISA, tests],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"capability": isa.upper(), "mismatches": 0}
