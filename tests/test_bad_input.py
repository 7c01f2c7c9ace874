"""Bad input, one test per row: ``qat train`` exits with code 2 before any training, with one
``qat train: error:`` line that names the key or file and the bad value.

Each row starts from a valid tiny recipe and breaks one thing, in the recipe file, on the
command line or on disk. ``Trainer.train`` is patched to fail the test if it is ever reached.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tiny import one_error_line, tiny_recipe, write_tsv

from qat.cli.train import main
from qat.training.trainer import QATTrainer

# (id, recipe keys to change, command-line overrides, disk change, fragments the message has)
Row = tuple[str, dict[str, Any], list[str], Callable[[Path], None] | None, list[str]]


def _data(tmp: Path) -> Path:
    return tmp / "glue" / "sst2"


def _rm_train(tmp: Path) -> None:
    (_data(tmp) / "train.tsv").unlink()


def _empty_train(tmp: Path) -> None:
    (_data(tmp) / "train.tsv").write_text("")


def _no_label_column(tmp: Path) -> None:
    write_tsv(_data(tmp) / "train.tsv", ["sentence", "idx"], [["a fine film", "0"]])


def _label_out_of_range(tmp: Path) -> None:
    write_tsv(
        _data(tmp) / "train.tsv",
        ["sentence", "label"],
        [["a fine film", "1"], ["a dull film", "0"], ["a strange film", "7"]],
    )


def _file_in_the_way(tmp: Path) -> None:
    (tmp / "blocker").write_text("not a folder")


ROWS: list[Row] = [
    (
        "unknown top-level key",
        {},
        ["--learning_rat", "1e-4"],
        None,
        ["unknown option --learning_rat", "did you mean 'learning_rate'"],
    ),
    (
        "unknown key in the recipe file",
        {"per_device_train_batchsize": 8},
        [],
        None,
        [
            "recipe.yaml",
            "unknown recipe key 'per_device_train_batchsize'",
            "did you mean 'per_device_train_batch_size'",
        ],
    ),
    (
        "unknown nested quant key",
        {},
        ["--quant.weigth", "{format: bfp, width: 4}"],
        None,
        ["unknown key quant.weigth", "did you mean quant.weight"],
    ),
    (
        "unknown format parameter",
        {},
        ["--quant.weight.widht", "4"],
        None,
        ["quant.weight", "no parameter 'widht'", "did you mean 'width'"],
    ),
    (
        "unknown lora key",
        {"finetune": "lora"},
        ["--lora.alhpa", "8"],
        None,
        ["unknown key lora.alhpa", "did you mean lora.alpha?"],
    ),
    (
        "wrong type, top level",
        {"max_length": "long"},
        [],
        None,
        ["max_length has the wrong type", "'long'"],
    ),
    (
        "wrong type, TrainingArguments",
        {},
        ["--per_device_train_batch_size", "eight"],
        None,
        ["per_device_train_batch_size has the wrong type", "'eight'"],
    ),
    (
        "wrong type, format parameter",
        {},
        ["--quant.weight.width", "four"],
        None,
        ["quant.weight", "bfp.width must be an integer", "'four'"],
    ),
    (
        "width out of range for the format",
        {},
        ["--quant.weight.width", "99"],
        None,
        ["quant.weight", "bfp.width must be in [2, 24], got 99"],
    ),
    (
        "block_size not positive",
        {},
        ["--quant.activation.block_size", "0"],
        None,
        ["quant.activation", "bfp.block_size must be >= 1, got 0"],
    ),
    (
        "override regex matches no module",
        {},
        ["--quant.overrides", "{'fc9$': {weight: null}}"],
        None,
        ["quant.overrides pattern 'fc9$' matches no linear or attention module", "bert.embeddings"],
    ),
    (
        "unknown task",
        {"task_name": "sst3"},
        [],
        None,
        ["unknown task_name 'sst3'", "did you mean 'sst2'"],
    ),
    (
        "unknown finetune mode",
        {},
        ["--finetune", "qlora"],
        None,
        ["finetune must be one of full, lora, classifier", "'qlora'"],
    ),
    (
        "bad on_nonfinite",
        {"on_nonfinite": "ignore"},
        [],
        None,
        ["on_nonfinite must be 'stop' or 'skip'", "'ignore'"],
    ),
    ("missing data file", {}, [], _rm_train, ["sst2/train.tsv", "does not exist"]),
    ("empty data file", {}, [], _empty_train, ["sst2/train.tsv", "is empty"]),
    (
        "TSV missing a column",
        {},
        [],
        _no_label_column,
        ["sst2/train.tsv", "lacks column(s) label", "it has sentence, idx"],
    ),
    (
        "label out of range",
        {},
        [],
        _label_out_of_range,
        ["sst2/train.tsv", "row 4: label '7' is out of range; expected 0..1"],
    ),
    (
        "model path does not exist",
        {"model_name_or_path": "/no/such/model-dir"},
        [],
        None,
        ["model_name_or_path '/no/such/model-dir'", "does not exist"],
    ),
    (
        "model package not installed",
        {"model_name_or_path": "pkg://no_such_pkg/model"},
        [],
        None,
        ["'pkg://no_such_pkg/model'", "package 'no_such_pkg' is not installed"],
    ),
    (
        "Hub unreachable",
        {"model_name_or_path": "no-such-org/no-such-model"},
        [],
        None,
        [
            "'no-such-org/no-such-model' from the Hugging Face Hub",
            "Point model_name_or_path at a local folder",
        ],
    ),
    (
        "output_dir not writable",
        {},
        [],
        _file_in_the_way,
        ["output_dir", "blocker/out", "is not writable", "is a file, not a folder"],
    ),
    (
        "recipe with a Python tag (safe_load only)",
        {"seed": "!!python/object/apply:os.getcwd []"},
        [],
        None,
        ["recipe.yaml", "is not valid YAML", "python/object/apply:os.getcwd"],
    ),
]


@pytest.fixture(autouse=True)
def _no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("training started despite bad input")

    monkeypatch.setattr(QATTrainer, "train", fail)


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_fails_before_training_with_a_clear_message(
    row: Row, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, keys, overrides, disk, fragments = row
    if disk is _file_in_the_way:
        keys = {**keys, "output_dir": str(tmp_path / "blocker" / "out")}
    recipe = tiny_recipe(tmp_path, **keys)
    if "!!python" in str(keys.get("seed")):  # a tag has to be written raw, not as a string
        text = (
            Path(recipe)
            .read_text()
            .replace("'!!python/object/apply:os.getcwd []'", "!!python/object/apply:os.getcwd []")
        )
        Path(recipe).write_text(text)
    if disk is not None:
        disk(tmp_path)
    assert main([recipe, *overrides]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    for fragment in fragments:
        assert fragment in line, line
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_data_from_an_unreachable_hub_says_how_to_use_local_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QAT_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    recipe = tiny_recipe(tmp_path, data_dir=None)
    assert main([recipe]) == 2
    err = capsys.readouterr().err
    assert "could not load nyu-mll/glue/sst2 from the Hugging Face Hub" in err
    assert "set data_dir in the recipe or QAT_DATA_DIR" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any folder")
def test_output_dir_without_write_permission(tmp_path: Path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    recipe = tiny_recipe(tmp_path, output_dir=str(locked / "out"))
    assert main([recipe]) == 2
    assert f"output_dir {str(locked / 'out')!r} is not writable" in capsys.readouterr().err


def test_recipes_are_read_with_safe_load_only() -> None:
    """No full/unsafe YAML loader anywhere in the package."""
    root = Path(__file__).resolve().parent.parent / "qat"
    for path in root.rglob("*.py"):
        text = path.read_text()
        for bad in (
            "yaml.load(",
            "yaml.unsafe_load",
            "yaml.full_load",
            "yaml.Loader",
            "UnsafeLoader",
            "FullLoader",
        ):
            assert bad not in text, f"{path}: {bad}"
