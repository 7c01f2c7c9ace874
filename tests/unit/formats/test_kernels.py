"""Fused Triton quantisers equal the reference ``Format.quantize`` bit for bit.

On a machine without CUDA these run under Triton's interpreter (``TRITON_INTERPRET=1``, set in
conftest.py before triton is imported); with CUDA they run the compiled kernels on the GPU.
Every comparison is on the raw bits, so a -0.0 for a +0.0 or a one-ulp difference fails.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny import REPO as ROOT

triton = pytest.importorskip("triton")

from qat.formats import kernels, make_format  # noqa: E402
from qat.formats.codebook import level_tensors  # noqa: E402
from qat.formats.kernels import (  # noqa: E402
    supports_triton,
    triton_available,
    triton_fake_quantize,
)
from qat.formats.nvfp4 import e4m3  # noqa: E402

REPO = str(ROOT)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

_TRITON_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])
BF16_SKIP = pytest.mark.skipif(
    DEVICE == "cpu" and _TRITON_VERSION < (3, 9),
    reason=f"bfloat16 needs triton >= 3.9's interpreter (have {triton.__version__})",
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

BFP_SPECS = [
    {"format": "bfp", "width": w, "exponent_width": e, "block_size": b}
    for w in range(2, 9)
    for e in (4, 8)
    for b in (1, 7, 16, 32)
]
MX_SPECS = [
    {"format": n}
    for n in ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4", "mxint8")
]
CODEBOOK_SPECS = [
    {"format": n, "block_size": b} for n in ("nf4", "af4", "bof4s") for b in (32, 64)
] + [
    {"format": "bof4", "block_size": 64},
    {"format": "nf4", "block_size": 32, "normalization": "signed_absmax"},
]
GGML_SPECS = [{"format": "ggml_q8_0"}, {"format": "ggml_q4_0"}]
NVFP4_SPEC = {"format": "nvfp4"}


def spec_id(spec: dict) -> str:
    return "-".join(str(v) for v in spec.values())


def assert_bits_equal(got: torch.Tensor, x: torch.Tensor, fmt, dim: int) -> None:
    """Kernel vs reference on the raw bits; NaNs must be the input's own bits.

    The reference widens to float32 and back, and torch's CPU bfloat16 cast turns the NaN
    0x7FC0 into 0xFFFF: NaN positions are compared with the input (the kernel passes them
    through untouched), every other position with the reference.
    """
    want = fmt.quantize(x, dim)
    assert got.shape == x.shape and got.dtype == x.dtype
    iv = INT_VIEW[x.dtype]
    nan = torch.isnan(x)
    assert torch.equal(torch.isnan(want), nan)
    g, w = got.view(iv), want.view(iv)
    assert torch.equal(g[nan], x.view(iv)[nan])
    bad = (g != w) & ~nan
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{fmt} dim={dim} {x.dtype}: {int(bad.sum())} elements differ, "
            f"first at {i}: x={x[tuple(i)].item()!r} kernel="
            f"{got[tuple(i)].item()!r} reference={want[tuple(i)].item()!r}"
        )


# --- test data: one row per kind of input, blocks of B along the row ----------------------


def element_grid(fmt) -> torch.Tensor:
    """Non-negative values of an MX element format (float64)."""
    if fmt.name == "mxint8":
        return torch.arange(128, dtype=torch.float64) / 64
    m, emin = fmt.mantissa_bits, fmt.emin
    vals = [k * 2.0 ** (emin - m) for k in range(2**m)]
    e = emin
    while True:
        row = [2.0**e * (1 + k / 2**m) for k in range(2**m)]
        vals += [v for v in row if v <= fmt.max_value]
        if row[-1] >= fmt.max_value:
            break
        e += 1
    return torch.tensor(sorted(set(vals)), dtype=torch.float64)


def tie_row(fmt, n: int, gen: torch.Generator) -> torch.Tensor:
    """Values on the exact midpoints (and points) of the format's rounding grid."""
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    if fmt.name == "bfp":
        # With every |x| < 1 (and one near 1) the shared exponent is 0 and the mantissa grid is
        # the integers / 2^M: half-integers / 2^M are ties.
        m = fmt.width - 1
        k = torch.randint(0, 2**m, (n,), generator=gen).double()
        v = (k + 0.5) / 2**m
        v[:: fmt.block_size] = 0.96875
    elif fmt.name.startswith("mx"):
        grid = element_grid(fmt)
        cand = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, grid[-1:] + 0.25])
        v = cand[torch.randint(0, len(cand), (n,), generator=gen)]
        v[:: fmt.block_size] = fmt.max_value  # sets the block's scale to 2^0
    elif fmt.name.startswith("ggml"):
        # A block max of 127 (Q8_0) or -8 (Q4_0) makes d = 1: x * (1/d) is x, so half-integers
        # are ties of roundf (Q8_0) and of trunc(x + 8.5) (Q4_0).
        top = 127 if fmt.name == "ggml_q8_0" else 8
        k = torch.randint(-top, top, (n,), generator=gen).double()
        v = k + 0.5
        v[:: fmt.block_size] = -float(top) if top == 8 else float(top)
        v[1 :: fmt.block_size] = float(top)  # the largest |x| with both signs
        odd = (torch.arange(n) // fmt.block_size) % 2 == 1
        sign = torch.where(odd, -1.0, 1.0).double()  # ...the positive one first in odd blocks
    elif fmt.name == "nvfp4":
        # A max of 6 in every block and the tensor: g = 448, s = 448, S = 1 (times the scale
        # below), so E2M1's midpoints are ties.
        grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
        cand = torch.cat([grid, (grid[1:] + grid[:-1]) / 2])
        v = cand[torch.randint(0, len(cand), (n,), generator=gen)]
        v[:: fmt.block_size] = 6.0
    else:
        lv, mids = level_tensors(fmt.levels, torch.device("cpu"))
        cand = torch.cat([mids, lv]).double()
        v = cand[torch.randint(0, len(cand), (n,), generator=gen)].abs()
        v[:: fmt.block_size] = 1.0  # scale 1: x / s is exactly the midpoint
        sign[1 :: fmt.block_size] = -1.0  # ...and a tie in |x| for signed absmax
        v[1 :: fmt.block_size] = 1.0
        sign[:: 2 * fmt.block_size] = -1.0
    scale = 2.0 ** torch.randint(-3, 4, (1,), generator=gen).double()
    return v * sign * scale


def rows(fmt, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """[9, n] rows in ``dtype``: normal, heavy tails, ties x2, zero blocks (with -0.0), tiny and
    subnormal, huge, NaN/inf-laced, and per-block scales spread over 2^-30..2^30."""
    gen = torch.Generator().manual_seed(seed)
    b = fmt.block_size
    fi = torch.finfo(dtype)
    normal = torch.randn(n, generator=gen, dtype=torch.float64)
    heavy = _student_t(n, gen)
    zeros = torch.randn(n, generator=gen, dtype=torch.float64)
    zeros[: min(b, n)] = 0.0
    zeros[1 : min(b, n) : 2] = -0.0
    if n > 2 * b:
        zeros[2 * b : 3 * b] = -0.0
    tiny = torch.rand(n, generator=gen, dtype=torch.float64) * 4 * fi.tiny
    tiny[::3] *= -fi.eps  # deep in the subnormals (or flushed to 0)
    huge = (0.5 + torch.rand(n, generator=gen, dtype=torch.float64) / 2) * fi.max
    huge[::2] *= -1
    nonfinite = torch.randn(n, generator=gen, dtype=torch.float64)
    pick = torch.rand(n, generator=gen)
    nonfinite[pick < 0.1] = float("nan")
    nonfinite[(pick >= 0.1) & (pick < 0.15)] = float("inf")
    nonfinite[(pick >= 0.15) & (pick < 0.2)] = -float("inf")
    nonfinite[:b] = float("nan")  # a block with no finite element
    nonfinite[b : b + 2] = torch.tensor([float("inf"), 1e4])  # inf beside the block's max
    spread = torch.randn(n, generator=gen, dtype=torch.float64)
    nblocks = -(-n // b)
    exps = torch.randint(-30, 31, (nblocks,), generator=gen).double()
    spread *= (2.0**exps).repeat_interleave(b)[:n]
    out = torch.stack(
        [
            normal,
            heavy,
            tie_row(fmt, n, gen),
            tie_row(fmt, n, gen),
            zeros,
            tiny,
            huge,
            nonfinite,
            spread,
        ]
    )
    return out.to(dtype)


def _student_t(n: int, gen: torch.Generator) -> torch.Tensor:
    """Student-t samples (1.5 degrees of freedom) from a seeded generator."""
    z = torch.randn(n, generator=gen, dtype=torch.float64)
    chi2 = torch.randn(2, n, generator=gen, dtype=torch.float64).pow(2).sum(0) * 0.75
    return z / (chi2 / 1.5).sqrt()


def layouts(base: torch.Tensor):
    """The [9, n] rows blocked along the last dim, a middle dim (3 columns after it) and the
    first dim (16 columns after it, the kernel's wide layout): contiguous copies."""
    r, n = base.shape
    yield base, -1
    yield base.reshape(3, 3, n).transpose(1, 2).contiguous(), 1  # [3, n, 3], blocks along 1
    wide = torch.cat([base, -base[:7].flip(1)])  # 16 rows
    yield wide.t().contiguous(), 0  # [n, 16], blocks along 0


def length(fmt) -> int:
    """Three blocks and a ragged one (block size 1 has no ragged block)."""
    b = fmt.block_size
    return 3 * b + max(b // 2, 1) if b > 1 else 5


def check_format(spec: dict, dtype: torch.dtype) -> None:
    fmt = make_format(spec)
    assert supports_triton(fmt)
    base = rows(fmt, length(fmt), dtype).to(DEVICE)
    for x, dim in layouts(base):
        assert_bits_equal(triton_fake_quantize(x, fmt, dim), x, fmt, dim)


# --- equality with the reference ----------------------------------------------------------
# The interpreter costs ~0.1 s a launch: every BFP shape in float32, the 16-bit dtypes on a
# spread of BFP shapes and on every MX and codebook format; every case in all three layouts.

BFP_SPREAD = [
    {"format": "bfp", "width": w, "exponent_width": e, "block_size": b}
    for w, e, b in ((2, 8, 1), (3, 4, 7), (4, 8, 16), (8, 4, 32))
]


@pytest.mark.parametrize("spec", BFP_SPECS, ids=spec_id)
def test_bfp_matches_reference(spec):
    check_format(spec, torch.float32)


def case(spec: dict, dtype: torch.dtype):
    marks = [BF16_SKIP] if dtype == torch.bfloat16 else []
    return pytest.param(spec, dtype, id=f"{spec_id(spec)}-{str(dtype)[6:]}", marks=marks)


@pytest.mark.parametrize(
    "spec,dtype",
    [case(s, d) for s in BFP_SPREAD for d in DTYPES[1:]]
    + [case(s, d) for s in MX_SPECS + CODEBOOK_SPECS + GGML_SPECS for d in DTYPES],
)
def test_formats_match_reference_in_every_dtype(spec, dtype):
    check_format(spec, dtype)


def bof4_file(tmp_path, levels: list[float]) -> str:
    path = tmp_path / "bof4.json"
    path.write_text(
        json.dumps({"kind": "bof4", "metric": "mse", "block_size": 32, "levels": levels})
    )
    return str(path)


@pytest.mark.parametrize("dtype", DTYPES)
# the interpreter runs the kernel in numpy, which warns where the test drives it past the max
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
def test_saturates_to_the_dtype_like_the_reference(tmp_path, dtype):
    """A fitted codebook may have levels beyond +-1, so ``level * s`` can pass the dtype's
    largest finite value: both paths then give that value, never inf."""
    levels = [1.5 * (-1.0 + 2 * i / 15) for i in range(16)]
    fmt = make_format(
        {"format": "bof4", "block_size": 32, "codebook_file": bof4_file(tmp_path, levels)}
    )
    big = torch.finfo(dtype).max
    x = torch.linspace(-1, 1, 64, dtype=torch.float64).reshape(2, 32) * big
    x = x.to(dtype).to(DEVICE)
    got = triton_fake_quantize(x, fmt, -1)
    assert torch.isfinite(got).all()
    assert got.abs().max().item() == big
    assert_bits_equal(got, x, fmt, -1)


@pytest.mark.parametrize("with_zero", [True, False])
def test_codebook_from_file_matches_reference(tmp_path, with_zero):
    """A fitted table (bof4 at block 32 has no built-in one), also one without a 0 level."""
    levels = [-1.0 + 2 * i / 15 for i in range(16)]
    if with_zero:
        levels[7] = 0.0
    path = bof4_file(tmp_path, levels)
    check_format({"format": "bof4", "block_size": 32, "codebook_file": path}, torch.float32)


@pytest.mark.parametrize("shape,dim", [((), 0), ((), -1), ((1,), 0), ((0, 4), 1), ((4, 5), -2)])
def test_degenerate_shapes(shape, dim):
    """Scalars, one element, empty tensors and negative dims, as the reference."""
    fmt = make_format({"format": "bfp", "width": 4, "block_size": 4})
    x = (torch.randn(shape) * 3).to(DEVICE)
    got = triton_fake_quantize(x, fmt, dim)
    assert_bits_equal(got, x, fmt, dim)


@pytest.mark.parametrize("shape,dim", [((4, 5), 2), ((4, 5), -3), ((), 1)])
def test_dim_out_of_range_is_the_references_error(shape, dim):
    fmt = make_format({"format": "bfp"})
    x = torch.randn(shape, device=DEVICE)
    with pytest.raises(IndexError) as want:
        fmt.quantize(x, dim)
    with pytest.raises(IndexError) as got:
        triton_fake_quantize(x, fmt, dim)
    assert str(got.value) == str(want.value)


def test_non_contiguous_input():
    fmt = make_format({"format": "mxfp4"})
    x = torch.randn(64, 48, device=DEVICE).t()[:, ::2]
    assert not x.is_contiguous()
    assert_bits_equal(triton_fake_quantize(x, fmt, -1), x, fmt, -1)


# --- llama.cpp block types: hand-made blocks ----------------------------------------------


def fma_sensitive_q4(d: float) -> list[float]:
    """float32 x where Q4_0's code trunc(x * (1/d) + 8.5) differs between rounding the product
    first (C, the reference) and a fused multiply-add (one rounding): the ties a GPU would get
    wrong if the kernel's product and add were contracted into an FMA."""
    d32 = torch.tensor(d, dtype=torch.float32)
    inv = (1.0 / d32).double()
    found = []
    for j in range(-8, 8):  # x / d near j + 0.5: + 8.5 lands near an integer
        centre = torch.tensor((j + 0.5) * d, dtype=torch.float32)
        steps = torch.arange(-40, 41, dtype=torch.int32)
        xs = (centre.view(torch.int32) + steps).view(torch.float32)
        p = xs.double() * inv  # exact: 24 x 24 bits
        twice = (p.float().double() + 8.5).float().trunc()
        fused = (p + 8.5).float().trunc()  # p + 8.5 exact in float64 at these magnitudes
        found += xs[twice != fused].tolist()
    assert len(found) >= 2, found  # the search itself must find such values
    return found[:31]


def ggml_blocks(q4: bool) -> torch.Tensor:
    """float32 [n, 32] blocks: signed zeros, the largest |x| with both signs in both orders,
    ties, d at fp16's max / past it / in its subnormals, 1/d overflowing float32, FMA traps."""
    top = 8.0 if q4 else 127.0
    ramp = torch.linspace(-1, 1, 32)
    out = [torch.zeros(32), -torch.zeros(32), torch.where(torch.arange(32) % 2 == 0, -0.0, 0.0)]
    for first in (-3.0, 3.0):  # the max with both signs: the first one sets the sign of d
        b = ramp * 2.5
        b[5], b[20] = first, -first
        out.append(b)
    out.append(torch.arange(32) - 15.5)  # d = 15.5 / 8 or 15.5 / 127: ties after 1/d
    out.append(torch.cat([torch.tensor([top]), torch.arange(-15, 16) + 0.5]))  # d = 1: ties
    for dmag in (65504.0, 65519.0, 65520.0, 70000.0, 2.0**-20, 3 * 2.0**-26, 2.0**-25, 1e-41):
        out.append(ramp * dmag * top)  # |d| = dmag (up to float32 rounding)
    for dmag in (1.1, 0.3, 3.0e-3):
        b = torch.zeros(32)
        b[0] = -8.0 * dmag if q4 else 127 * dmag
        b[1:] = (torch.arange(31) - 15 + 0.5) * dmag  # ties before float32 rounding
        if q4:
            traps = fma_sensitive_q4(float(torch.tensor(dmag).float()))
            b[1 : 1 + len(traps)] = torch.tensor(traps)
        out.append(b)
    return torch.stack(out)


@pytest.mark.parametrize("spec", GGML_SPECS, ids=spec_id)
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
def test_ggml_hand_made_blocks(spec):
    """Each block of ``ggml_blocks``, along the last dim, a middle dim and dim 0, in float32
    and (what survives the cast) float16 and bfloat16, plus a ragged last block."""
    fmt = make_format(spec)
    blocks = ggml_blocks(spec["format"] == "ggml_q4_0")
    row = blocks.reshape(-1)
    for dtype in DTYPES:
        if dtype == torch.bfloat16 and DEVICE == "cpu" and _TRITON_VERSION < (3, 9):
            continue
        base = torch.stack([row, row.flip(0)]).to(dtype)
        for x, dim in (
            (base, -1),
            (base.t().contiguous(), 0),
            (base.reshape(2, -1, 32).transpose(1, 2).contiguous(), 1),
            (base[:, : 32 * 5 + 7].contiguous(), -1),
        ):
            x = x.to(DEVICE)
            assert_bits_equal(triton_fake_quantize(x, fmt, dim), x, fmt, dim)


def test_ggml_hand_made_blocks_hit_their_cases():
    """The blocks above reach what they are there for, in the reference's own codes."""
    q4, q8 = make_format({"format": "ggml_q4_0"}), make_format({"format": "ggml_q8_0"})
    codes4, d4, _ = q4._encode_lastdim(ggml_blocks(True))
    codes8, d8, _ = q8._encode_lastdim(ggml_blocks(False))
    for d in (d4.reshape(-1).float(), d8.reshape(-1).float()):
        assert (d.abs() == 65504).sum() == 4  # 65504, 65519 round to it; 65520, 70000 saturate
        assert ((d != 0) & (d.abs() < 2.0**-14)).sum() == 2  # fp16 subnormal scales
    # Q4_0's d is max / -8: +0.0, -0.0 and -0.0 first give d = -0.0, +0.0, +0.0.
    assert torch.signbit(d4.reshape(-1)[:3]).tolist() == [True, False, False]
    assert torch.signbit(d8.reshape(-1)[:3]).tolist() == [False, False, False]
    # Q4_0: the first of two equal |max| sets d's sign (code 0); its twin clamps to code 15.
    assert codes4[3, 0, [5, 20]].tolist() == [0, 15] and codes4[4, 0, [5, 20]].tolist() == [0, 15]
    assert d4.reshape(-1)[3] == -d4.reshape(-1)[4]
    assert codes8[3, 0, [5, 20]].tolist() == [-127, 127]
    # The smallest block makes float32 1/d overflow (C's int8 cast of inf is undefined).
    amax = ggml_blocks(False).abs().amax(-1)
    assert torch.isinf(1.0 / (amax / 127)).any() and torch.isinf(1.0 / (amax / 8)).any()


# --- NVFP4: a tensor-wide scale, so one kind of row per tensor ------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_nvfp4_matches_reference(dtype):
    """Each kind of row of ``rows`` (normal, heavy tails, ties, zero blocks, tiny, huge,
    NaN/inf-laced, spread scales) as its own [9, n] tensor, so its global scale is its own."""
    if dtype == torch.bfloat16 and DEVICE == "cpu" and _TRITON_VERSION < (3, 9):
        pytest.skip("bfloat16 needs triton >= 3.9's interpreter")
    fmt = make_format({"format": "nvfp4"})
    assert supports_triton(fmt)
    every = torch.stack([rows(fmt, length(fmt), dtype, seed) for seed in range(9)], dim=1)
    for kind in every:
        for x, dim in layouts(kind.to(DEVICE)):
            assert_bits_equal(triton_fake_quantize(x, fmt, dim), x, fmt, dim)


def e4m3_traps() -> torch.Tensor:
    """float32 block maxima a near 6 m (m an E4M3 midpoint) where the scale e4m3(a / 6) (g = 1)
    differs from e4m3(a * fl(1/6)): a kernel that divided approximately would miss them."""
    grid = torch.tensor([2.0**e * (1 + k / 8) for e in range(-6, 9) for k in range(8)])
    a0 = (6 * (grid[1:] + grid[:-1]) / 2).float()
    sixth = torch.tensor(1 / 6, dtype=torch.float32)
    found = []
    for k in range(-64, 65):
        a = (a0.view(torch.int32) + k).view(torch.float32)
        found.append(a[e4m3(a / 6) != e4m3(a * sixth)])
    out = torch.cat(found)
    assert len(out) >= 10  # the search itself must find them
    return out


E4M3_TRAPS = e4m3_traps()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nvfp4_global_scale_edges():
    """All zeros, all NaN/inf, so small that g overflows (g = 1), float32's max, a tensor of
    several global-max chunks whose max sits in the last one, and E4M3 scale traps."""
    fmt = make_format({"format": "nvfp4"})
    gen = torch.Generator().manual_seed(5)
    big = torch.randn(70, 100, generator=gen)
    big[69, 99] = 40.0
    ties = torch.rand(len(E4M3_TRAPS) + 1, 16, generator=gen) * 0.01
    ties[:-1, 3] = E4M3_TRAPS  # block maxima
    ties[-1, 0] = 2688.0  # g = 1
    cases = [
        torch.zeros(4, 32),
        -torch.zeros(2, 48),
        torch.tensor([[float("nan"), float("inf"), -float("inf")] * 11]),
        torch.randn(4, 32, generator=gen) * 1e-38,
        torch.randn(4, 32, generator=gen) * 1e-36,
        torch.randn(4, 32, generator=gen).clamp(-1, 1) * torch.finfo(torch.float32).max,
        big,
        ties,
    ]
    for x in cases:
        for dim in (-1, 0):
            x = x.to(DEVICE)
            assert_bits_equal(triton_fake_quantize(x, fmt, dim), x, fmt, dim)


# --- autograd, compile, op registration ---------------------------------------------------


def test_backward_is_identity_and_saves_nothing():
    fmt = make_format({"format": "nf4", "block_size": 32})
    x = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = triton_fake_quantize(x, fmt, -1)
    assert packed == []
    upstream = torch.randn(4, 64, device=DEVICE)
    upstream[0, 0] = float("nan")  # passes unchanged, like every other value
    y.backward(upstream)
    assert torch.equal(x.grad.view(torch.int32), upstream.view(torch.int32))


def test_compile_fullgraph():
    fmt = make_format({"format": "bfp", "width": 4, "block_size": 16})
    mx = make_format({"format": "mxfp8_e4m3"})

    def fn(x):
        # No pointwise maths around the ops: the test is about tracing, not C++ codegen time.
        return triton_fake_quantize(x, fmt, -1), triton_fake_quantize(x, mx, 0)

    x = torch.randn(32, 48, device=DEVICE)
    got = torch.compile(fn, fullgraph=True)(x)
    assert torch.equal(got[0].view(torch.int32), fmt.quantize(x, -1).view(torch.int32))
    assert torch.equal(got[1].view(torch.int32), mx.quantize(x, 0).view(torch.int32))


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) kernel and autograd registration agree with the real kernel."""
    x = torch.randn(8, 32, device=DEVICE)
    ops = torch.ops.qat
    torch.library.opcheck(ops.bfp_fake_quantize, (x, -1, 4, 8, 16))
    torch.library.opcheck(ops.mx_fake_quantize, (x, 0, 32, 1, 2, 0, 6.0, False))
    torch.library.opcheck(
        ops.codebook_fake_quantize, (x, -1, 32, list(make_format({"format": "nf4"}).levels), False)
    )
    torch.library.opcheck(ops.ggml_fake_quantize, (x, -1, True))
    torch.library.opcheck(ops.ggml_fake_quantize, (x, 0, False))
    torch.library.opcheck(ops.nvfp4_fake_quantize, (x, 0))


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA's sync debug mode needs a GPU")
def test_no_host_sync_on_cuda():
    """Launching never waits for the GPU (after the first call cached the codebook tables)."""
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    fmts = [
        make_format(s)
        for s in (BFP_SPECS[0], MX_SPECS[0], CODEBOOK_SPECS[0], *GGML_SPECS, NVFP4_SPEC)
    ]
    for fmt in fmts:
        triton_fake_quantize(x, fmt, -1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for fmt in fmts:
            for dim in (-1, 0):
                triton_fake_quantize(x, fmt, dim)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --- the GPU build (compiled for an H100 without one) -------------------------------------

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

plan = load("_plan")
kernel = load("_triton_kernels").fake_quantize_kernel
cases = [  # (dtype, kind, params, block, shape, dim): one per layout
    ("bf16", plan.KIND_BFP, plan.bfp_params(4, 8), 16, (4096, 4096), -1),
    ("fp16", plan.KIND_MX, plan.mx_params(1, 2, 0, 6.0, False), 32, (512, 4096), 0),
    ("fp32", plan.KIND_CODEBOOK, plan.codebook_params((-1.0, 0.0, 1.0), True), 64, (512, 4), 0),
    # scale: mse (P5 = the error's fraction bits for the block size)
    ("bf16", plan.KIND_BFP, plan.bfp_params(4, 8, 29), 16, (4096, 4096), -1),
    ("fp16", plan.KIND_MX, plan.mx_params(1, 2, 0, 6.0, False, 28), 32, (512, 4096), 0),
    # llama.cpp Q4_0 and Q8_0 (float32 1/d, a product then + 8.5: no FMA)
    ("bf16", plan.KIND_GGML, plan.ggml_params(True), 32, (4096, 4096), -1),
    ("fp16", plan.KIND_GGML, plan.ggml_params(False), 32, (512, 4096), 0),
    # NVFP4 (amax / 6, s / g and x / S correctly rounded)
    ("bf16", plan.KIND_NVFP4, (0,) * 6, 16, (4096, 4096), -1),
]
out = []
for dt, kind, params, block, shape, dim in cases:
    p = plan.plan(shape, dim, block)
    sig = {"x_ptr": "*" + dt, "y_ptr": "*" + dt, "lv_ptr": "*fp32", "mid_ptr": "*fp32",
           "n": "i32", "inner": "i32", "nb": "i32", "total": "i32", "n_col_tiles": "i32"}
    const = dict(KIND=kind, BLOCK=block, BP=p.bp, TILE=p.tile, LAYOUT=p.layout,
                 **{f"P{i}": v for i, v in enumerate(params)})
    sig.update({c: "constexpr" for c in const})
    # What triton's launcher assumes for 16-byte aligned pointers and sizes divisible by 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(6)}
    src = ASTSource(kernel, sig, constexprs=const, attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": p.num_warps, "enable_fp_fusion": False}).asm["ptx"]
    out.append({"layout": p.layout, "kind": kind,
                "ops": sorted(set(re.findall(r"\b(?:fma|ex2|lg2|div|rcp|sqrt)\.[a-z0-9.]+", ptx))),
                "ftz": ".ftz" in ptx,
                "mem": sorted(set(re.findall(r"\b(?:ld|st)\.global[a-z0-9.]*", ptx)))})
print(json.dumps(out))
"""


def test_gpu_build_is_exact_by_construction():
    """The kernel compiled for sm_90 (no GPU needed): no FMA contraction, no approximate
    exp2/log2/division/reciprocal, no flush-to-zero, IEEE division for the codebook scale,
    ggml's 1/d and NVFP4's scales, and
    16-byte vector loads and stores on the last-dim and wide-column layouts; with scale: mse
    as well."""
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
    cases = json.loads(res.stdout.strip().splitlines()[-1])
    assert [c["layout"] for c in cases] == [0, 1, 2, 0, 1, 0, 1, 0]
    for c in cases:
        assert not c["ftz"], c
        allowed = {"div.rn.f32", "div.s32", "div.s64"}
        assert set(c["ops"]) <= allowed, c
    assert "div.rn.f32" in cases[2]["ops"]  # the codebook's x / s, correctly rounded
    assert all("div.rn.f32" in c["ops"] for c in cases[5:])  # ggml's 1/d, NVFP4's divisions
    for c in cases[:2] + cases[3:]:
        assert "ld.global.v4.b32" in c["mem"] and "st.global.v4.b32" in c["mem"], c


# --- what has no kernel -------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        {"format": "bof4", "outliers": "opq"},
        {"format": "nf4", "outliers": "opq"},
        {"format": "int", "width": 4},
        {"format": "block_minifloat"},
        {"format": "block_log"},
        {"format": "bfp", "block_size": 100000},
    ],
    ids=spec_id,
)
def test_unsupported_formats(spec):
    fmt = make_format(spec)
    assert not supports_triton(fmt)
    with pytest.raises(ValueError, match=r"^no triton kernel for format .*; use fmt.quantize$"):
        triton_fake_quantize(torch.randn(4, 8, device=DEVICE), fmt)


def test_supported_formats():
    assert triton_available()
    for spec in BFP_SPECS + MX_SPECS + CODEBOOK_SPECS + GGML_SPECS + [NVFP4_SPEC]:
        assert supports_triton(make_format(spec)), spec


def test_bad_dtype_is_one_clear_error():
    fmt = make_format({"format": "mxfp4"})
    with pytest.raises(
        TypeError,
        match=r"^mxfp4: triton kernels take float32, float16 or "
        r"bfloat16 tensors, got torch.float64$",
    ):
        triton_fake_quantize(torch.randn(4, 32, dtype=torch.float64, device=DEVICE), fmt)


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU guard")
def test_cpu_tensor_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(kernels, "_INTERPRET", False)
    fmt = make_format({"format": "mxfp4"})
    with pytest.raises(RuntimeError, match=r"^triton kernels run on CUDA tensors, got a cpu "):
        triton_fake_quantize(torch.randn(4, 32), fmt)


def test_kernel_constants_are_named_and_agree_with_the_launcher():
    # the kernels compare KIND, LAYOUT and MASK_KIND with named constants, never a bare number
    import re
    from pathlib import Path

    from qat.formats.kernels import _plan, _triton_kernels
    from qat.quant.attention import flash_kernels

    bare = re.compile(r"KIND == [0-9]|MASK_KIND == [0-9]|LAYOUT == [0-9]")
    found = [
        f"{path}:{n}"
        for path in sorted(Path(REPO, "qat").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if bare.search(line)
    ]
    assert not found, found
    # _triton_kernels.py is compiled on its own (no package), so it holds its own copies
    names = [n for n in dir(_plan) if n.startswith(("KIND_", "LAYOUT_"))]
    assert len(names) == 8
    for name in names:
        assert getattr(_triton_kernels, name).value == getattr(_plan, name), name
    for name in ("MASK_NONE", "MASK_BOOL", "MASK_ADDITIVE"):
        assert getattr(flash_kernels, name).value == getattr(_plan, name), name
    # each family's constants fill the kernel's six P slots, by name
    for params in (
        _plan.bfp_params(4, 8),
        _plan.mx_params(1, 2, 0, 6.0, False),
        _plan.codebook_params((-1.0, 0.0, 1.0), True),
        _plan.ggml_params(True),
    ):
        assert len(params) == 6 and params._fields[0] != "_0"
    assert _plan.bfp_params(4, 8, 29) == (3, 8.0, 7.0, -127, 128, 29)
    assert _plan.bfp_params(4, 8).e_hi == 128
