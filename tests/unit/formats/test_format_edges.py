"""Numerics at the edges: finite in, finite out; bad dims raise."""

import pytest
import torch

from qat.formats import FORMATS, make_format


def test_block_log_fp16_saturates_instead_of_inf():
    # ceil(log2 60000) = 16: the block's top power 2^16 is beyond fp16's 65504.
    x = torch.tensor([60000.0, 1.0, -3.0, 0.5], dtype=torch.float16)
    q = make_format({"format": "block_log", "block_size": 4}).quantize(x)
    assert q.dtype == torch.float16 and torch.isfinite(q).all()
    assert q[0].item() == torch.finfo(torch.float16).max


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_finite_input_near_dtype_max_gives_finite_output(name, dtype):
    big = torch.finfo(dtype).max
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(3, 128, generator=g) * 2 - 1) * big
    x[0, :64] = big
    x[1, :64] = -big
    x = x.to(dtype)
    assert torch.isfinite(x).all()
    q = make_format({"format": name}).quantize(x)
    assert q.dtype == dtype
    assert torch.isfinite(q).all(), (name, q[~torch.isfinite(q)][:4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int_and_lobcq_saturate_at_dtype_max(dtype):
    big = torch.finfo(dtype).max
    x = torch.full((2, 64), big, dtype=dtype)
    x[1] = -big
    for spec in ({"format": "int", "granularity": "tensor"}, {"format": "lobcq"}):
        q = make_format(spec).quantize(x)
        assert torch.equal(q.abs(), torch.full_like(q, big)), spec


def test_non_finite_values_still_pass_through():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0] * 4)
    q = make_format({"format": "bfp"}).quantize(x)
    assert torch.isnan(q[0]) and q[1] == float("inf") and q[2] == -float("inf")


@pytest.mark.parametrize("dim", [2, 7, -3])
def test_dim_out_of_range_raises(dim):
    x = torch.randn(4, 8)
    with pytest.raises(IndexError, match=f"dim {dim} is out of range for a 2-D tensor"):
        make_format({"format": "bfp"}).quantize(x, dim=dim)


def test_scalar_and_in_range_negative_dims_work():
    fmt = make_format({"format": "bfp", "block_size": 4})
    x = torch.randn(4, 8)
    assert torch.equal(fmt.quantize(x, dim=-2), fmt.quantize(x, dim=0))
    assert fmt.quantize(torch.tensor(3.3), dim=0).shape == ()
