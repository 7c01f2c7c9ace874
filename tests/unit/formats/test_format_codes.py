"""``encode`` / ``decode``: integer codes + scales that decode to ``quantize`` bit for bit.

Every family with a packed form (BFP, MX, the codebooks with and without OPQ) is checked on
the property tests' data (test_format_properties.tensors) and on hand-made edge rows: exact
ties, zero blocks holding -0.0, subnormals, values near the dtype's max, NaN/inf, ragged
rows, scalars and empty tensors, in float32, float16 and bfloat16, along every dim. The
comparison is on the raw bits, so a -0.0 for a +0.0 fails.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_format_properties import tensors

from qat.formats import FORMATS, Format, FormatError, make_format
from qat.formats.codebook import level_tensors

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _encodes(cls: type[Format]) -> bool:
    return cls._encode_lastdim is not Format._encode_lastdim


ENCODABLE = sorted(n for n, c in FORMATS.items() if _encodes(c))
SPECS = (
    [{"format": n} for n in ENCODABLE]
    + [
        {"format": "bfp", "width": w, "exponent_width": e, "block_size": b}
        for w, e, b in ((2, 4, 7), (5, 8, 16), (8, 3, 1))
    ]
    + [
        {"format": "mxfp4", "block_size": 5},
        {"format": "nf4", "block_size": 32, "normalization": "signed_absmax"},
        {"format": "nf4", "block_size": 16, "outliers": "opq"},
        {"format": "bof4s", "outliers": "opq", "outlier_quantile": 0.5},
    ]
)


def spec_id(spec: dict) -> str:
    return "-".join(str(v) for v in spec.values())


def assert_round_trip(fmt: Format, x: torch.Tensor, dim: int) -> None:
    want = fmt.quantize(x, dim)
    got = fmt.decode(fmt.encode(x, dim))
    assert got.shape == want.shape and got.dtype == want.dtype == x.dtype
    iv = INT_VIEW[x.dtype]
    bad = got.view(iv) != want.view(iv)
    assert not bad.any(), (
        f"{fmt} dim={dim} {x.dtype}: {int(bad.sum())} elements differ, "
        f"x={x[bad][:4].tolist()} decode={got[bad][:4].tolist()} "
        f"quantize={want[bad][:4].tolist()}"
    )


def test_the_packed_families_encode() -> None:
    assert {
        "bfp",
        "mxfp4",
        "mxfp8_e4m3",
        "mxfp8_e5m2",
        "mxfp6_e2m3",
        "mxfp6_e3m2",
        "mxint8",
        "nf4",
        "af4",
        "bof4",
        "bof4s",
    } <= set(ENCODABLE)


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@settings(max_examples=25, deadline=None)
@given(
    x=tensors(), dtype=st.sampled_from(DTYPES), dim=st.sampled_from([-1, 0]), poison=st.booleans()
)
def test_decode_of_encode_is_quantize(
    spec: dict, x: torch.Tensor, dtype: torch.dtype, dim: int, poison: bool
) -> None:
    if poison:  # NaN and +-inf pass through both ways
        flat = x.reshape(-1)
        flat[::7] = float("nan")
        flat[3::11] = float("inf")
        flat[5::13] = -float("inf")
    assert_round_trip(make_format(spec), x.to(dtype), dim)


def block_of(fmt: Format) -> int:
    """Elements sharing one scale: a block, or LO-BCQ's array (its blocks share the array's)."""
    return getattr(fmt, "block_size", None) or fmt.array_len


def edge_rows(fmt: Format, n: int, dtype: torch.dtype) -> torch.Tensor:
    """[7, n]: ties on the format's grid, zero blocks with -0.0, subnormals, near dtype max,
    NaN/inf-laced, mixed block scales, plain normal."""
    g = torch.Generator().manual_seed(n)
    b = block_of(fmt)
    fi = torch.finfo(dtype)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    if fmt.name == "bfp":
        m = fmt.width - 1
        ties = (torch.randint(0, 2**m, (n,), generator=g) + 0.5) / 2**m
        ties[::b] = 0.96875
    elif fmt.name.startswith("mx"):
        grid = fmt.element_values()
        cand = torch.cat([grid, (grid[1:] + grid[:-1]) / 2])
        ties = cand[torch.randint(0, len(cand), (n,), generator=g)]
        ties[::b] = fmt.element_values()[-1]
    elif fmt.name == "nvfp4":  # E2M1 grid points and midpoints at the block max 6
        grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
        cand = torch.cat([grid, (grid[1:] + grid[:-1]) / 2])
        ties = cand[torch.randint(0, len(cand), (n,), generator=g)]
        ties[::b] = 6.0
    elif fmt.name.startswith("ggml"):  # half steps of d = 1/8 (Q4_0) and 1/127 (Q8_0)
        ties = (torch.randint(0, 8, (n,), generator=g) + 0.5) / 8
        ties[::b] = 1.0
    elif fmt.name == "lobcq":  # half steps between 6-bit integer entries at the array max 31
        ties = (torch.randint(0, 31, (n,), generator=g) + 0.5) / 31
        ties[::b] = 1.0
    else:
        lv, mids = level_tensors(fmt.levels, torch.device("cpu"))
        cand = torch.cat([mids, lv]).abs()
        ties = cand[torch.randint(0, len(cand), (n,), generator=g)]
        ties[::b] = 1.0
        ties[1::b] = 1.0  # a tie in |x| for signed absmax
    zeros = torch.randn(n, generator=g)
    zeros[:b] = 0.0
    zeros[1:b:2] = -0.0
    tiny = torch.rand(n, generator=g) * 4 * fi.tiny
    tiny[::3] *= -fi.eps
    huge = (0.5 + torch.rand(n, generator=g) / 2) * fi.max * sign
    bad = torch.randn(n, generator=g)
    bad[::5], bad[1::9], bad[2::9] = float("nan"), float("inf"), -float("inf")
    spread = torch.randn(n, generator=g) * torch.exp2(
        torch.randint(-30, 31, (n,), generator=g).float().repeat_interleave(b)[:n]
    )
    return torch.stack(
        [ties * sign, zeros, tiny, huge, bad, spread, torch.randn(n, generator=g)]
    ).to(dtype)


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_edge_rows_ragged_and_every_dim(spec: dict, dtype: torch.dtype) -> None:
    fmt = make_format(spec)
    b = block_of(fmt)
    for n in (1, b - 1, 3 * b + 5):
        if n < 1:
            continue
        x = edge_rows(fmt, n, dtype)
        assert_round_trip(fmt, x, -1)
        assert_round_trip(fmt, x.t().contiguous(), 0)
        assert_round_trip(fmt, x.reshape(7, 1, n).expand(7, 3, n).contiguous(), 2)
        assert_round_trip(fmt, x.reshape(7, 1, n).expand(7, 3, n).transpose(0, 2), 0)


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_scalar_and_empty(spec: dict) -> None:
    fmt = make_format(spec)
    assert_round_trip(fmt, torch.tensor(-0.3), 0)
    assert_round_trip(fmt, torch.tensor(float("nan")), -1)
    empty = fmt.decode(fmt.encode(torch.zeros(0, 5), 0))
    assert empty.shape == (0, 5) and empty.dtype == torch.float32


# --- what the codes are --------------------------------------------------------------------


def test_bfp_codes_are_sign_magnitude_mantissas_and_exponents() -> None:
    fmt = make_format({"format": "bfp", "width": 4, "exponent_width": 8, "block_size": 4})
    enc = fmt.encode(torch.tensor([[0.75, -0.25, 0.0, -1e-9]]))
    # max 0.75 -> e = 0, mantissas |x| * 2^3 rounded: 6, 2, 0, 0; the sign is bit 3.
    assert enc.scales.tolist() == [[0]]
    assert enc.codes.tolist() == [[[6, 8 | 2, 0, 8 | 0]]]
    assert enc.codes.dtype == torch.int32
    assert torch.signbit(fmt.decode(enc)[0, 3])  # -1e-9 rounds to -0.0, as quantize gives


@pytest.mark.parametrize(
    "name,value,code",
    [
        ("mxfp8_e4m3", 448.0, 0x7E),
        ("mxfp8_e4m3", 1.0, 0x38),
        ("mxfp8_e4m3", -(2.0**-9), 0x81),
        ("mxfp8_e5m2", 57344.0, 0x7B),
        ("mxfp8_e5m2", -1.5, 0xBE),
        ("mxfp6_e2m3", 7.5, 0x1F),
        ("mxfp6_e3m2", -28.0, 0x3F),
        ("mxfp4", 6.0, 0x7),
        ("mxfp4", -0.5, 0x9),
        ("mxint8", -127 / 64, 0xFF),
    ],
)
def test_mx_codes_are_the_ocp_element_bits(name: str, value: float, code: int) -> None:
    fmt = make_format({"format": name, "block_size": 2})
    # The block's other element pins the scale to 2^0 (its max is the element max).
    top = fmt.element_values()[-1].item()
    enc = fmt.encode(torch.tensor([value, top]))
    assert enc.scales.tolist() == [0]
    assert enc.codes[0, 0].item() == code
    assert int(enc.codes.max()) < 2**fmt.elem_bits


@pytest.mark.parametrize("name", [n for n in ENCODABLE if n.startswith("mx")])
def test_mx_element_values_are_the_grid_ascending(name: str) -> None:
    vals = make_format({"format": name}).element_values()
    assert vals[0] == 0 and (vals[1:] > vals[:-1]).all()
    # Every value is its own code: the grid as one block (scale 2^0) encodes to 0, 1, 2, ...
    fmt = make_format({"format": name, "block_size": len(vals)})
    assert vals[-1] == fmt.max_value
    enc = fmt.encode(vals)
    assert enc.scales.tolist() == [0]
    assert torch.equal(enc.codes.reshape(-1), torch.arange(len(vals), dtype=torch.int32))


def test_codebook_codes_scales_and_opq_outliers() -> None:
    fmt = make_format({"format": "nf4", "block_size": 4})
    enc = fmt.encode(torch.tensor([[0.0, -2.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0]]))
    assert enc.scales.tolist() == [[2.0], [0.0]]
    assert enc.codes[0, 0].tolist() == [7, 0, 12, 15]  # 0, -1, 0.5 -> 0.4407 (12), +1
    assert enc.extra == {}
    opq = make_format({"format": "nf4", "block_size": 8, "outliers": "opq"})
    x = torch.tensor([0.1, -0.2, 0.15, 0.05, -0.1, 0.2, 9.0, 0.0])
    enc = opq.encode(x)
    assert enc.extra["outlier_mask"].reshape(-1).nonzero().tolist() == [[6]]
    assert enc.extra["outlier_values"].reshape(-1)[6].item() == 9.0
    assert enc.scales.tolist() == [0.20000000298023224]  # the outlier is out of the max


@pytest.mark.parametrize("name", sorted(set(FORMATS) - set(ENCODABLE)))
def test_formats_without_codes_say_so(name: str) -> None:
    try:
        fmt = make_format({"format": name})
    except (FormatError, TypeError, ValueError):
        pytest.skip(f"{name} cannot be built from defaults alone")
    with pytest.raises(FormatError, match=f"format '{name}' has no integer encoding"):
        fmt.encode(torch.ones(4))
