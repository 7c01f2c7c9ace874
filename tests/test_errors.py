"""qat.errors.did_you_mean: the one "did you mean" hint every unknown-name error ends with."""

from __future__ import annotations

import pytest

from qat.errors import did_you_mean


@pytest.mark.parametrize(
    "word,choices,section,hint",
    [
        ("sst3", ["cola", "sst2", "mrpc"], None, " (did you mean 'sst2'?)"),  # a value: quoted
        ("weigth", ["weight", "act"], "quant", " (did you mean quant.weight?)"),  # a key: its path
        ("sise", ("kind", "size"), "quant.rotation", " (did you mean quant.rotation.size?)"),
        ("zzzz", ["weight", "act"], "quant", ""),  # nothing close: no hint
        (3, ["3x", "abc"], None, " (did you mean '3x'?)"),  # a YAML int key is matched as text
        ("x", [], None, ""),
    ],
)
def test_hint_names_the_closest_choice_or_nothing(word, choices, section, hint):
    assert did_you_mean(word, choices, section) == hint


def test_a_dict_s_keys_are_the_choices():
    assert did_you_mean("alhpa", {"alpha": 1, "r": 2}, "lora") == " (did you mean lora.alpha?)"


# --- bad input to library functions: a QatError subclass (exit code 2 at the command layer) ---


def _fit_lobcq(**kw):
    from qat.formats.fit.lobcq import fit_lobcq

    return fit_lobcq(**kw)


def _fit_codebook(**kw):
    from qat.formats.fit.codebook import fit_codebook

    return fit_codebook(**kw)


def _divergence(shape: tuple[int, ...], kind: str):
    import torch

    from qat.training.distill import divergence

    return divergence(torch.zeros(2, 5), torch.zeros(shape), kind)


def _prepare(mode: str, lora=None):
    from tiny import tiny_model

    from qat.training.finetune import prepare_finetuning

    return prepare_finetuning(tiny_model("bert"), mode, lora)


def _check_policy(policy: str):
    from qat.training.nonfinite import check_policy

    return check_policy(policy)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (
            lambda: _check_policy("ignore"),
            "ConfigError",
            "on_nonfinite must be one of stop, skip; got 'ignore'",
        ),
        (
            lambda: _prepare("qlora"),
            "ConfigError",
            "finetune must be one of full, lora, classifier; got 'qlora'",
        ),
        (lambda: _prepare("lora"), "ConfigError", "finetune: lora needs a lora section"),
        (
            lambda: _divergence((2, 5), "mse"),
            "ConfigError",
            "distill loss must be kl or jsd, got 'mse'",
        ),
        (
            lambda: _divergence((2, 6), "kl"),
            "ConfigError",
            "student logits (2, 5) and teacher logits (2, 6) differ in shape",
        ),
        (lambda: _fit_codebook(metric="l1"), "UsageError", "metric must be one of"),
        (lambda: _fit_codebook(block_size=1), "UsageError", "block_size must be >= 2, got 1"),
        (
            lambda: _fit_lobcq(samples=None, block_len=8, array_len=60),
            "UsageError",
            "array_len (60) must be a multiple of block_len (8)",
        ),
    ],
)
def test_bad_arguments_raise_the_matching_qat_error(call, error, message):
    import qat.errors

    with pytest.raises(qat.errors.QatError) as e:
        call()
    assert type(e.value).__name__ == error and isinstance(e.value, getattr(qat.errors, error))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_qat_train_refuses_overrides_for_a_resolved_recipe(tmp_path):
    from tiny import tiny_recipe

    import qat
    from qat.errors import UsageError
    from qat.runs.recipe.load import load_recipe

    recipe = load_recipe(tiny_recipe(tmp_path))
    with pytest.raises(UsageError, match="overrides apply to a recipe file"):
        qat.train(recipe, {"max_steps": 1})
    assert not (tmp_path / "out").exists()  # refused before anything ran
