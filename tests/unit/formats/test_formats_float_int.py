"""Hand-computed cases for block minifloat, block log, int and fixed (MX: test_formats_mx.py).

Every expected value below is worked out by hand from the rule in the module docstring; the
comments show the arithmetic.
"""

from __future__ import annotations

import pytest
import torch

from qat.formats import FormatError, make_format

NAN, INF = float("nan"), float("inf")


def quant(spec: dict, values, dim: int = -1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return make_format(spec).quantize(torch.tensor(values, dtype=dtype), dim=dim)


def assert_same(got: torch.Tensor, expected, dtype: torch.dtype = torch.float32) -> None:
    exp = torch.tensor(expected, dtype=dtype)
    assert got.dtype == dtype
    assert torch.equal(got, exp), f"\n got {got.tolist()}\n exp {exp.tolist()}"


# --- block minifloat ------------------------------------------------------------------------

BM4 = {"format": "block_minifloat", "width": 4, "exponent_width": 2, "block_size": 8}


def test_bm_grid_ties_saturation_subnormals() -> None:
    # W4 E2 M1. Block max 3 -> e_b = floor(log2 3) = 1, scale 2. Normalised grid: subnormal
    # {0, .125}, then .25 .375 | .5 .75 | 1 1.5 (emin = -2); times 2: 0 .25 .5 .75 1 1.5 2 3.
    x = [3.0, 2.5, 0.625, 0.25, 0.125, 0.2, 0.1, -1.2]
    # 2.5: tie 2|3 -> 2 (even mantissa); .625: tie .5|.75 -> .5; .25 = smallest subnormal;
    # .125: tie 0|.25 -> 0; .2 -> .25; .1 -> 0; -1.2 -> -1.
    assert_same(quant(BM4, x), [3.0, 2.0, 0.5, 0.25, 0.0, 0.25, 0.0, -1.0])


def test_bm_block_max_rounding_up_saturates() -> None:
    # 3.9 -> e_b = 1, normalised 1.95 rounds to 2.0 -> saturates to 1.5 -> 3.0.
    assert_same(quant(BM4, [3.9, 1.0]), [3.0, 1.0])


def test_bm_small_blocks_keep_precision() -> None:
    # The reference bug made blocks with max < 1 subnormal. Defaults W8 E4 M3:
    # 0.01 -> e_b = -7: 0.01 * 128 = 1.28, step 1/8 -> 10.24 -> 10 -> 1.25/128;
    # 0.005 * 128 = 0.64 (binade -1, step 1/16) -> 10.24 -> 10 -> 0.625/128.
    got = quant({"format": "block_minifloat"}, [0.01, 0.005])
    assert_same(got, [1.25 / 128, 0.625 / 128])


def test_bm_bias_width_clamps() -> None:
    spec = {**BM4, "bias_width": 2}  # e_b in [-2, 1]
    # 100 -> e_b clamped to 1 -> saturates to 1.5 * 2 = 3.
    assert_same(quant(spec, [100.0, -100.0]), [3.0, -3.0])
    # max 0.01 -> e_b clamped up to -2: grid step 0.125 * 2^-2 = 2^-5 ~ 0.031 -> 0.01 -> 0.
    # 0.02 / 2^-5 = 0.64 -> 1 -> 2^-5.
    assert_same(quant(spec, [0.02, 0.01]), [2.0**-5, 0.0])


def test_bm_zero_block_and_ragged() -> None:
    # block 8, length 10: block 2 = [1.2, 0] (max 1.2 -> e_b 0 -> grid ... 1, 1.5).
    x = [0.0] * 8 + [1.2, 0.3]
    # 0.3 in normalised binade -2 (.25, .375): 0.3 -> nearest .25
    assert_same(quant(BM4, x), [0.0] * 8 + [1.0, 0.25])


def test_bm_exponent_width_too_large() -> None:
    with pytest.raises(FormatError, match="exponent_width"):
        make_format({"format": "block_minifloat", "width": 4, "exponent_width": 4})


# --- block log ------------------------------------------------------------------------------

BL3 = {"format": "block_log", "width": 3, "block_size": 16}


def test_bl_linear_rounding_and_ties() -> None:
    # W3: 3 magnitudes + zero. max 3 -> t = ceil(log2 3) = 2: {4, 2, 1, 0}.
    x = [3.0, 2.9, 3.1, 1.4, 1.5, 1.6, 0.6, 0.5, 0.4, -2.2]
    # 3 = 1.5*2: tie 2|4 -> even exponent 2 -> 4. 1.5: tie 1|2 -> exponent 0 -> 1.
    # 0.6 > s/2 = .5 -> 1; 0.5: tie 0|1 -> 0; 0.4 -> 0.
    assert_same(quant(BL3, x), [4.0, 2.0, 4.0, 1.0, 1.0, 2.0, 1.0, 0.0, 0.0, -2.0])


def test_bl_power_of_two_max_and_zero_block() -> None:
    # max exactly 4 -> t = 2 (top code 4 used); 0.9 -> 1; 0.26 -> 0.
    assert_same(quant(BL3, [4.0, 0.9, 0.26]), [4.0, 1.0, 0.0])
    assert_same(quant(BL3, [0.0, 0.0]), [0.0, 0.0])


def test_bl_bias_clamp_and_ragged() -> None:
    spec = {**BL3, "block_size": 2, "bias_width": 2}  # t in [-2, 1]
    # block [100, 0.75]: t = 1 -> {2, 1, .5}: 100 -> 2, 0.75 (tie .5|1, exp -1 odd) -> 1.
    # ragged block [0.3]: t = ceil(log2 .3) = -1 -> {.5, .25, .125}: .3 -> .25.
    assert_same(quant(spec, [100.0, 0.75, 0.3]), [2.0, 1.0, 0.25])


def test_bl_bits() -> None:
    assert make_format({"format": "block_log", "width": 4}).bits_per_element == 4.5


# --- int ------------------------------------------------------------------------------------

X_INT = [[7.0, 3.5, -7.0, 0.5], [14.0, 1.0, 3.0, -5.0]]


def test_int_channel() -> None:
    # W4: Qmax 7. Row 0 scale 1: 3.5 -> 4 (half-even), .5 -> 0. Row 1 scale 2:
    # 1/2 = .5 -> 0; 3/2 = 1.5 -> 2 -> 4; -5/2 = -2.5 -> -2 -> -4.
    got = quant({"format": "int", "width": 4, "granularity": "channel"}, X_INT)
    assert_same(got, [[7.0, 4.0, -7.0, 0.0], [14.0, 0.0, 4.0, -4.0]])


def test_int_tensor() -> None:
    # One scale 14/7 = 2: 7/2 = 3.5 -> 4 -> 8; 3.5/2 = 1.75 -> 2 -> 4; .5/2 -> 0.
    got = quant({"format": "int", "width": 4, "granularity": "tensor"}, X_INT)
    assert_same(got, [[8.0, 4.0, -8.0, 0.0], [14.0, 0.0, 4.0, -4.0]])


def test_int_group_ragged() -> None:
    # W3: Qmax 3, groups of 2: [6, 3] scale 2: 3/2 -> 2 -> 4; [1.5, -4.5] scale 1.5 exact;
    # ragged [5] -> 5.
    got = quant(
        {"format": "int", "width": 3, "granularity": "group", "group_size": 2},
        [6.0, 3.0, 1.5, -4.5, 5.0],
    )
    assert_same(got, [6.0, 4.0, 1.5, -4.5, 5.0])


def test_int_zero_row_and_bits() -> None:
    got = quant({"format": "int", "width": 4}, [[0.0, 0.0], [1.0, -1.0]])
    assert_same(got, [[0.0, 0.0], [1.0, -1.0]])
    assert (
        make_format(
            {"format": "int", "width": 4, "granularity": "group", "group_size": 64}
        ).bits_per_element
        == 4.25
    )
    assert make_format({"format": "int", "width": 4, "granularity": "tensor"}).bits_per_element == 4


def test_int_bad_granularity_lists_choices() -> None:
    with pytest.raises(FormatError, match="tensor, channel, group"):
        make_format({"format": "int", "granularity": "row"})


# --- fixed ----------------------------------------------------------------------------------


def test_fixed() -> None:
    # W4 F1: step .5, codes [-8, 7] -> [-4, 3.5].
    x = [0.25, 0.75, 1.25, 3.6, 10.0, -10.0, -4.1, -0.25]
    # .25/.5 = .5 -> 0; 1.5 -> 2; 2.5 -> 2; 7.2 -> 7; saturate 3.5 / -4; -.5 -> -0.
    got = quant({"format": "fixed", "width": 4, "frac_width": 1}, x)
    assert_same(got, [0.0, 1.0, 1.0, 3.5, 3.5, -4.0, -4.0, 0.0])


def test_fixed_negative_frac() -> None:
    # F = -2: step 4; W3 codes [-4, 3] -> [-16, 12]. 6/4 = 1.5 -> 2 -> 8; 10/4 = 2.5 -> 2.
    got = quant({"format": "fixed", "width": 3, "frac_width": -2}, [6.0, 10.0, 100.0])
    assert_same(got, [8.0, 8.0, 12.0])


# --- shared behaviour: dtypes, dims, non-finite ---------------------------------------------

SPECS = [
    BM4,
    {"format": "block_minifloat"},
    BL3,
    {"format": "block_log"},
    {"format": "int", "width": 4, "granularity": "tensor"},
    {"format": "int", "width": 4, "granularity": "channel"},
    {"format": "int", "width": 4, "granularity": "group", "group_size": 8},
    {"format": "fixed", "width": 6, "frac_width": 2},
    *(
        {"format": name}
        for name in ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4", "mxint8")
    ),
]
IDS = [str(make_format(s)) for s in SPECS]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dtype_matches_fp32(dtype: torch.dtype) -> None:
    # bf16/fp16 inputs are quantised in fp32 and cast back: same values as the fp32 path on
    # the same (exactly representable) inputs; the hand cases above all fit in bf16.
    got = quant(BM4, [3.0, 2.5, 0.625, 0.25], dtype=dtype)
    assert_same(got, [3.0, 2.0, 0.5, 0.25], dtype=dtype)
    got = quant(BL3, [3.0, 1.5, 0.5], dtype=dtype)
    assert_same(got, [4.0, 1.0, 0.0], dtype=dtype)
    got = quant({"format": "fixed", "width": 4, "frac_width": 1}, [0.75, 10.0], dtype=dtype)
    assert_same(got, [1.0, 3.5], dtype=dtype)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_dim_not_last(spec: dict) -> None:
    fmt = make_format(spec)
    x = torch.randn(20, 3, 5, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.equal(fmt.quantize(x, dim=0), fmt.quantize(x.movedim(0, -1)).movedim(-1, 0))
    assert torch.equal(fmt.quantize(x, dim=1), fmt.quantize(x.movedim(1, -1)).movedim(-1, 1))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_non_finite_passthrough(spec: dict) -> None:
    fmt = make_format(spec)
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    bad = torch.zeros_like(x, dtype=torch.bool)
    bad[0, 1] = bad[0, 5] = bad[1, 15] = True
    xb = x.clone()
    xb[0, 1], xb[0, 5], xb[1, 15] = NAN, INF, -INF
    got = fmt.quantize(xb)
    assert torch.isnan(got[0, 1]) and got[0, 5] == INF and got[1, 15] == -INF
    # The finite elements come out as if the bad ones were 0 (no poisoned scale).
    ref = fmt.quantize(torch.where(bad, torch.zeros_like(x), x))
    assert torch.equal(got[~bad], ref[~bad])
    assert torch.isfinite(got[~bad]).all()


@pytest.mark.parametrize(
    ("spec", "bits"),
    [
        (BM4, 4 + 8 / 8),
        ({"format": "block_minifloat"}, 8.5),
        (BL3, 3 + 8 / 16),
        ({"format": "int", "width": 4, "granularity": "channel"}, 4),
        ({"format": "int", "width": 4, "granularity": "group", "group_size": 128}, 4.125),
        ({"format": "fixed", "width": 6, "frac_width": 2}, 6),
    ],
)
def test_bits_per_element(spec: dict, bits: float) -> None:
    assert make_format(spec).bits_per_element == bits
