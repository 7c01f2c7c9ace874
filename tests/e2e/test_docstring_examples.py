"""Every public name's docstring opens with a runnable example: each is run here with doctest
(offline, tiny models, on the CPU), and one that does not run, or that a skip leaves empty,
fails its case."""

from __future__ import annotations

import doctest
import os

import pytest

import qat

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.fixture(autouse=True)
def _offline_cpu(monkeypatch):
    # the examples must not need the network or a GPU
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    # conftest sets WANDB_MODE=offline, and this module prints so when first imported: let
    # that line go out here rather than into an example's output
    import transformers.integrations.integration_utils  # noqa: F401


def _tests(name: str) -> list[doctest.DocTest]:
    obj = getattr(qat, name)
    # recurse=False: the object's own docstring, not those of its methods
    finder = doctest.DocTestFinder(recurse=False)
    return [t for t in finder.find(obj, f"qat.{name}", globs={"qat": qat}) if t.examples]


def _executed(test: doctest.DocTest) -> int:
    return sum(not ex.options.get(doctest.SKIP, False) for ex in test.examples)


@pytest.mark.parametrize("name", sorted(qat.__all__))
def test_docstring_example_runs(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything an example writes by a relative path lands here
    tests = _tests(name)
    assert sum(_executed(t) for t in tests) > 0, f"qat.{name}: no executed docstring example"
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in tests:
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"qat.{name}: {results.failed} of {results.attempted} failed"
    assert results.attempted > 0


def test_a_broken_example_fails():
    """The check itself can fail: a wrong expected output is counted as a failure."""
    test = doctest.DocTestParser().get_doctest(">>> 1 + 1\n3\n", {}, "broken", None, 0)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    with open(os.devnull, "w") as sink:
        runner.run(test, out=sink.write)
    assert runner.failures == 1
