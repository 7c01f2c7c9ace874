"""QuantConfig resolves its formats once; attention modules are found structurally; quantised
modules are built through their constructors and share the replaced module's parameters."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import ARCHS, tiny_batch, tiny_model
from tiny import BFP4 as W4
from torch import nn
from transformers.pytorch_utils import Conv1D

import qat.formats.codebook as codebook
from qat import QuantConfig, QuantConfigError, quantize_model
from qat.formats import make_format
from qat.formats.codebook import NF4_LEVELS
from qat.quant.modules import MatmulQuantizer, QuantConv1D, QuantLinear
from qat.quant.quantize import attention_modules
from qat.quant.ste import FakeQuantizer


def test_to_dict_is_the_specs_as_written_and_round_trips_through_json() -> None:
    d = {
        "weight": {"format": "bfp", "width": 4},
        "activation": None,
        "matmul": {"format": "mxfp4"},
        "overrides": {"fc2": {"weight": {"width": 6}}},
    }
    cfg = QuantConfig.from_dict(d)
    # The same JSON as before formats were resolved: specs as given, no defaults filled in.
    assert cfg.to_dict() == {
        **d,
        "exclude": ["score", "classifier", "lm_head"],
        "v_block_axis": "head_dim",
        "backend": "auto",
        "rotation": None,
        "gptq": None,
    }
    again = QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert again.formats_for("x.fc2").weight == make_format({"format": "bfp", "width": 6})


def test_one_format_per_distinct_spec_and_overrides_merged_once() -> None:
    cfg = QuantConfig.from_dict(
        {
            "weight": W4,
            "activation": W4,
            "matmul": None,
            "overrides": {
                "fc1": {"activation": {"width": 6}},  # weight stays the base's
                "fc2": {"weight": {"width": 4}},
            },
        }
    )  # merges back to W4
    base, fc1, fc2 = (cfg.formats_for(n) for n in ("a.q_proj", "a.fc1", "a.fc2"))
    assert base.weight is base.activation is fc1.weight is fc2.weight is fc2.activation
    assert fc1.activation == make_format({**W4, "width": 6}) and fc1.matmul is None
    assert cfg.format_for("weight", "a.fc1") is base.weight
    assert cfg.spec_for("activation", "a.fc1") == {**W4, "width": 6}
    assert cfg.formats_for("classifier").weight is None  # excluded: float


def test_a_format_object_may_stand_in_for_its_spec() -> None:
    fmt = make_format({"format": "mxfp8_e4m3"})
    cfg = QuantConfig(weight=fmt)
    assert cfg.weight == fmt.spec() and cfg.base_formats.weight == fmt


def test_assigning_a_field_re_resolves_and_validates() -> None:
    cfg = QuantConfig.from_dict({"weight": W4})
    cfg.weight = {**W4, "width": 6}
    assert cfg.base_formats.weight.width == 6
    with pytest.raises(QuantConfigError, match=r"^quant.weight: bfp.width must be in \[2, 24\]"):
        cfg.weight = {**W4, "width": 99}
    assert cfg.weight == {**W4, "width": 6} and cfg.base_formats.weight.width == 6


def test_codebook_file_is_read_once_for_the_whole_model(tmp_path, monkeypatch) -> None:
    path = tmp_path / "levels.json"
    path.write_text(json.dumps({"kind": "bof4", "levels": list(NF4_LEVELS)}))
    reads = []
    real = codebook.load_codebook_file
    monkeypatch.setattr(codebook, "load_codebook_file", lambda p: reads.append(p) or real(p))
    spec = {"format": "bof4", "block_size": 16, "codebook_file": str(path)}
    model = tiny_model("opt")
    quantize_model(
        model,
        {
            "weight": spec,
            "activation": spec,
            "matmul": None,
            "overrides": {"fc1": {"activation": {"block_size": 16}}},
        },
    )
    assert reads == [str(path)]
    fmts = {id(m.weight_quantizer.fmt) for m in model.modules() if isinstance(m, QuantLinear)}
    assert len(fmts) == 1


# --- attention modules: transformers' registry, on each architecture -----------------------

ATTENTION = {
    "opt": {f"model.decoder.layers.{i}.self_attn" for i in (0, 1)},
    "llama": {f"model.layers.{i}.self_attn" for i in (0, 1)},
    "bert": {f"bert.encoder.layer.{i}.attention.self" for i in (0, 1)},
    "gpt2": {f"transformer.h.{i}.attn" for i in (0, 1)},
}


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_modules_found_by_the_models_own_registry(arch: str) -> None:
    model = tiny_model(arch)
    assert {n for n, _ in attention_modules(model)} == ATTENTION[arch]
    quantize_model(model, {"weight": None, "activation": None, "matmul": W4})
    got = {
        n
        for n, m in model.named_modules()
        if isinstance(getattr(m, "qat_matmul", None), MatmulQuantizer)
    }
    assert got == ATTENTION[arch] and model.config._attn_implementation == "qat"


class _Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)


def test_matmul_on_a_model_without_attention_modules_is_refused() -> None:
    with pytest.raises(
        QuantConfigError, match="^quant.matmul is set but _Plain declares no attention modules"
    ):
        quantize_model(_Plain(), {"weight": W4, "matmul": W4})


# --- quantised modules: constructors, shared parameters -------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_shares_parameters_through_the_constructor(bias: bool) -> None:
    lin = nn.Linear(32, 8, bias=bias).eval()
    wq, aq = FakeQuantizer(make_format(W4)), FakeQuantizer(make_format(W4))
    q = QuantLinear.from_linear(lin, wq, aq)
    assert q.weight is lin.weight and q.bias is lin.bias and not q.training
    assert q.weight_quantizer is wq and q.activation_quantizer is aq
    assert list(q.state_dict()) == list(lin.state_dict())
    x = torch.randn(3, 32)
    want = nn.functional.linear(aq(x), wq(lin.weight), lin.bias)
    assert torch.equal(q(x), want)
    # The constructor works on its own, like nn.Linear's.
    fresh = QuantLinear(32, 8, bias=bias, weight_quantizer=wq)
    assert fresh.weight.shape == (8, 32) and fresh.activation_quantizer is None


def test_from_conv1d_shares_parameters_through_the_constructor() -> None:
    conv = Conv1D(8, 32)
    wq = FakeQuantizer(make_format(W4), dim=0)
    q = QuantConv1D.from_conv1d(conv, wq, None)
    assert q.weight is conv.weight and q.bias is conv.bias and (q.nf, q.nx) == (8, 32)
    x = torch.randn(2, 3, 32)
    assert torch.equal(q(x), x @ wq(conv.weight) + conv.bias)
    assert QuantConv1D(8, 32).weight.device.type == "cpu"


@pytest.mark.parametrize("arch", ARCHS)
def test_quantised_model_keeps_its_parameters(arch: str) -> None:
    model = tiny_model(arch)
    before = dict(model.named_parameters())
    quantize_model(model, {"weight": W4, "activation": W4, "matmul": None})
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert all(p.device.type == "cpu" for p in after.values())
    model.eval()
    batch = tiny_batch()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
