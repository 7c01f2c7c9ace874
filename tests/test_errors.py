"""qat.errors.did_you_mean: the one "did you mean" hint every unknown-name error ends with."""

from __future__ import annotations

import pytest

from qat.errors import did_you_mean


@pytest.mark.parametrize("word,choices,section,hint", [
    ("sst3", ["cola", "sst2", "mrpc"], None, " (did you mean 'sst2'?)"),  # a value: quoted
    ("weigth", ["weight", "act"], "quant", " (did you mean quant.weight?)"),  # a key: its path
    ("sise", ("kind", "size"), "quant.rotation", " (did you mean quant.rotation.size?)"),
    ("zzzz", ["weight", "act"], "quant", ""),  # nothing close: no hint
    (3, ["3x", "abc"], None, " (did you mean '3x'?)"),  # a YAML int key is matched as text
    ("x", [], None, ""),
])
def test_hint_names_the_closest_choice_or_nothing(word, choices, section, hint):
    assert did_you_mean(word, choices, section) == hint


def test_a_dict_s_keys_are_the_choices():
    assert did_you_mean("alhpa", {"alpha": 1, "r": 2}, "lora") == " (did you mean lora.alpha?)"
