"""lm-evaluation-harness on qat models: in memory (``qat.integrations.lm_eval``, ``qat
lm-eval``) and from a packed export through lm-eval's own ``hf`` model, on a tiny Llama and a
local multiple-choice task written here (no Hub)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from tiny import lm_recipe

from qat.cli.lm_eval import main as lm_eval_main
from qat.errors import UsageError

pytest.importorskip("lm_eval")

ROWS = [
    {"question": "the sky is", "choices": ["blue", "green", "loud"], "label": 0},
    {"question": "water is", "choices": ["dry", "wet", "red"], "label": 1},
    {"question": "fire is very", "choices": ["cold", "hot", "blue"], "label": 1},
]
# the tiny model's BERT tokenizer adds [CLS] ... [SEP] around every text unless told not to;
# a decoder's tokenizer (BOS only) needs no model_args
NO_SPECIALS = {"add_bos_token": False}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A W4A4 BFP recipe of the tiny Llama and a folder holding one local task, tiny_mc."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    (tasks / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'rows.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return lm_recipe(tmp), tasks


def _build(recipe, overrides=()):
    from qat.runs.build import build_model

    return build_model(recipe, overrides, head="causal_lm", device=torch.device("cpu"))


def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), summed over its tokens, from the model's own logits."""
    ctx = tok.encode(context, add_special_tokens=False)
    whole = tok.encode(context + continuation, add_special_tokens=False)
    assert whole[: len(ctx)] == ctx
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def _evaluate(setup, **kw):
    from qat.integrations.lm_eval import lm_eval_evaluate

    recipe, tasks = setup
    built = _build(recipe)
    out = lm_eval_evaluate(
        built.model,
        built.tokenizer,
        ["tiny_mc"],
        include_path=tasks,
        model_args=NO_SPECIALS,
        log_samples=True,
        **kw,
    )
    return built, out


def test_lm_eval_scores_the_fake_quantised_model(setup):
    """Every log-likelihood lm-eval reports is the quantised model's own (computed here from
    its logits), not the float model's; acc is the share of rows whose label scores highest."""
    built, out = _evaluate(setup)
    recipe, _ = setup
    floaty = _build(recipe, ["--quant", "null"]).model
    samples = out["samples"]["tiny_mc"]
    assert [s["doc"] for s in samples] == ROWS
    hits = []
    for s in samples:
        lls = [r[0][0] for r in s["resps"]]
        for (ctx, cont), ll in zip(s["arguments"], lls):
            assert cont.startswith(" ")
            assert ll == pytest.approx(
                _loglikelihood(built.model, built.tokenizer, ctx, cont), abs=1e-5
            )
            assert abs(ll - _loglikelihood(floaty, built.tokenizer, ctx, cont)) > 1e-4
        hits.append(float(max(range(len(lls)), key=lls.__getitem__) == s["doc"]["label"]))
    assert out["results"]["tiny_mc"]["acc,none"] == pytest.approx(sum(hits) / len(hits))
    assert built.model.model.layers[0].mlp.down_proj.weight_quantizer.enabled  # still on


def test_limit_and_summary_are_json(setup):
    from qat.integrations.lm_eval import summary

    _, out = _evaluate(setup, limit=2)
    assert len(out["samples"]["tiny_mc"]) == 2
    s = summary(out)
    assert "samples" not in s and s["n-samples"]["tiny_mc"] == {"original": 3, "effective": 2}
    assert json.loads(json.dumps(s)) == s


@pytest.mark.parametrize("spec", ["tiny_m*", "tiny_mc.yaml"])
def test_globs_and_task_files_name_tasks_as_in_lm_eval_cli(setup, spec):
    from qat.integrations.lm_eval import lm_eval_evaluate

    recipe, tasks = setup
    built = _build(recipe)
    name = str(tasks / spec) if spec.endswith(".yaml") else spec
    out = lm_eval_evaluate(
        built.model, built.tokenizer, [name], include_path=tasks, model_args=NO_SPECIALS, limit=1
    )
    assert list(out["results"]) == ["tiny_mc"]


def test_cli_writes_results_json(setup, capsys):
    recipe, tasks = setup
    out = tasks.parent / "res" / "lm.json"
    rc = lm_eval_main(
        [
            recipe,
            "--tasks",
            "tiny_mc",
            "--include_path",
            str(tasks),
            "--model_args",
            "add_bos_token=false",
            "--device",
            "cpu",
            "--output",
            str(out),
            "--limit",
            "3",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    res = json.loads(out.read_text())
    _, ref = _evaluate(setup)
    assert res["results"]["tiny_mc"]["acc,none"] == ref["results"]["tiny_mc"]["acc,none"]
    assert res["quant"]["weight"]["format"] == "bfp" and res["quant"]["exclude"] == ["lm_head"]
    assert res["source"] == recipe and res["tasks"] == ["tiny_mc"] and res["limit"] == 3
    assert res["bits_per_element"] == pytest.approx(4.5)
    row = next(line for line in printed.splitlines() if line.startswith("tiny_mc"))
    assert row.split()[:3] == [
        "tiny_mc",
        "acc,none",
        f"{res['results']['tiny_mc']['acc,none']:.4f}",
    ]


def test_cli_scores_a_trained_run_folder(setup, tmp_path, committed_wikitext, capsys):
    """A run folder: its trained weights and quant config; the JSON lands in the run."""
    from qat.cli.train import main as train_main

    _, tasks = setup
    assert train_main([lm_recipe(tmp_path, max_steps=1)]) == 0
    run = tmp_path / "out"
    assert (
        lm_eval_main(
            [
                str(run),
                "--tasks",
                "tiny_mc",
                "--include_path",
                str(tasks),
                "--model_args",
                "add_bos_token=false",
                "--device",
                "cpu",
                "--limit",
                "1",
            ]
        )
        == 0
    )
    res = json.loads((run / "lm_eval.json").read_text())
    assert res["source"] == str(run) and res["n-samples"]["tiny_mc"]["effective"] == 1
    assert res["quant"]["activation"]["format"] == "bfp"


def test_export_loads_in_lm_eval_hf_model(setup, tmp_path):
    """A packed export given to lm-eval's own ``hf`` model by path (as ``lm_eval --model hf
    --model_args pretrained=DIR,trust_remote_code=True``): lm-eval places it with a one-device
    device_map, and it scores exactly as the in-memory quantised model."""
    import lm_eval

    from qat.cli.export import main as export_main
    from qat.integrations.lm_eval import find_tasks

    recipe, tasks = setup
    export = tmp_path / "export"
    assert export_main([recipe, "--out", str(export), "--device", "cpu"]) == 0
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={export},trust_remote_code=True,"
        "add_bos_token=False,prefix_token_id=101",
        device="cpu",
        tasks=["tiny_mc"],
        task_manager=find_tasks(["tiny_mc"], tasks),
        log_samples=True,
    )
    _, ref = _evaluate(setup)
    got = [r for s in out["samples"]["tiny_mc"] for r in s["resps"]]
    want = [r for s in ref["samples"]["tiny_mc"] for r in s["resps"]]
    assert got == want
    from transformers import AutoModelForCausalLM

    one_device = AutoModelForCausalLM.from_pretrained(export, device_map="cpu")
    assert {p.device.type for p in one_device.parameters()} == {"cpu"}
    with pytest.raises(TypeError, match="take no device_map 'balanced'"):
        AutoModelForCausalLM.from_pretrained(export, device_map="balanced")


def test_unknown_task_is_one_line_before_the_model(setup, capsys, no_model):
    recipe, _ = setup
    assert lm_eval_main([recipe, "--tasks", "hellaswg", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("qat lm-eval: error: unknown lm-eval task 'hellaswg'")
    assert "hellaswag" in err  # the close match


def test_missing_lm_eval_says_how_to_install(setup, capsys, monkeypatch, no_model):
    recipe, tasks = setup
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    assert lm_eval_main([recipe, "--tasks", "tiny_mc", "--include_path", str(tasks)]) == 2
    assert capsys.readouterr().err == (
        "qat lm-eval: error: lm-evaluation-harness is not installed: pip install 'qat[lm_eval]'\n"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--tasks is required"),
        (["--tasks", "tiny_mc", "--batch_size", "0"], "--batch_size must be"),
        (["--tasks", "tiny_mc", "--model_args", "max_length"], "'max_length' is not key=value"),
        (["--tasks", "tiny_mc", "--include_path", "/nonexistent/x"], "is not a folder"),
        (["--tasks", "tiny_mc", "--limit", "0"], "limit must be"),
        (["--tasks", "tiny_mc", "--limit", "2.5"], "limit must be"),
        (["--tasks", "tiny_mc", "--num_fewshot", "-1"], "num_fewshot must be >= 0"),
        (["--tasks", "tiny_mc", "--model_args", "pretrained=x"], "'pretrained' is set by qat"),
        (["--tasks", "tiny_mc", "--quant.weight.width", "x"], "width"),
    ],
)
def test_bad_options_are_one_line_exit_2(setup, capsys, no_model, args, message):
    recipe, _ = setup
    assert lm_eval_main([recipe, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_library_refuses_bad_arguments_before_wrapping(setup):
    from qat.integrations.lm_eval import lm_eval_evaluate

    recipe, tasks = setup
    built = _build(recipe)
    with pytest.raises(UsageError, match="'pretrained' is set by qat"):
        lm_eval_evaluate(
            built.model,
            built.tokenizer,
            ["tiny_mc"],
            include_path=tasks,
            model_args={"pretrained": "x"},
        )
    with pytest.raises(UsageError, match="limit must be"):
        lm_eval_evaluate(built.model, built.tokenizer, ["tiny_mc"], include_path=tasks, limit=2.5)
    with pytest.raises(UsageError, match="non-empty list"):
        lm_eval_evaluate(built.model, built.tokenizer, "tiny_mc", include_path=tasks)
