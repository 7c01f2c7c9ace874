"""Engine-exact formats against the engines' own reference code, bit for bit.

ggml_q4_0 / ggml_q8_0 / mxfp4 against the ``gguf`` package's numpy quantisers (written by the
llama.cpp project to match ggml-quants.c), on values and on the raw block bytes; nvfp4 and mxfp4
against ``compressed-tensors``' own qparams + quantize/dequantize.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import tiny_batch, tiny_model

from qat import QuantConfig, quantize_model
from qat.export.ggml_blocks import GGMLTypeError, ggml_block_bytes
from qat.formats import make_format

gguf_quants = pytest.importorskip("gguf.quants")
GGML = pytest.importorskip("gguf").GGMLQuantizationType
GGUF_TYPES = {"ggml_q4_0": GGML.Q4_0, "ggml_q8_0": GGML.Q8_0, "mxfp4": GGML.MXFP4}


def _bits(t) -> np.ndarray:
    return np.asarray(t, dtype=np.float32).view(np.int32)


def _edge_rows() -> torch.Tensor:
    """Rows of 64 (two blocks): random at many scales, zeros, ties, negative-max blocks."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 64, generator=g) * torch.exp2(
        torch.randint(-12, 12, (12, 1), generator=g).float()
    )
    x[0] = 0.0  # all-zero blocks
    x[1, :32] = torch.arange(32) - 15.5  # Q8_0: d = 15.5/127, half steps
    x[2, :32] = torch.arange(-16, 16).float() / 2  # negative max first (-8 -> d = 1)
    x[3, :32] = x[3, :32].abs()
    x[3, 5], x[3, 9] = -100.0, 100.0  # equal magnitudes: the first wins
    x[4, :32] = torch.randint(-127, 128, (32,), generator=g).float() + 0.5  # .5 ties
    x[4, 0] = 127.0
    x[5, 32:] = -x[5, 32:].abs()  # an all-negative block
    x[6, :] = 1e-30  # fp16-subnormal / zero scale
    x[7, 0] = 1000.0  # one outlier
    return x


@pytest.mark.parametrize("name", ["ggml_q4_0", "ggml_q8_0"])
def test_ggml_matches_llama_cpp_reference_values_and_bytes(name: str) -> None:
    x = _edge_rows()
    fmt = make_format({"format": name})
    ref_bytes = gguf_quants.quantize(x.numpy(), GGUF_TYPES[name])
    assert np.array_equal(ggml_block_bytes(fmt, x), ref_bytes)
    ref = gguf_quants.dequantize(ref_bytes, GGUF_TYPES[name])
    assert np.array_equal(_bits(fmt.quantize(x).numpy()), _bits(ref))
    assert np.array_equal(_bits(fmt.decode(fmt.encode(x)).numpy()), _bits(ref))


def test_ggml_hand_values() -> None:
    # Q8_0 rounds half away from zero: 2.5 -> 3 and -0.5 -> -1 (d = 127/127 = 1).
    x = torch.zeros(32)
    x[:3] = torch.tensor([127.0, 2.5, -0.5])
    assert make_format({"format": "ggml_q8_0"}).quantize(x)[:3].tolist() == [127, 3, -1]
    # Q4_0: d = max/-8 with the signed max -16 -> d = 2; +16 clamps to code 15 = 7 * 2 = 14;
    # 3 / 2 = 1.5 rounds half up (trunc(1.5 + 8.5) = 10) to 2 * 2 = 4.
    x[:3] = torch.tensor([-16.0, 16.0, 3.0])
    enc = make_format({"format": "ggml_q4_0"}).encode(x)
    assert enc.codes[0, :3].tolist() == [0, 15, 10] and enc.scales.tolist() == [2.0]
    assert enc.scales.dtype == torch.float16
    assert make_format({"format": "ggml_q4_0"}).quantize(x)[:3].tolist() == [-16, 14, 4]


@pytest.mark.parametrize("name", ["ggml_q4_0", "ggml_q8_0", "mxfp4"])
def test_ragged_row_is_the_zero_padded_row(name: str) -> None:
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (0, 24)).numpy()
    ref = gguf_quants.dequantize(gguf_quants.quantize(padded, GGUF_TYPES[name]), GGUF_TYPES[name])[
        :, :40
    ]
    q = make_format({"format": name}).quantize(x).numpy()
    if name == "mxfp4":  # OCP keeps the sign of a value rounded to zero; ggml writes +0
        q = q + 0.0
    assert np.array_equal(_bits(q), _bits(ref))


def test_ggml_scale_saturates_at_fp16_max() -> None:
    # llama.cpp would store inf for d = 8e6 / 127 > 65504; qat keeps it finite.
    x = torch.zeros(32)
    x[0] = 8e6 * 127 / 127 * 2
    q = make_format({"format": "ggml_q8_0"}).quantize(x)
    assert torch.isfinite(q).all() and q[0].item() == 127 * 65504


def test_mxfp4_agrees_with_ggml_off_ties() -> None:
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(2)) * 3
    fmt = make_format({"format": "mxfp4"})
    ref_bytes = gguf_quants.quantize(x.numpy(), GGML.MXFP4)
    assert np.array_equal(ggml_block_bytes(fmt, x), ref_bytes)
    assert np.array_equal(fmt.quantize(x).numpy(), gguf_quants.dequantize(ref_bytes, GGML.MXFP4))


def test_mxfp4_ties_differ_from_ggml() -> None:
    # Same scale (2^0 for max 6); OCP rounds ties to even, ggml to the smaller magnitude.
    x = torch.zeros(1, 32)
    x[0, :5] = torch.tensor([6.0, 3.5, 0.75, 1.75, -3.5])
    ggml = gguf_quants.dequantize(gguf_quants.quantize(x.numpy(), GGML.MXFP4), GGML.MXFP4)
    assert make_format({"format": "mxfp4"}).quantize(x)[0, :5].tolist() == [6, 4, 1, 2, -4]
    assert ggml[0, :5].tolist() == [6, 3, 0.5, 1.5, -3]


# --- compressed-tensors -------------------------------------------------------------------


def _ct():
    ct = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    return ct.preset_name_to_scheme, calculate_qparams, generate_gparam, fake_quantize


def _ct_fake_quantize(x: torch.Tensor, preset: str, group: int) -> tuple[torch.Tensor, ...]:
    scheme, qparams, gparam, fake_quantize = _ct()
    args = scheme(preset, ["Linear"]).weights
    gs = gparam(x.min(), x.max()) if preset.startswith("NVFP4") else None
    xb = x.reshape(x.shape[0], -1, group)
    scale, zp = qparams(xb.amin(-1), xb.amax(-1), args, global_scale=gs)
    return fake_quantize(x, scale, zp, args, global_scale=gs), scale, gs


@pytest.mark.parametrize("case", ["random", "zeros", "grid", "tiny", "huge"])
def test_nvfp4_matches_compressed_tensors(case: str) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 64, generator=g) * torch.exp2(
        torch.randint(-20, 20, (8, 1), generator=g).float()
    )
    if case == "zeros":
        x[:, :16] = 0.0
        x[0] = 0.0
    elif case == "grid":  # exact E2M1 ties after scaling
        x = torch.randint(-24, 25, (8, 64), generator=g).float() / 4
    elif case == "tiny":  # g = 2688 / amax overflows: compressed-tensors uses g = 1
        x = x * 1e-37
    elif case == "huge":
        x = x * 1e30
    ref, scale, gs = _ct_fake_quantize(x, "NVFP4", 16)
    fmt = make_format({"format": "nvfp4"})
    assert torch.equal(fmt.quantize(x), ref)
    enc = fmt.encode(x)
    assert torch.equal(enc.scales, scale.float()) and torch.equal(enc.extra["global_scale"], gs[0])
    assert torch.equal(fmt.decode(enc), ref)


def test_nvfp4_hand_values() -> None:
    x = torch.zeros(1, 32)
    x[0, :3] = torch.tensor([6.0, 1.25, -0.1])
    x[0, 16] = 3.0
    enc = make_format({"format": "nvfp4"}).encode(x)
    # g = 2688/6 = 448; block 0: s = 448 * 6/6 = 448, S = 1; block 1: s = 224, S = 0.5.
    assert enc.extra["global_scale"].item() == 448.0
    assert enc.scales.tolist() == [[448.0, 224.0]]
    assert enc.codes[0, 0, :3].tolist() == [0b0111, 0b0010, 0b1000]  # 6, 1 (tie to even), -0
    assert make_format({"format": "nvfp4"}).independent_block is None


def test_mxfp4_agrees_with_compressed_tensors_below_mantissa_1_75() -> None:
    # compressed-tensors rounds the block max to a power of two first (1.75 * 2^k goes up),
    # OCP floors it: the scales agree exactly when the max's mantissa is below 1.75.
    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(4))
    ref, _, _ = _ct_fake_quantize(x, "MXFP4A16", 32)
    q = make_format({"format": "mxfp4"}).quantize(x)
    mant, _ = torch.frexp(x.reshape(32, -1, 32).abs().amax(-1))
    low = mant * 2 < 1.75
    same = (q == ref).reshape(32, -1, 32).all(-1)
    assert low.any() and (~low).any()
    assert same[low].all() and not same[~low].any()
    y = torch.zeros(1, 32)
    y[0, :2] = torch.tensor([7.5, 3.0])  # OCP: scale 1, 7.5 saturates to 6; c-t: scale 2 -> 8
    assert make_format({"format": "mxfp4"}).quantize(y)[0, :2].tolist() == [6, 3]
    assert _ct_fake_quantize(y, "MXFP4A16", 32)[0][0, :2].tolist() == [8, 3]


def test_non_ggml_format_has_no_ggml_type() -> None:
    with pytest.raises(GGMLTypeError, match="ggml_q4_0.*ggml_q8_0.*mxfp4"):
        ggml_block_bytes(make_format({"format": "nvfp4"}), torch.zeros(2, 32))
    with pytest.raises(GGMLTypeError, match="multiple of 32"):
        ggml_block_bytes(make_format({"format": "ggml_q8_0"}), torch.zeros(2, 48))


def test_ggml_q8_0_activation_on_a_tiny_model() -> None:
    # llama.cpp quantises a Q4_0 matmul's input to Q8_0 blocks: W4 (Q4_0) x A8 (Q8_0).
    model = tiny_model("llama")
    batch = tiny_batch()
    quantize_model(
        model, QuantConfig(weight={"format": "ggml_q4_0"}, activation={"format": "ggml_q8_0"})
    )
    seen = []
    lin = next(m for n, m in model.named_modules() if n.endswith("q_proj"))
    lin.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    x = seen[0]
    want = torch.nn.functional.linear(
        torch.from_numpy(
            gguf_quants.dequantize(
                gguf_quants.quantize(x.reshape(-1, 32).numpy(), GGML.Q8_0), GGML.Q8_0
            )
        ).reshape(x.shape),
        torch.from_numpy(
            gguf_quants.dequantize(
                gguf_quants.quantize(lin.weight.detach().numpy(), GGML.Q4_0), GGML.Q4_0
            )
        ),
        lin.bias,
    )
    with torch.no_grad():
        assert torch.equal(lin(x), want)


@pytest.mark.parametrize("name", ["ggml_q4_0", "ggml_q8_0"])
def test_compile_backend_equals_the_reference(name: str) -> None:
    # inductor drops a .half().float() round trip and may fuse x * id + 8.5 into an FMA; the
    # format rounds by arithmetic so the compiled quantiser stays bit-equal.
    from qat.quant.backends import _compiled, compile_works

    if not compile_works():
        pytest.skip("torch.compile cannot build CPU code here")
    fmt = make_format({"format": name})
    x = torch.cat([_edge_rows(), torch.randn(8, 64) * 3])
    assert torch.equal(_compiled(fmt, -1)(x).view(torch.int32), fmt.quantize(x).view(torch.int32))


def test_mxfp4_scale_just_below_a_power_of_two_differs_from_ggml() -> None:
    # ggml takes floor(log2f(amax)); float32 log2 of 8 - 1ulp rounds to 3.0, so ggml's scale is
    # 2 and the max becomes 8; OCP's exact floor gives scale 1 and the max saturates to 6.
    x = torch.zeros(1, 32)
    x[0, 0] = float(np.nextafter(np.float32(8.0), np.float32(0.0)))
    ggml = gguf_quants.quantize(x.numpy(), GGML.MXFP4)
    assert ggml[0, 0] == 128 and gguf_quants.dequantize(ggml, GGML.MXFP4)[0, 0] == 8.0
    enc = make_format({"format": "mxfp4"}).encode(x)
    assert enc.scales.tolist() == [[0]] and make_format({"format": "mxfp4"}).quantize(x)[0, 0] == 6
