"""Issue #13 sections 3-5: values that pass type checks but would fail later, hostile files,
and paths of the wrong kind. Each case exits 2 with one ``error:`` line naming the key (or
file and line) and the value, before any model or tokenizer loads, and leaves every file as
it was.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tiny import make_tiny_model_dir, one_error_line, tiny_recipe, tree_hashes

# --- section 3: values that pass validation and fail later (through `qat train`) -----------

Disk = Callable[[Path], None]
# (id, recipe keys ("{tmp}" becomes the test's folder), overrides, disk change, fragments)
ROWS: list[tuple[str, dict[str, Any], list[str], Disk | None, list[str]]] = [
    (
        "learning_rate negative",
        {"learning_rate": -0.001},
        [],
        None,
        ["learning_rate must be finite and >= 0, got -0.001"],
    ),
    (
        "learning_rate NaN",
        {},
        ["--learning_rate", "nan"],
        None,
        ["learning_rate must be a number, got nan"],
    ),
    (
        "learning_rate inf",
        {"learning_rate": float("inf")},
        [],
        None,
        ["learning_rate must be finite and >= 0, got inf"],
    ),
    (
        "train batch size 0",
        {"per_device_train_batch_size": 0},
        [],
        None,
        ["per_device_train_batch_size must be >= 1, got 0"],
    ),
    (
        "eval batch size 0",
        {},
        ["--per_device_eval_batch_size", "0"],
        None,
        ["per_device_eval_batch_size must be >= 1, got 0"],
    ),
    (
        "gradient accumulation 0",
        {"gradient_accumulation_steps": 0},
        [],
        None,
        ["gradient_accumulation_steps must be >= 1, got 0"],
    ),
    ("negative seed", {"seed": -1}, [], None, ["seed must be in [0, 2**32)", "got -1"]),
    (
        "seed beyond numpy's range",
        {"seed": 2**32},
        [],
        None,
        ["seed must be in [0, 2**32)", "got 4294967296"],
    ),
    (
        "negative max_train_samples",
        {"max_train_samples": -5},
        [],
        None,
        ["max_train_samples must be >= 1 (or null for every row), got -5"],
    ),
    (
        "zero max_train_samples",
        {"max_train_samples": 0},
        [],
        None,
        ["max_train_samples must be >= 1 (or null for every row), got 0"],
    ),
    (
        "negative max_eval_samples",
        {"max_eval_samples": -1},
        [],
        None,
        ["max_eval_samples must be >= 1 (or null for every row), got -1"],
    ),
    (
        "zero epochs and no max_steps",
        {"max_steps": -1, "num_train_epochs": 0},
        [],
        None,
        ["num_train_epochs must be > 0 and finite when max_steps is not set, got 0"],
    ),
    (
        "negative epochs and no max_steps",
        {"max_steps": -1},
        ["--num_train_epochs", "-2"],
        None,
        ["num_train_epochs must be > 0 and finite when max_steps is not set, got -2"],
    ),
    (
        "max_steps 0",
        {"max_steps": 0},
        [],
        None,
        ["max_steps must be >= 1, or -1 to train for num_train_epochs, got 0"],
    ),
    (
        "max_steps -5",
        {"max_steps": -5},
        [],
        None,
        ["max_steps must be >= 1, or -1 to train for num_train_epochs, got -5"],
    ),
    ("negative warmup_steps", {"warmup_steps": -2}, [], None, ["warmup_steps must be >= 0"]),
    (
        "logging_steps 0",
        {"logging_steps": 0},
        [],
        None,
        ["logging_steps must be > 0 when logging_strategy is 'steps', got 0"],
    ),
    (
        "save_steps 0",
        {"save_strategy": "steps", "save_steps": 0},
        [],
        None,
        ["save_steps must be > 0 when save_strategy is 'steps', got 0"],
    ),
    (
        "eval_steps negative",
        {"eval_strategy": "steps", "eval_steps": -10},
        [],
        None,
        ["eval_steps must be > 0 when eval_strategy is 'steps', got -10"],
    ),
    (
        "save_total_limit 0",
        {"save_total_limit": 0},
        [],
        None,
        ["save_total_limit must be >= 1 (or null), got 0"],
    ),
    ("adam_beta1 above 1", {"adam_beta1": 1.5}, [], None, ["adam_beta1 must be in [0, 1)"]),
    (
        "negative dataloader workers",
        {"dataloader_num_workers": -1},
        [],
        None,
        ["dataloader_num_workers must be >= 0, got -1"],
    ),
    (
        "max_length beyond the model's positions",
        {"max_length": 1000},
        [],
        None,
        [
            "max_length 1000 is beyond the position limit of model",
            "(128 positions)",
            "set max_length <= 128",
        ],
    ),
    (
        "lora target that matches nothing",
        {"finetune": "lora", "lora": {"target_modules": ["query", "qkv"]}},
        [],
        None,
        [
            "lora.target_modules entry 'qkv' matches no linear layer",
            "names end in: classifier, dense, key, query, value",
        ],
    ),
    (
        "lora targets that are not strings",
        {"finetune": "lora", "lora": {"target_modules": [1, 2]}},
        [],
        None,
        ["lora.target_modules must be a non-empty list of module names (strings)", "[1, 2]"],
    ),
    (
        "lora targets empty list",
        {"finetune": "lora", "lora": {"target_modules": []}},
        [],
        None,
        ["lora.target_modules must be a non-empty list", "got []"],
    ),
    (
        "lora targets a bare string",
        {"finetune": "lora", "lora": {"target_modules": "query"}},
        [],
        None,
        ["lora.target_modules has the wrong type", "'query'"],
    ),
    (
        "lora alpha 0",
        {"finetune": "lora", "lora": {"alpha": 0}},
        [],
        None,
        ["lora.alpha must be >= 1, got 0"],
    ),
]


def _empty_dir(tmp: Path) -> None:
    (tmp / "notamodel").mkdir()
    (tmp / "notamodel" / "notes.txt").write_text("not a model")


def _config_only(tmp: Path) -> None:
    (tmp / "configonly").mkdir()
    shutil.copy(Path(make_tiny_model_dir(tmp)) / "config.json", tmp / "configonly")


def _model_file(tmp: Path) -> None:
    (tmp / "weights.gguf").write_bytes(b"GGUF\0\0\0\0")


def _data_file(tmp: Path) -> None:
    (tmp / "datafile").write_text("not a folder")


def _task_file(tmp: Path) -> None:
    (tmp / "d2").mkdir()
    (tmp / "d2" / "sst2").write_text("not a folder")


def _train_dir(tmp: Path) -> None:
    train = tmp / "glue" / "sst2" / "train.tsv"
    train.unlink()
    train.mkdir()


def _train_bytes(text: bytes) -> Disk:
    def write(tmp: Path) -> None:
        (tmp / "glue" / "sst2" / "train.tsv").write_bytes(text)

    return write


# The case: read with a standard CSV reader this is 2 rows, not 3, and one sentence
# holds a tab, a label and a newline.
MERGED = b'sentence\tlabel\na fine film\t1\n"a row that opens a quote\t0\nand closes it"\t1\n'
DISK_ROWS: list[tuple[str, dict[str, Any], list[str], Disk | None, list[str]]] = [
    (
        "model folder without config.json",
        {"model_name_or_path": "{tmp}/notamodel"},
        [],
        _empty_dir,
        ["model_name_or_path", "notamodel'", "is a folder without config.json: not a model folder"],
    ),
    (
        "model folder without weights",
        {"model_name_or_path": "{tmp}/configonly"},
        [],
        _config_only,
        ["configonly'", "holds config.json but no weights"],
    ),
    (
        "model path is a file",
        {"model_name_or_path": "{tmp}/weights.gguf"},
        [],
        _model_file,
        ["weights.gguf'", "is a file, expected a model folder", "set gguf_file: weights.gguf"],
    ),
    (
        "data_dir is a file",
        {"data_dir": "{tmp}/datafile"},
        [],
        _data_file,
        ["data_dir", "datafile'", "is a file, expected a folder holding sst2/train.tsv"],
    ),
    (
        "task folder is a file",
        {"data_dir": "{tmp}/d2"},
        [],
        _task_file,
        ["task folder", "d2/sst2'", "is a file, expected a folder"],
    ),
    (
        "data_dir does not exist",
        {"data_dir": "{tmp}/nodata"},
        [],
        None,
        ["data_dir", "nodata' does not exist (from the recipe); it should hold sst2/train.tsv"],
    ),
    (
        "train.tsv is a directory",
        {},
        [],
        _train_dir,
        ["sst2/train.tsv'", "is a directory, expected a TSV file"],
    ),
    (
        "TSV quote that closes on a later line",
        {},
        [],
        _train_bytes(MERGED),
        ["sst2/train.tsv' line 3: a quote opened on this line closes on line 4"],
    ),
    (
        "TSV non-UTF-8 bytes",
        {},
        [],
        _train_bytes(b"sentence\tlabel\nfine\t1\nna\xffve\t0\n"),
        ["sst2/train.tsv' line 3: not valid UTF-8 (byte 0xff)"],
    ),
    (
        "TSV row with an extra tab",
        {},
        [],
        _train_bytes(b"sentence\tlabel\nfine\t1\na\ttab\t0\nok\t1\n"),
        ["sst2/train.tsv' line 3 has 3 fields, expected 2 (sentence, label)"],
    ),
    (
        "TSV unclosed quote at the end",
        {},
        [],
        _train_bytes(b'sentence\tlabel\nfine\t1\n"open\t0\n'),
        ["sst2/train.tsv' line 3: malformed quoting"],
    ),
    (
        "TSV text after a closing quote",
        {},
        [],
        _train_bytes(b'sentence\tlabel\n"a" b\t1\n'),
        ["sst2/train.tsv' line 2: malformed quoting"],
    ),
    (
        "TSV quote closing on a later line, then text",
        {},
        [],
        _train_bytes(MERGED.replace(b'it"\t1', b'it" here\t1')),
        ["sst2/train.tsv' line 3: malformed quoting"],
    ),
    (
        "TSV blank line inside",
        {},
        [],
        _train_bytes(b"sentence\tlabel\nfine\t1\n\nok\t0\n"),
        ["sst2/train.tsv' line 3 blank, expected 2"],
    ),
]


def _fill(value: Any, tmp: Path) -> Any:
    return value.replace("{tmp}", str(tmp)) if isinstance(value, str) else value


@pytest.mark.parametrize("row", ROWS + DISK_ROWS, ids=[r[0] for r in ROWS + DISK_ROWS])
def test_train_refuses_before_loading_the_model(
    row, tmp_path: Path, no_model, capsys: pytest.CaptureFixture[str]
) -> None:
    from qat.cli.train import main

    _, keys, overrides, disk, fragments = row
    recipe = tiny_recipe(tmp_path, **{k: _fill(v, tmp_path) for k, v in keys.items()})
    if disk is not None:
        disk(tmp_path)
    before = tree_hashes(tmp_path)
    assert main([recipe, *overrides]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    for fragment in fragments:
        assert fragment in line, line
    assert tree_hashes(tmp_path) == before
    assert not (tmp_path / "out").exists()


def test_recipe_that_is_a_directory(tmp_path: Path, no_model, capsys) -> None:
    from qat.cli.train import main

    assert main([str(tmp_path)]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert line.endswith(f"recipe {str(tmp_path)!r} is a directory, expected a recipe .yaml file")


@pytest.mark.parametrize(
    "name,text,fragment",
    [
        (
            "duplicate key",
            "seed: 1\nlearning_rate: 0.1\nseed: 2\n",
            "line 3: duplicate key 'seed' (first on line 1)",
        ),
        (
            "alias bomb",
            "a: &a [x, x, x, x, x, x, x, x, x]\n"
            + "".join(
                f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
            ),
            "line 2: YAML alias *a is not allowed in a recipe",
        ),
    ],
)
def test_hostile_recipe_files(tmp_path: Path, no_model, capsys, name, text, fragment) -> None:
    from qat.cli.train import main

    recipe = Path(tiny_recipe(tmp_path))
    recipe.write_text(text + recipe.read_text().replace("seed: 7\n", ""))
    before = tree_hashes(tmp_path)
    assert main([str(recipe)]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert str(recipe) in line and fragment in line, line
    assert tree_hashes(tmp_path) == before


# --- eval / perplexity / profile: outputs and inputs of the wrong kind ----------------------


def _eval(argv: list[str]) -> int:
    from qat.cli.eval import main

    return main(argv)


def _ppl(argv: list[str]) -> int:
    from qat.cli.perplexity import main

    return main(argv)


def _profile(argv: list[str]) -> int:
    from qat.cli.profile import main

    return main(argv)


COMMANDS = {"eval": _eval, "perplexity": _ppl, "profile": _profile}


def _setup_out_dir(tmp: Path) -> list[str]:
    (tmp / "results").mkdir()
    (tmp / "results" / "keep.json").write_text("{}")
    return ["--output", str(tmp / "results")]


def _setup_out_under_file(tmp: Path) -> list[str]:
    (tmp / "afile").write_text("x")
    return ["--output", str(tmp / "afile" / "r.json")]


def _setup_profile_file(tmp: Path) -> list[str]:
    (tmp / "prof").write_text("my notes")
    return ["--output_dir", str(tmp / "prof")]


def _setup_wikitext_file(tmp: Path) -> list[str]:
    (tmp / "wt.txt").write_text("text")
    os.environ["QAT_WIKITEXT_DIR"] = str(tmp / "wt.txt")  # monkeypatch restores it
    return []


def _setup_wikitext_split_dir(tmp: Path) -> list[str]:
    (tmp / "wikitext" / "test.txt").unlink()
    (tmp / "wikitext" / "test.txt").mkdir()
    return []


def _setup_wikitext_bytes(tmp: Path) -> list[str]:
    (tmp / "wikitext" / "test.txt").write_bytes(b"line one\nline \xc3\x28 two\n")
    return []


def _setup_not_a_model(tmp: Path) -> list[str]:
    (tmp / "emptymodel").mkdir()
    return ["--model_name_or_path", str(tmp / "emptymodel")]


def _setup_model_file(tmp: Path) -> list[str]:
    (tmp / "model.bin").write_bytes(b"\0" * 16)
    return ["--model_name_or_path", str(tmp / "model.bin")]


def _setup_fifo(tmp: Path) -> list[str]:
    os.mkfifo(tmp / "pipe")
    return []


WRONG_KIND = [
    (
        "eval --output is a directory",
        "eval",
        _setup_out_dir,
        ["--output", "results'", "is a directory, expected a file path"],
    ),
    (
        "perplexity --output is a directory",
        "perplexity",
        _setup_out_dir,
        ["--output", "results'", "is a directory, expected a file path"],
    ),
    (
        "eval --output under a file",
        "eval",
        _setup_out_under_file,
        ["afile/r.json' cannot be written", "afile' is a file, not a folder"],
    ),
    (
        "profile --output_dir is a file",
        "profile",
        _setup_profile_file,
        ["--output_dir", "prof'", "is a file, expected a folder"],
    ),
    (
        "QAT_WIKITEXT_DIR is a file",
        "perplexity",
        _setup_wikitext_file,
        ["QAT_WIKITEXT_DIR=", "wt.txt'", "is a file, expected a folder holding test.txt"],
    ),
    (
        "wikitext test.txt is a directory",
        "perplexity",
        _setup_wikitext_split_dir,
        ["test.txt is a directory, expected the raw text file"],
    ),
    (
        "wikitext not UTF-8",
        "perplexity",
        _setup_wikitext_bytes,
        ["test.txt' line 2: not valid UTF-8 (byte 0xc3)"],
    ),
    (
        "perplexity chunk longer than the positions",
        "perplexity",
        None,
        ["--chunk_size 4096 is beyond the position limit", "(128 positions)"],
    ),
    ("eval device string", "eval", None, ["--device 'gpu' is not one of cpu, cuda, cuda:N"]),
    (
        "eval model folder that is not a model",
        "eval",
        _setup_not_a_model,
        ["model_name_or_path", "emptymodel'", "is a folder without config.json"],
    ),
    (
        "profile model path that is a file",
        "profile",
        _setup_model_file,
        ["model_name_or_path", "model.bin'", "is a file, expected a model folder"],
    ),
]


@pytest.mark.parametrize("row", WRONG_KIND, ids=[r[0] for r in WRONG_KIND])
def test_commands_refuse_wrong_kinds_before_loading(
    row, tmp_path: Path, wikitext_dir, no_model, capsys
) -> None:
    _, command, setup, fragments = row
    arch = "opt" if command == "perplexity" else "bert"
    recipe = tiny_recipe(
        tmp_path, model_name_or_path=make_tiny_model_dir(tmp_path, arch), max_eval_samples=4
    )
    argv = [recipe, *(setup(tmp_path) if setup else [])]
    if "chunk" in row[0]:
        argv += ["--chunk_size", "4096"]
    if "device" in row[0]:
        argv += ["--device", "gpu"]
    before = tree_hashes(tmp_path)
    assert COMMANDS[command](argv) == 2
    line = one_error_line(capsys.readouterr().err, command)
    for fragment in fragments:
        assert fragment in line, line
    assert tree_hashes(tmp_path) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["eval", "profile"])
def test_source_that_is_a_fifo(tmp_path: Path, no_model, capsys, command) -> None:
    """A named pipe would block a reader forever: refused by kind, never opened."""
    _setup_fifo(tmp_path)
    assert COMMANDS[command]([str(tmp_path / "pipe")]) == 2
    line = one_error_line(capsys.readouterr().err, command)
    assert "pipe' is not a regular file or a directory" in line, line


def test_train_recipe_that_is_a_fifo(tmp_path: Path, no_model, capsys) -> None:
    from qat.cli.train import main

    _setup_fifo(tmp_path)
    assert main([str(tmp_path / "pipe")]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "pipe' is not a regular file, expected a recipe .yaml file" in line, line


def test_eval_max_length_beyond_positions_from_a_checkpoint_recipe(
    tmp_path, no_model, capsys
) -> None:
    recipe = tiny_recipe(tmp_path)
    assert _eval([recipe, "--max_length", "129"]) == 2
    line = one_error_line(capsys.readouterr().err, "eval")
    assert "max_length 129 is beyond the position limit" in line


# --- subset before tokenising --------------------------------------------------------------


class _Stop(Exception):
    pass


def test_max_train_samples_is_taken_before_tokenising(tmp_path, monkeypatch) -> None:
    """64 rows on disk, 5 asked for: 5 are tokenised, the same 5 as shuffling the tokenised
    set (the behaviour before the subset moved)."""
    import qat.tasks.glue
    from qat.cli.train import main
    from qat.models import load_tokenizer
    from qat.tasks.glue import get_task, load_glue, tokenize_glue

    recipe = tiny_recipe(tmp_path, max_train_samples=5, max_eval_samples=3)
    seen: dict[str, Any] = {}

    def spy(ds, task, tokenizer, max_length):
        seen.update(
            sizes={k: len(v) for k, v in ds.items()},
            out=tokenize_glue(ds, task, tokenizer, max_length),
        )
        raise _Stop

    monkeypatch.setattr(qat.tasks.glue, "tokenize_glue", spy)
    with pytest.raises(_Stop):
        main([recipe])
    assert seen["sizes"] == {"train": 5, "validation": 3}
    task = get_task("sst2")
    tok = load_tokenizer(make_tiny_model_dir(tmp_path))
    old = tokenize_glue(load_glue("sst2", str(tmp_path / "glue")), task, tok, 32)
    old_train = old["train"].shuffle(seed=7).select(range(5))
    assert seen["out"]["train"]["input_ids"] == old_train["input_ids"]
    assert seen["out"]["train"]["label"] == old_train["label"]
    assert seen["out"]["validation"]["input_ids"] == old["validation"]["input_ids"][:3]


def test_eval_subsets_before_tokenising(tmp_path, monkeypatch) -> None:
    import qat.tasks.glue
    from qat.cli.eval import main

    recipe = tiny_recipe(tmp_path)
    sizes = []

    def spy(ds, *args):
        sizes.append({k: len(v) for k, v in ds.items()})
        raise _Stop

    monkeypatch.setattr(qat.tasks.glue, "tokenize_glue", spy)
    with pytest.raises(_Stop):
        main([recipe, "--max_eval_samples", "4"])
    assert sizes == [{"validation": 4}]


def test_valid_values_still_pass(tmp_path) -> None:
    """The boundaries that stay legal: lr 0, seed 0, epochs with max_steps -1, 1 sample."""
    from qat.runs.recipe.load import load_recipe

    r = load_recipe(
        tiny_recipe(
            tmp_path,
            learning_rate=0,
            seed=0,
            max_steps=-1,
            num_train_epochs=0.5,
            max_train_samples=1,
            max_eval_samples=1,
            warmup_steps=0,
            save_strategy="epoch",
            save_steps=0,
        )
    )
    assert r.args.learning_rate == 0 and r.args.num_train_epochs == 0.5
    assert json.loads(json.dumps(r.resolved["max_train_samples"])) == 1
