"""OCP MX formats: exhaustive element tables, hand-computed scales, and torchao bit-exactness."""

from __future__ import annotations

import pytest
import torch

from qat.formats import make_format

# Every non-negative finite value of the element formats, written out by hand (OCP MX v1.0
# section 5.3). Sorted value order equals code order, so mantissa-LSB parity = index parity.
FP4_E2M1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
FP6_E2M3 = (
    [k / 8 for k in range(8)]  # subnormals (emin 0): k * 2^-3
    + [1 + k / 8 for k in range(8)]  # 2^0
    + [2 + k / 4 for k in range(8)]  # 2^1
    + [4 + k / 2 for k in range(8)]  # 2^2, max 7.5
)
FP6_E3M2 = (
    [0, 0.0625, 0.125, 0.1875]  # subnormals: k * 2^-4
    + [0.25, 0.3125, 0.375, 0.4375, 0.5, 0.625, 0.75, 0.875, 1, 1.25, 1.5, 1.75]
    + [2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28]
)


def _torch_fp8_table(dtype: torch.dtype) -> list[float]:
    """Non-negative finite values of a torch fp8 dtype, decoded from all 256 bit patterns."""
    vals = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    return sorted({v for v in vals.tolist() if v == v and abs(v) != float("inf") and v >= 0})


TABLES = {
    "mxfp4": (FP4_E2M1, 2),
    "mxfp6_e2m3": (FP6_E2M3, 2),
    "mxfp6_e3m2": (FP6_E3M2, 4),
    "mxfp8_e4m3": (_torch_fp8_table(torch.float8_e4m3fn), 8),
    "mxfp8_e5m2": (_torch_fp8_table(torch.float8_e5m2), 15),
    "mxint8": ([k / 64 for k in range(128)], 0),
}


def test_tables_sizes() -> None:
    sizes = {name: len(t) for name, (t, _) in TABLES.items()}
    assert sizes == {
        "mxfp4": 8,
        "mxfp6_e2m3": 32,
        "mxfp6_e3m2": 32,
        "mxfp8_e4m3": 127,
        "mxfp8_e5m2": 124,
        "mxint8": 128,
    }
    assert max(TABLES["mxfp8_e4m3"][0]) == 448 and max(TABLES["mxfp8_e5m2"][0]) == 57344


def _with_unit_scale(name: str, probes: torch.Tensor) -> torch.Tensor:
    """Quantise each probe in its own 32-block whose max (the element max) fixes scale 1."""
    table, emax = TABLES[name]
    rows = torch.zeros(len(probes), 32)
    rows[:, 0] = max(table)  # floor(log2 max) = emax -> shared scale 2^0
    assert int(torch.tensor(max(table)).log2().floor()) == emax
    rows[:, 1] = probes
    return make_format({"format": name}).quantize(rows)[:, 1]


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_element_value_is_a_fixed_point(name: str) -> None:
    table = torch.tensor(TABLES[name][0])
    for sign in (1.0, -1.0):
        assert torch.equal(_with_unit_scale(name, sign * table), sign * table)


@pytest.mark.parametrize("name", sorted(TABLES))
def test_midpoints_round_half_even_and_neighbours_nearest(name: str) -> None:
    table = torch.tensor(TABLES[name][0], dtype=torch.float64)
    lo, hi = table[:-1], table[1:]
    mid = (lo + hi) / 2
    even = torch.where(torch.arange(len(lo)) % 2 == 0, lo, hi)  # code parity = index parity
    assert torch.equal(_with_unit_scale(name, mid.float()).double(), even)
    gap = hi - lo
    assert torch.equal(_with_unit_scale(name, (mid - gap / 8).float()).double(), lo)
    assert torch.equal(_with_unit_scale(name, (mid + gap / 8).float()).double(), hi)
    assert torch.equal(_with_unit_scale(name, (-mid).float()).double(), -even)


@pytest.mark.parametrize("name", sorted(TABLES))
def test_saturates_to_element_max(name: str) -> None:
    top = max(TABLES[name][0])
    emax = TABLES[name][1]
    # Values above the max but still in the top binade keep scale 1 and saturate.
    probe = torch.tensor([top, 2.0 ** (emax + 1) * 0.999, -(2.0 ** (emax + 1)) * 0.999])
    rows = torch.zeros(3, 32)
    rows[:, 0] = probe
    got = make_format({"format": name}).quantize(rows)[:, 0]
    assert got.tolist() == [top, top, -top]


def test_mxfp4_shared_scale_by_hand() -> None:
    x = torch.zeros(4, 32)
    x[0, :2] = torch.tensor([1.0, 0.3])  # floor(log2 1) - 2 -> X = 1/4; 0.3*4 = 1.2 -> 1
    x[1, :2] = torch.tensor([0.75, -0.1])  # X = 2^(-1-2) = 1/8; 6 -> 6; -0.8 -> -1
    x[2, :2] = torch.tensor([100.0, 40.0])  # X = 2^(6-2) = 16; 6.25 -> 6; 2.5 -> 2 (tie)
    # row 3: all zeros -> zeros
    got = make_format({"format": "mxfp4"}).quantize(x)
    exp = torch.zeros(4, 32)
    exp[0, :2] = torch.tensor([1.0, 0.25])
    exp[1, :2] = torch.tensor([0.75, -0.125])
    exp[2, :2] = torch.tensor([96.0, 32.0])
    assert torch.equal(got, exp)


def test_mxfp8_e4m3_subnormals() -> None:
    # Block max 448 -> X = 1. Smallest subnormal 2^-9; 2^-10 is the tie 0|2^-9 -> 0.
    x = torch.zeros(32)
    x[:5] = torch.tensor([448.0, 2.0**-9, 2.0**-10, 1.5 * 2.0**-10, 3 * 2.0**-10])
    got = make_format({"format": "mxfp8_e4m3"}).quantize(x)
    # 3 * 2^-10 = 1.5 * 2^-9: tie between 2^-9 (code 1) and 2^-8 (code 2) -> 2^-8
    assert got[:5].tolist() == [448.0, 2.0**-9, 0.0, 2.0**-9, 2.0**-8]


def test_e8m0_scale_clamps_at_minus_127() -> None:
    # max 2^-130: floor(log2) - emax < -127 -> X = 2^-127. FP4: 2^-130 / 2^-127 = 1/8 -> 0;
    # E4M3: 1/8 is representable -> kept.
    x = torch.zeros(32)
    x[0] = 2.0**-130
    assert make_format({"format": "mxfp4"}).quantize(x)[0] == 0
    assert make_format({"format": "mxfp8_e4m3"}).quantize(x)[0] == 2.0**-130


def test_mxint8_by_hand() -> None:
    # max 1.999 -> X = 2^0: 1.999*64 = 127.9 -> 128 -> saturate 127; ties 0.5 -> 0, 1.5 -> 2.
    x = torch.zeros(32)
    x[:5] = torch.tensor([1.999, -1.999, 1 / 128, 3 / 128, -0.3])
    got = make_format({"format": "mxint8"}).quantize(x)
    assert got[:5].tolist() == [127 / 64, -127 / 64, 0.0, 2 / 64, -19 / 64]


def test_ragged_dims_dtypes_bits() -> None:
    fmt = make_format({"format": "mxfp4"})
    x = torch.zeros(40)
    x[0], x[32], x[33] = 6.0, 3.0, 1.2  # second block (8 long): max 3 -> X = 2^(1-2)
    got = fmt.quantize(x)
    assert got[32].item() == 3.0 and got[33].item() == 1.0  # 1.2 / .5 = 2.4 -> 2 -> 1.0
    for dtype in (torch.bfloat16, torch.float16):
        out = fmt.quantize(x.to(dtype))
        assert out.dtype == dtype and torch.equal(out.float(), got)
    y = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fmt.quantize(y, dim=0), fmt.quantize(y.T.contiguous()).T)
    assert fmt.bits_per_element == 4.25
    assert make_format({"format": "mxfp6_e2m3"}).bits_per_element == 6.25
    assert make_format({"format": "mxint8", "block_size": 16}).bits_per_element == 8.5


def test_non_finite_passthrough() -> None:
    x = torch.tensor([float("nan"), float("inf"), 1.0, 0.3] + [0.0] * 28)
    got = make_format({"format": "mxfp4"}).quantize(x)
    assert torch.isnan(got[0]) and got[1] == float("inf")
    assert got[2:4].tolist() == [1.0, 0.25]  # scale from max 1, not from inf


TORCHAO_DTYPES = {
    "mxfp8_e4m3": "float8_e4m3fn",
    "mxfp8_e5m2": "float8_e5m2",
    "mxfp6_e2m3": "DTYPE_FP6_E2M3",
    "mxfp6_e3m2": "DTYPE_FP6_E3M2",
    "mxfp4": "float4_e2m1fn_x2",
}


@pytest.mark.parametrize("name", sorted(TORCHAO_DTYPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torchao(name: str, dtype: torch.dtype) -> None:
    pytest.importorskip("torchao")
    mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    attr = TORCHAO_DTYPES[name]
    elem = getattr(torch, attr) if hasattr(torch, attr) else getattr(mx_tensor, attr)
    g = torch.Generator().manual_seed(0)
    # Rows spanning 2^-30 .. 2^30 in magnitude, with exact ties and an all-zero block.
    x = torch.randn(64, 256, generator=g) * torch.exp2(
        torch.randint(-30, 30, (64, 1), generator=g).float()
    )
    x[1] = torch.round(x[1] * 8) / 8
    x[2, :32] = 0
    x = x.to(dtype)
    ref = mx_tensor.MXTensor.to_mx(
        x, elem, block_size=32, scaling_mode=ScaleCalculationMode.FLOOR
    ).dequantize(dtype)
    got = make_format({"format": name}).quantize(x)
    assert got.dtype == ref.dtype and torch.equal(got, ref)
