"""``scale: mse``: per block the best of the max-rule exponent and its neighbours.

Hand-computed blocks where mse moves the exponent down or up, the per-block error property
against the max rule (float64, exact), bit equality across backends and through the packed
export, the refusal on formats without the choice, and the default left bit for bit alone.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat.formats import FormatError, make_format
from qat.formats.base import to_blocks
from qat.formats.scale import fixed_point_bits
from qat.quant.backends import fake_quantize
from qat.quant.config import QuantConfig

MSE_FORMATS = [
    "bfp",
    "block_minifloat",
    "block_log",
    "mxfp8_e4m3",
    "mxfp8_e5m2",
    "mxfp6_e2m3",
    "mxfp6_e3m2",
    "mxfp4",
    "mxint8",
]
PROPERTY_SPECS = [
    {"format": "bfp", "width": 2, "block_size": 8},
    {"format": "bfp", "width": 4},
    {"format": "bfp", "width": 6, "exponent_width": 4, "block_size": 7},
    {"format": "block_minifloat", "width": 6, "exponent_width": 2, "bias_width": 4},
    {"format": "block_log", "width": 4, "block_size": 8},
    *[{"format": n} for n in MSE_FORMATS[3:]],
]


def mse(spec: dict):
    return make_format({**spec, "scale": "mse"})


# --- hand-computed blocks -----------------------------------------------------------------


def test_bfp_block_with_one_clipped_value_takes_the_smaller_exponent():
    # W4 (M = 3), blocks of 8. max|x| = 9/16 -> e = ceil(log2 9/16) = 0, step 2^(0-3) = 1/8:
    # 9/16 -> 4/8 (a tie, to even), each 3/16 = 1.5 steps -> 2/8 (to even); squared error
    # (1/16)^2 + 7 (1/16)^2 = 8/256. e - 1: step 1/16, largest 7/16: 9/16 clips to 7/16, the
    # 3/16 are exact; error (2/16)^2 = 4/256 < 8/256. e + 1: step 1/4, the same 8/256.
    x = torch.tensor([9, 3, -3, 3, -3, 3, -3, 3]) / 16
    spec = {"format": "bfp", "width": 4, "block_size": 8}
    assert torch.equal(
        make_format(spec).quantize(x), torch.tensor([8, 4, -4, 4, -4, 4, -4, 4]) / 16
    )
    assert torch.equal(mse(spec).quantize(x), torch.tensor([7, 3, -3, 3, -3, 3, -3, 3]) / 16)
    enc = mse(spec).encode(x)
    assert enc.scales.tolist() == [-1]
    assert enc.codes.tolist() == [[7, 3, 8 | 3, 3, 8 | 3, 3, 8 | 3, 3]]  # sign in bit 3


def test_mxint8_block_takes_the_smaller_exponent():
    # max|x| = 1 -> e = 0, elements k/64: 3/128 and 5/128 are ties -> 4/128 each (to even),
    # error 2 (1/128)^2. e - 1: elements k/128, 1 clips to 127/128, 3/128 and 5/128 exact:
    # error (1/128)^2.
    x = torch.zeros(32)
    x[:3] = torch.tensor([128, 3, 5]) / 128
    fmt = make_format({"format": "mxint8"})
    assert fmt.quantize(x)[:3].tolist() == [1.0, 4 / 128, 4 / 128]
    assert mse({"format": "mxint8"}).quantize(x)[:3].tolist() == [127 / 128, 3 / 128, 5 / 128]
    assert mse({"format": "mxint8"}).encode(x).scales.tolist() == [-1]


def test_mxfp4_block_takes_the_larger_exponent():
    # max|x| = 7.5 -> e = floor(log2 7.5) - 2 = 0: 7.5 saturates to 6 and 1.25 -> 1 (a tie,
    # to the even mantissa), error 1.5^2 + 0.25^2. e + 1: 7.5/2 = 3.75 -> 4 -> 8 and
    # 1.25/2 = 0.625 -> 0.5 -> 1, error 0.5^2 + 0.25^2.
    x = torch.zeros(32)
    x[:2] = torch.tensor([7.5, 1.25])
    assert make_format({"format": "mxfp4"}).quantize(x)[:2].tolist() == [6.0, 1.0]
    assert mse({"format": "mxfp4"}).quantize(x)[:2].tolist() == [8.0, 1.0]
    assert mse({"format": "mxfp4"}).encode(x).scales.tolist() == [1]


def test_ties_keep_the_max_rule_exponent():
    # W5 (M = 4): e = ceil(log2 0.375) = -1, 0.375 = 12 * 2^-5 is exact, and also on e + 1's
    # grid (6 * 2^-4): both errors are 0 and the tie keeps e (e - 1 clips it to 15 * 2^-6).
    x = torch.zeros(16)
    x[0] = 0.375
    enc = mse({"format": "bfp", "width": 5}).encode(x)
    assert enc.scales.tolist() == [-1]


# --- the property: never worse than max, per block ----------------------------------------


@st.composite
def blocks(draw: st.DrawFn) -> torch.Tensor:
    """Seeded float32 rows: Gaussian, heavy outliers, zeros, tiny/subnormal, huge, mixed."""
    rows, cols = draw(st.integers(1, 3)), draw(st.integers(1, 100))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["normal", "outlier", "zeros", "tiny", "huge", "grid", "mixed"]))
    x = torch.randn(rows, cols, generator=g)
    if kind == "outlier":
        x[torch.rand(rows, cols, generator=g) < 0.1] *= 50
    elif kind == "zeros":
        x[torch.rand(rows, cols, generator=g) < 0.7] = 0
    elif kind == "tiny":
        x *= 2.0**-130  # subnormal float32
    elif kind == "huge":
        x = x.clamp(-1.9, 1.9) * 2.0**126
    elif kind == "grid":  # many exact ties
        x = torch.randint(-64, 65, (rows, cols), generator=g).float() / 16
    elif kind == "mixed":
        x *= 2.0 ** torch.randint(-40, 40, (rows, cols), generator=g).float()
    return x


def block_sq_errors(fmt, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (exact) squared error per block, and each block's max magnitude."""
    q = fmt.quantize(x).double()
    xb, _ = to_blocks(x.double(), fmt.block_size)
    qb, _ = to_blocks(q, fmt.block_size)
    return (qb - xb).pow(2).sum(-1), xb.abs().amax(-1)


@pytest.mark.parametrize("spec", PROPERTY_SPECS, ids=lambda s: "-".join(map(str, s.values())))
@settings(max_examples=40, deadline=None)
@given(x=blocks())
def test_mse_block_error_never_exceeds_max(spec, x):
    err_max, amax = block_sq_errors(make_format(spec), x)
    err_mse, _ = block_sq_errors(mse(spec), x)
    # The choice compares integer errors in units of 2^(E - F) (amax < 2^E): exact ordering
    # up to B * 2^(2E - F + 2) (qat/formats/scale.py); float64 squares of float32 are exact.
    b = make_format(spec).block_size
    _, e = torch.frexp(amax)
    slack = b * torch.exp2((2 * e - fixed_point_bits(b) + 2).double())
    assert (err_mse <= err_max + slack).all(), (err_mse - err_max).max()
    assert torch.isfinite(mse(spec).quantize(x)).all()


# --- the same bits everywhere -------------------------------------------------------------


def _rows(b: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 16 * b + b // 2, generator=g)
    x[1] *= 2.0 ** torch.randint(-30, 30, (x.shape[1],), generator=g).float()
    x[2, ::b] *= 40  # outliers
    x[3, : 2 * b] = 0
    x[4] = x[4].clamp(-1.9, 1.9) * 2.0**126
    x[5, 7] = float("nan")
    return x


@pytest.mark.parametrize(
    ("backend", "name"),
    [
        ("compile", "bfp"),
        ("compile", "mxfp4"),  # compiling costs ~10 s a format on a CPU
        ("triton", "bfp"),
        ("triton", "mxfp4"),
        ("triton", "mxint8"),
        ("triton", "mxfp8_e4m3"),
    ],
)
def test_backends_agree_bit_for_bit(backend, name):
    if backend == "triton":
        pytest.importorskip("triton")
    fmt = mse({"format": name})
    x = _rows(fmt.block_size)
    for dim, xx in ((-1, x), (0, x.t().contiguous())):
        want = fmt.quantize(xx, dim)
        got = fake_quantize(xx, fmt, dim, backend=backend)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (name, dim)
    # mse did change something, so equality is not just the max rule's.
    assert not torch.equal(
        fmt.quantize(x).view(torch.int32),
        make_format({"format": name}).quantize(x).view(torch.int32),
    )


KERNEL_SPECS = [
    {"format": "bfp", "width": w, "exponent_width": e, "block_size": b}
    for w, e, b in ((2, 8, 1), (3, 4, 7), (4, 8, 16), (8, 4, 32))
] + [{"format": n} for n in MSE_FORMATS[3:]]


@pytest.mark.parametrize("spec", KERNEL_SPECS, ids=lambda s: "-".join(map(str, s.values())))
def test_kernel_matches_reference_on_every_kind_of_block(spec):
    """test_kernels' rows (ties, zero blocks, subnormals, huge, NaN/inf, spread scales) in its
    three layouts, float32 and bfloat16, with scale: mse."""
    pytest.importorskip("triton")
    from test_kernels import _TRITON_VERSION, DEVICE, check_format

    bf16 = DEVICE == "cuda" or _TRITON_VERSION >= (3, 9)  # the interpreter's bf16 (test_kernels)
    for dtype in (torch.float32, torch.bfloat16) if bf16 else (torch.float32,):
        check_format({**spec, "scale": "mse"}, dtype)


def test_triton_kernel_takes_mse():
    pytest.importorskip("triton")
    from qat.formats.kernels import supports_triton

    for name in ("bfp", "mxfp4", "mxfp8_e4m3", "mxint8"):
        assert supports_triton(mse({"format": name}))
    x = torch.randn(8, 32)
    ops = torch.ops.qat  # the ops' schema, fake kernel and autograd with the mse flag set
    torch.library.opcheck(ops.bfp_fake_quantize, (x, -1, 4, 8, 16, True))
    torch.library.opcheck(ops.mx_fake_quantize, (x, 0, 32, 1, 2, 0, 6.0, False, True))


@pytest.mark.parametrize("name", MSE_FORMATS)
def test_mse_quantises_without_host_sync(name):
    from tests.unit.quant.test_no_sync import no_host_sync

    fmt = mse({"format": name})
    x = _rows(fmt.block_size)
    with no_host_sync():
        for dim in (-1, 0):
            assert fmt.quantize(x, dim).shape == x.shape


# --- packed codes and export --------------------------------------------------------------


@pytest.mark.parametrize("name", ["bfp", "mxfp4", "mxfp6_e3m2", "mxint8", "mxfp8_e5m2"])
def test_decode_of_encode_is_quantize(name):
    fmt = mse({"format": name})
    x = _rows(fmt.block_size)
    x[5, 7] = 0.0
    enc = fmt.encode(x)
    assert torch.equal(fmt.decode(enc).view(torch.int32), fmt.quantize(x).view(torch.int32))
    # The stored exponents are mse's, not the max rule's.
    assert not torch.equal(enc.scales, make_format({"format": name}).encode(x).scales)


def test_packed_weight_round_trips():
    from qat.export.packed import pack_weight, unpack_weight

    w = torch.randn(24, 70) * 0.05
    w[2, 3] = 1.5
    for name in ("bfp", "mxfp4"):
        fmt = mse({"format": name})
        tensors, meta = pack_weight(fmt, w, -1)
        assert meta["format"]["scale"] == "mse"
        assert torch.equal(
            unpack_weight(json.loads(json.dumps(meta)), tensors), fmt.quantize(w, -1)
        )


def test_exported_model_with_mse_rebuilds_identical_logits(tmp_path):
    from tiny import tiny_recipe
    from transformers import AutoModelForSequenceClassification

    from qat.export.packed import write_packed
    from qat.runs.build import build_model

    weight = {"format": "bfp", "width": 4, "scale": "mse"}
    built = build_model(tiny_recipe(tmp_path), ["--quant.weight", json.dumps(weight)], num_labels=2)
    model, tok = built.model, built.tokenizer
    out = write_packed(model, tmp_path / "export", tok)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["qat_packing"]["quant"]["weight"]["scale"] == "mse"
    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    batch = tok(["a gripping, funny film", "flat"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [{"format": "nf4"}, {"format": "bof4s"}, {"format": "int", "width": 4}, {"format": "lobcq"}],
)
def test_formats_without_the_choice_refuse_it(spec):
    msg = (
        rf"^format '{spec['format']}' has no scale choice \(got scale: 'mse'\); "
        r"scale: max \| mse works with bfp, block_log, block_minifloat, mxfp4, mxfp6_e2m3, "
        r"mxfp6_e3m2, mxfp8_e4m3, mxfp8_e5m2, mxint8$"
    )
    with pytest.raises(FormatError, match=msg):
        make_format({**spec, "scale": "mse"})


def test_bad_scale_value_is_one_clear_error():
    with pytest.raises(FormatError, match=r"^mxfp4.scale must be one of max, mse; got 'min'$"):
        make_format({"format": "mxfp4", "scale": "min"})


@pytest.mark.parametrize("name", MSE_FORMATS)
def test_default_is_the_max_rule_bit_for_bit(name):
    fmt = make_format({"format": name})
    assert fmt.scale == "max" and fmt.spec()["scale"] == "max"
    assert fmt == make_format({"format": name, "scale": "max"})
    assert "scale" not in str(fmt) and "scale=mse" in str(mse({"format": name}))
    x = _rows(fmt.block_size)
    assert torch.equal(
        fmt.quantize(x).view(torch.int32),
        make_format({"format": name, "scale": "max"}).quantize(x).view(torch.int32),
    )


def test_scale_is_overridable_per_module():
    cfg = QuantConfig(
        weight={"format": "bfp", "width": 4},
        overrides={r"\.fc2$": {"weight": {"scale": "mse"}}},
        exclude=[],
    )
    assert cfg.format_for("weight", "layer.fc2").scale == "mse"
    assert cfg.format_for("weight", "layer.fc1").scale == "max"
    assert cfg.spec_for("weight", "layer.fc2") == {"format": "bfp", "width": 4, "scale": "mse"}
