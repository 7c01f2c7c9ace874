"""The C++ BFP quantiser of ``backend: compile`` on CPU (qat.formats.kernels.cpu): equal bit for
bit to the reference ``BFP.quantize`` (signs of zero, subnormals, clamped exponents, non-finite
values included), and where it steps aside."""

import pytest
import torch

import qat.formats.kernels.cpu as cpu
import qat.quant.backends as backends
from qat.formats import make_format
from qat.quant.backends import fake_quantize


@pytest.fixture(autouse=True)
def kernel_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpu.ENV, raising=False)
    assert cpu.load(), "the CPU BFP kernel did not build"


def _hostile(rows: int, block: int, seed: int) -> torch.Tensor:
    """Gaussian blocks at scales from 2^-150 to 2^127, with hand-placed special values."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-150, 128, (rows, 1), generator=g).float())
    x = torch.randn(rows, block, generator=g) * scale
    specials = [
        (0, 0, float("nan")),
        (1, block - 1, float("inf")),
        (2, 0, -float("inf")),
        (4, 0, -1e-30),  # rounds to -0.0 beside a large value
        (4, block - 1, 1.0),
        (6, 0, 1.5 * 2.0**127),  # the exponent clamps at its top
        (7, 0, 2.0**-3),  # an exact power of two: the block max saturates
    ]
    x[3] = -0.0  # -0.0 gives +0.0 (sign(-0.0) = 0)
    x[5] = 1e-41  # subnormal block
    x[8] = -1e-45
    x[9] = 0.0
    for r, c, v in specials:
        x[r, c] = v
    return x


SPECS = [
    {"format": "bfp", "width": 4, "exponent_width": 8, "block_size": 16},  # AVX512 path
    {"format": "bfp", "width": 3, "exponent_width": 3, "block_size": 16},  # clamped exponents
    {"format": "bfp", "width": 8, "exponent_width": 8, "block_size": 32},  # vector path
    {"format": "bfp", "width": 6, "exponent_width": 5, "block_size": 8},
    {"format": "bfp", "width": 2, "exponent_width": 2, "block_size": 5},  # scalar path
    {"format": "bfp", "width": 24, "exponent_width": 8, "block_size": 16},
    {"format": "bfp", "width": 5, "exponent_width": 1, "block_size": 64},
]


@pytest.mark.parametrize(
    "spec", SPECS, ids=lambda s: f"w{s['width']}e{s['exponent_width']}b{s['block_size']}"
)
def test_kernel_equals_the_reference_bit_for_bit(spec):
    fmt = make_format(spec)
    x = _hostile(3000, fmt.block_size, seed=fmt.block_size + fmt.width)
    got = cpu.cpu_quantize_blocks(x, fmt)
    want = fmt.quantize(x, -1)
    same = got.view(torch.int32) == want.view(torch.int32)
    assert same.all(), (int((~same).sum()), x[~same][:4], got[~same][:4], want[~same][:4])
    assert got[3].eq(0).all() and not got[3].signbit().any()  # -0.0 -> +0.0
    assert got[4, 0].item() == 0.0 and got[4, 0].signbit()  # -1e-30 -> -0.0
    assert got[0, 0].isnan() and got[1, -1].item() == float("inf")


@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_compile_backend_runs_the_kernel_for_bfp_on_float32(dim, monkeypatch):
    calls: list[tuple[int, ...]] = []
    inner = backends.cpu_quantize_blocks

    def counted(blocks, fmt):
        calls.append(tuple(blocks.shape))
        return inner(blocks, fmt)

    monkeypatch.setattr(backends, "cpu_quantize_blocks", counted)
    fmt = make_format({"format": "bfp", "width": 4, "block_size": 16})
    x = torch.randn(37, 70, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    y = fake_quantize(x, fmt, dim, "compile")
    assert calls and calls[0][1] == 16
    assert torch.equal(
        y.detach().view(torch.int32), fmt.quantize(x.detach(), dim).view(torch.int32)
    )
    y.backward(torch.ones_like(y))  # straight through
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("case", ["bf16", "mse", "env", "not_built", "other_format"])
def test_other_cases_keep_the_compiled_graph(case, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the C++ kernel ran")

    monkeypatch.setattr(backends, "cpu_quantize_blocks", refuse)
    spec = {"format": "bfp", "width": 4, "block_size": 16}
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    if case == "bf16":
        x = x.bfloat16()
    elif case == "mse":
        spec = {**spec, "scale": "mse"}
    elif case == "env":
        monkeypatch.setenv(cpu.ENV, "0")
    elif case == "not_built":
        monkeypatch.setattr(cpu, "load", lambda: False)
    else:
        spec = {"format": "mxfp8_e4m3"}
    fmt = make_format(spec)
    y = fake_quantize(x, fmt, -1, "compile")
    assert torch.equal(y, fmt.quantize(x, -1))
