"""BFP against hand-computed blocks (docs/formats.md)."""

import pytest
import torch

from qat.formats import FormatError, make_format


def bfp(width=4, exponent_width=8, block_size=4):
    return make_format(
        {
            "format": "bfp",
            "width": width,
            "exponent_width": exponent_width,
            "block_size": block_size,
        }
    )


def q(values, **kw):
    return bfp(**kw).quantize(torch.tensor(values, dtype=torch.float32)).tolist()


def test_hand_computed_block():
    # max 1.0 -> e = ceil(log2 1) = 0, step 2^(0-3) = 1/8; 1.0*8 = 8 saturates to 7.
    assert q([1.0, 0.5, 0.3, -0.2]) == [0.875, 0.5, 0.25, -0.25]


def test_ties_round_half_even():
    # max 3 -> e = 2, step 1/2: 1.25*2 = 2.5 -> 2, 1.75*2 = 3.5 -> 4, 0.25*2 = 0.5 -> 0.
    assert q([3.0, 1.25, 1.75, 0.25]) == [3.0, 1.0, 2.0, 0.0]
    assert q([-3.0, -1.25, -1.75, -0.25]) == [-3.0, -1.0, -2.0, -0.0]


def test_power_of_two_max_saturates_at_2M_minus_1():
    # max 4 -> e = 2, |x| * 2^(M-e) = 8 > 2^M - 1 = 7 -> 7 * 2^(e-M) = 3.5.
    assert q([4.0, 1.0], block_size=2) == [3.5, 1.0]
    assert q([4.0, 1.0], width=6, block_size=2) == [4.0 * 31 / 32, 1.0]


def test_all_zero_block_and_exact_values():
    assert q([0.0, 0.0, 0.0, 0.0, 0.75, 0.5, 0.25, 0.0], block_size=4) == [
        0.0,
        0.0,
        0.0,
        0.0,
        0.75,
        0.5,
        0.25,
        0.0,
    ]


def test_ragged_last_block_is_padded_not_mixed():
    # blocks [1, 2, 3, 5] and [8]: the lone 8 gets its own exponent 3 (step 1, saturates at 7).
    out = q([1.0, 2.0, 3.0, 5.0, 8.0])
    # first block: max 5 -> e = 3, step 1: 1, 2, 3, 5 exact.
    assert out == [1.0, 2.0, 3.0, 5.0, 7.0]


def test_exponent_width_clamps_the_shared_exponent():
    # E = 2: e in [-1, 2]. 100 -> e = 7 clamps to 2: step 0.5, saturates at 3.5.
    assert q([100.0, 1.0], exponent_width=2, block_size=2) == [3.5, 1.0]
    # 0.01 -> e = -6 clamps to -1: step 2^-4, 0.01 * 16 = 0.16 rounds to 0.
    assert q([0.01, 0.0], exponent_width=2, block_size=2) == [0.0, 0.0]


def test_tiny_values_are_quantised_not_passed_through():
    # The reference code passed |x| <= 1e-8 through; we quantise every element.
    # 2^-30 * [1.5, 0.3]: e = -29, step 2^-32: 6 and 1.2 -> 1 steps.
    x = torch.tensor([1.5, 0.3]) * 2.0**-30
    out = bfp(block_size=2).quantize(x)
    assert out.tolist() == [6 * 2.0**-32, 1 * 2.0**-32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtype_preserved_and_values_exact(dtype):
    x = torch.tensor([[1.0, 0.5, 0.3, -0.2], [3.0, 1.25, 1.75, 0.25]], dtype=dtype)
    out = bfp().quantize(x)
    assert out.dtype == dtype and out.shape == x.shape
    expected = bfp().quantize(x.float())
    assert torch.equal(out.float(), expected)


def test_blocking_dim():
    x = torch.randn(8, 12)
    fmt = bfp(block_size=4)
    assert torch.equal(fmt.quantize(x, dim=0), fmt.quantize(x.t(), dim=-1).t())
    # blocks run along dim 0 here, so a row scaled up changes only its own column blocks' rows
    y = torch.randn(3, 5, 16)
    assert torch.equal(fmt.quantize(y, dim=1), fmt.quantize(y.transpose(1, 2)).transpose(1, 2))


def test_error_bounded_by_half_step_and_idempotent():
    torch.manual_seed(0)
    x = torch.randn(64, 64)
    fmt = bfp(width=6, block_size=16)
    out = fmt.quantize(x)
    blocks = x.reshape(64, 4, 16)
    e = torch.ceil(torch.log2(blocks.abs().amax(-1, keepdim=True)))
    step = 2.0 ** (e - 5)
    err = (out.reshape(64, 4, 16) - blocks).abs()
    saturated = blocks.abs() > (31 * step)
    assert (err[~saturated] <= step.expand_as(err)[~saturated] / 2).all()
    # Idempotent except where a block max rounded to an exact power of two: the definition's
    # ceil(log2) then lowers the exponent and the max saturates (a quirk of the paper's rule).
    again = fmt.quantize(out).reshape(64, 4, 16)
    amax = out.reshape(64, 4, 16).abs().amax(-1)
    pow2 = amax == torch.exp2(torch.log2(amax).round())
    assert torch.equal(again[~pow2], out.reshape(64, 4, 16)[~pow2])
    assert pow2.any() and not torch.equal(again[pow2], out.reshape(64, 4, 16)[pow2])


def test_non_finite_pass_through():
    x = torch.tensor([float("nan"), 1.0, float("inf"), -0.5])
    out = bfp().quantize(x)
    assert torch.isnan(out[0]) and out[2] == float("inf")
    assert out[1].item() == 0.875 and out[3].item() == -0.5


def test_bits_per_element():
    assert bfp(width=6, block_size=16).bits_per_element == 6.5
    assert bfp(width=4, block_size=16).bits_per_element == 4.5


@pytest.mark.parametrize(
    "spec,needle",
    [
        ({"format": "bfp", "width": 1}, "width"),
        ({"format": "bfp", "block_size": 0}, "block_size"),
        ({"format": "bfp", "widht": 4}, "did you mean 'width'"),
        ({"format": "bpf"}, "valid formats"),
    ],
)
def test_bad_specs_name_the_parameter(spec, needle):
    with pytest.raises(FormatError, match=needle):
        make_format(spec)
