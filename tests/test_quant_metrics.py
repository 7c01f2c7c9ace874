"""SQNR maths (qat.quant.sqnr) and the training dashboards (qat.training.quant_metrics):
per-layer SQNR in W&B and TensorBoard, read back from the files an offline run wrote."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import BFP4, REPO, W4A4_BFP, tiny_batch, tiny_model, tiny_recipe

from qat import quantize_model
from qat.formats import make_format
from qat.quant.sqnr import error_sums, sqnr_db, sqnr_db_value, sqnr_from_sums
from qat.training.quant_metrics import QuantMetricsCallback, measure, quantised_layers, scalars
from tests.test_no_sync import no_host_sync

# -- the maths ---------------------------------------------------------------------------------


def test_sqnr_hand_values():
    x = torch.ones(100)
    # signal 100, noise 100 * 0.5^2 = 25: 10 log10(4)
    s = sqnr_db(x, x * 0.5)
    assert s.dtype == torch.float64 and s.dim() == 0
    assert float(s) == pytest.approx(10 * math.log10(4), abs=1e-12)
    assert float(sqnr_db(x, x)) == math.inf  # exact: nothing lost
    assert float(sqnr_db(torch.zeros(5), torch.zeros(5))) == math.inf
    signal, noise = error_sums(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0]))
    assert (float(signal), float(noise)) == (25.0, 1.0)
    assert sqnr_db_value(25.0, 1.0) == pytest.approx(10 * math.log10(25))
    assert sqnr_db_value(1.0, 0.0) == math.inf
    # pooled: sums add before the ratio is taken, not the dB values
    pooled = sqnr_from_sums(
        torch.tensor(25.0 + 100, dtype=torch.float64), torch.tensor(1.0 + 25, dtype=torch.float64)
    )
    assert float(pooled) == pytest.approx(10 * math.log10(125 / 26))


def test_bfp_gains_about_6db_per_bit():
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    s4, s6 = (float(sqnr_db(x, make_format({**BFP4, "width": w}).quantize(x, -1))) for w in (4, 6))
    assert 10.5 < s6 - s4 < 13.5


# -- the pieces of the callback ----------------------------------------------------------------


def _quantised(arch: str = "bert"):
    return quantize_model(tiny_model(arch), W4A4_BFP)


def test_quantised_layers_and_measure_match_the_formats():
    model = _quantised()
    layers = quantised_layers(model)
    expected = [n for n, m in model.named_modules() if type(m).__name__ == "QuantLinear"]
    assert [la.name for la in layers] == expected and len(expected) == 13  # 2 x 6 + pooler
    x = torch.randn(10, 32)
    rows = measure(layers, {layers[0].name: x})
    weight_rows = [r for r in rows if r["tensor"] == "weight" and r["layer"] != "all"]
    assert len(weight_rows) == 13
    fmt = make_format(BFP4)
    for layer, row in zip(layers, weight_rows):
        w = layer.inner.weight
        assert row["sqnr_db"] == pytest.approx(float(sqnr_db(w, fmt.quantize(w, -1))), rel=1e-12)
        assert row["bits_per_element"] == 4.5 and row["format"] == str(fmt)
    (act,) = [r for r in rows if r["tensor"] == "activation" and r["layer"] != "all"]
    assert act["layer"] == layers[0].name
    assert act["sqnr_db"] == pytest.approx(float(sqnr_db(x, fmt.quantize(x, -1))), rel=1e-12)
    keys = scalars(rows)
    assert f"qat/sqnr/weight/{layers[0].name}" in keys
    assert f"qat/sqnr/activation/{layers[0].name}" in keys
    assert {"qat/sqnr/weight_all", "qat/sqnr/activation_all"} <= set(keys)
    assert quantised_layers(tiny_model("bert")) == []  # a float model has nothing to show


def test_sampling_hooks_copy_strided_rows_without_host_sync():
    model = _quantised()
    cb = QuantMetricsCallback([], sample_rows=8)
    cb.layers = quantised_layers(model)
    seen = {}
    first = cb.layers[0]
    probe = first.outer.register_forward_pre_hook(
        lambda m, a: seen.setdefault("x", a[0].detach().clone())
    )
    batch = tiny_batch(batch=3, seq=20)  # 60 token rows -> stride 7, 8 rows
    model(**batch)  # warm-up: per-device caches
    seen.clear()
    cb._arm()
    with torch.no_grad():
        model(**batch)
        model(**batch)  # a second forward (gradient accumulation) keeps the first sample
    probe.remove()
    assert set(cb.inputs) == {la.name for la in cb.layers}
    flat = seen["x"].reshape(-1, seen["x"].shape[-1])
    sample = cb.inputs[first.name]
    assert torch.equal(sample, flat[::7][:8])
    cb._disarm()
    assert not first.outer._forward_pre_hooks
    # the hook itself never syncs (transformers' mask code around it may, so call it alone)
    cb.inputs.clear()
    with no_host_sync():
        cb._sampler(first)(first.outer, (seen["x"],))
    assert torch.equal(cb.inputs[first.name], sample)


def test_lora_layers_report_the_effective_weight():
    from qat.runs.recipe.arguments import LoraArguments
    from qat.training.finetune import prepare_finetuning

    model = prepare_finetuning(_quantised(), "lora", LoraArguments(r=2))
    for p in model.parameters():  # B is zero at init: make W + BA differ from W
        if p.requires_grad:
            torch.nn.init.normal_(p)
    layers = quantised_layers(model)
    assert len(layers) == 13 and not any("base_layer" in la.name for la in layers)
    la = layers[0]
    assert not torch.equal(la.weight(), la.inner.weight)
    assert torch.equal(la.weight(), la.outer.effective_weight())


# -- end to end: what an offline run wrote -----------------------------------------------------


@pytest.fixture(scope="module")
def dash_run(tmp_path_factory):
    """4 W4A4 BFP steps of the tiny BERT, logging every 2 steps to offline W&B and TensorBoard."""
    pytest.importorskip("tensorboard")
    tmp = tmp_path_factory.mktemp("dash")
    recipe = tiny_recipe(
        tmp, max_steps=4, logging_steps=2, report_to=["wandb", "tensorboard"], run_name="dash-test"
    )
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp),
        "TENSORBOARD_LOGGING_DIR": str(tmp / "tb"),
        "PYTHONPATH": str(REPO),
    }
    proc = subprocess.run(
        [sys.executable, str(REPO / "qat/train.py"), recipe],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def _layer_names(run: Path) -> list[str]:
    """The quantised linears of the run's model, rebuilt from its saved config."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(run / "out"))
    return [la.name for la in quantised_layers(quantize_model(model, W4A4_BFP))]


def test_tensorboard_has_per_layer_sqnr_and_density(dash_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # one events file per writer: training, then the final evaluation's
    acc = EventAccumulator(str(dash_run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    names = _layer_names(dash_run)
    assert len(names) == 13
    for name in names:
        for tensor in ("weight", "activation"):
            ev = acc.Scalars(f"qat/sqnr/{tensor}/{name}")
            assert [e.step for e in ev] == [2, 4]
            assert all(5 < e.value < 40 for e in ev), (name, tensor, ev)  # W4: ~15-20 dB
    assert {"qat/sqnr/weight_all", "qat/sqnr/activation_all", "train/loss"} <= tags
    assert acc.Scalars("qat/bits_per_element")[0].value == 4.5  # 4 + 8/16
    assert acc.Scalars("qat/density_vs_fp32")[0].value == pytest.approx(32 / 4.5)

    # the last weight SQNRs are those of the weights the run saved
    from safetensors.torch import load_file

    saved = load_file(str(dash_run / "out/model.safetensors"))
    fmt = make_format(BFP4)
    for name in names:
        w = saved[f"{name}.weight"]
        expected = float(sqnr_db(w, fmt.quantize(w, -1)))
        assert acc.Scalars(f"qat/sqnr/weight/{name}")[-1].value == pytest.approx(expected, abs=1e-4)


def test_wandb_offline_run_has_charts_table_and_summary(dash_run):
    from tests.test_train_e2e import wait_for_wandb_exit, wandb_records

    (run,) = list((dash_run / "wandb").glob("offline-run-*"))
    log = next(run.glob("*.wandb"))
    wait_for_wandb_exit(log)
    history: list[dict] = []
    summary: dict = {}
    for rec in wandb_records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append(
                {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in rec.history.item
                }
            )
        elif kind == "summary":
            summary.update(
                {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in rec.summary.update
                }
            )
    names = _layer_names(dash_run)
    sqnr_steps = [h["train/global_step"] for h in history if "qat/sqnr/weight_all" in h]
    assert sqnr_steps == [2, 4]
    logged = set().union(*history)
    assert {f"qat/sqnr/{t}/{n}" for t in ("weight", "activation") for n in names} <= logged
    assert summary["qat/bits_per_element"] == 4.5
    assert summary["qat/density_vs_fp32"] == pytest.approx(32 / 4.5)
    # the table's history entry arrives flattened: qat/sqnr_table/{_type,path,...}
    (entry,) = [h for h in history if "qat/sqnr_table/path" in h]
    assert entry["qat/sqnr_table/_type"] == "table-file"
    table = json.loads((run / "files" / entry["qat/sqnr_table/path"]).read_text())
    assert table["columns"] == ["layer", "tensor", "format", "bits_per_element", "sqnr_db"]
    assert {(r[0], r[1]) for r in table["data"]} == {
        *((n, t) for n in names for t in ("weight", "activation")),
        ("all", "weight"),
        ("all", "activation"),
    }
    last = next(h for h in reversed(history) if "qat/sqnr/weight_all" in h)
    by_key = {(r[0], r[1]): r[4] for r in table["data"]}
    assert by_key[(names[0], "weight")] == pytest.approx(last[f"qat/sqnr/weight/{names[0]}"])


# -- torchao's import noise ----------------------------------------------------------------------


def test_no_torchao_import_noise_when_qat_loads_transformers():
    """transformers imports torchao when it is installed; torch then warns about torchao's
    enums, and a torchao wheel whose C++ extensions do not load here says so per file. qat
    filters exactly those warnings (qat/__init__.py)."""
    pytest.importorskip("torchao")
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def stderr(code: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stderr

    bare = stderr("import transformers.modeling_utils")
    noise = [m for m in ("is an Enum subclass", "Failed to load") if m in bare]
    if not noise:
        pytest.skip("this torch / torchao pair does not warn")
    with_qat = stderr("import qat.training.trainer")
    assert not [m for m in noise if m in with_qat], with_qat[-2000:]
    # the filter is that narrow: torch's warning for any other Enum still shows
    other = stderr(
        "import qat, enum, torch.utils._pytree as p\n"
        "E = enum.Enum('E', 'A')\n"
        "p._private_register_pytree_node(E, None, None)\n"
    )
    if "is an Enum subclass" in noise:
        assert "is an Enum subclass" in other
