"""Issue #21, "not one line" and chat data: hostile input to the decoder, chat and command-line
surface gets one ``qat <command>: error:`` line and exit 2 (or, for the chat labels, the right
tokens learnt), never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tiny import CHAT_DIR, lm_train_error, make_tiny_causal_lm_dir

pytestmark = pytest.mark.usefixtures("committed_wikitext")


def _pair(tmp_path, name: str, data: bytes) -> dict[str, str]:
    f = tmp_path / name
    f.write_bytes(data)
    return {"train_file": str(f), "validation_file": str(f)}


def test_non_utf8_train_file(tmp_path, capsys):
    keys = _pair(tmp_path, "rows.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    err = lm_train_error(tmp_path, capsys, **keys)
    assert err == (
        f"qat train: error: data file {keys['train_file']!r} line 2: not valid UTF-8 (byte 0xe9)"
    )


def test_non_utf8_text_train_file(tmp_path, capsys):
    keys = _pair(tmp_path, "doc.txt", b"plain\n\xff\xfe text\n")
    err = lm_train_error(tmp_path, capsys, **keys)
    assert err.endswith("line 2: not valid UTF-8 (byte 0xff)")


@pytest.mark.parametrize("name", ["deep.json", "deep.jsonl"])
def test_deeply_nested_json_train_file(tmp_path, capsys, name):
    keys = _pair(tmp_path, name, b"[" * 200_000 + b"]" * 200_000 + b"\n")
    err = lm_train_error(tmp_path, capsys, **keys)
    assert err.startswith(f"qat train: error: data file {keys['train_file']!r}")
    assert err.endswith("JSON nested too deeply to read")


@pytest.mark.parametrize("name", ["docs.JSONL", "docs.Json", "docs.TXT"])
def test_data_suffix_is_read_whatever_its_case(tmp_path, name):
    from types import SimpleNamespace

    from qat.tasks.language_modeling import lm_text

    body = "some words " * 20
    data = (
        json.dumps({"text": body}) + "\n"
        if name.lower().endswith(".jsonl")
        else json.dumps([{"text": body}])
        if name.lower().endswith(".json")
        else body
    )
    f = tmp_path / name
    f.write_text(data)
    args = SimpleNamespace(train_file=str(f), train_split="train", text_column="text")
    assert lm_text(args, "train")[0] == body  # the rows' text, not the file's raw JSON


@pytest.mark.parametrize("name", ["docs.csv", "docs.parquet", "docs"])
def test_unrecognised_data_suffix_is_refused(tmp_path, capsys, name):
    keys = _pair(tmp_path, name, b"text\nsome words\n")
    err = lm_train_error(tmp_path, capsys, **keys)
    suffix = os.path.splitext(name)[1]
    assert err == (
        f"qat train: error: data file {keys['train_file']!r}: unrecognised suffix "
        f"{suffix!r}; expected one of .txt, .json, .jsonl (plain text, a JSON list "
        "of objects, one JSON object a line)"
    )


@pytest.mark.parametrize("completion", [5, None, {"role": "assistant"}])
def test_chat_completion_that_is_not_text(tmp_path, capsys, completion):
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"prompt": "Two plus three?", "completion": completion}) + "\n")
    err = lm_train_error(tmp_path, capsys, chat=True, train_file=str(f))
    assert err == (
        f"qat train: error: data file {str(f)!r} row 1: completion is "
        f"{type(completion).__name__}; expected a string or a list of "
        "{role, content} messages"
    )


def test_command_line_value_that_is_not_yaml(tmp_path, capsys):
    err = lm_train_error(tmp_path, capsys, argv=["--run_name", "a: b: c"])
    assert err == (
        "qat train: error: --run_name: value 'a: b: c' is not valid YAML (mapping "
        "values are not allowed here); quote it for a string, e.g. \"'a: b: c'\""
    )


def test_quoted_value_is_the_string(tmp_path):
    from qat.runs.recipe.text import parse_overrides

    assert parse_overrides(["--run_name", "'a: b: c'"]) == {"run_name": "a: b: c"}


@pytest.mark.parametrize("cmd", [["-m", "qat.cli", "train", "--help"], ["qat/train.py", "--help"]])
def test_help_into_a_closed_pipe_is_quiet(cmd):
    r, w = os.pipe()
    os.close(r)  # the reader is gone before qat writes: every write is EPIPE
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    p = subprocess.run(
        [sys.executable, *cmd],
        stdout=w,
        cwd=os.getcwd(),
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        timeout=120,
    )
    os.close(w)
    assert p.stderr == "" and p.returncode == 141


# --- chat labels -------------------------------------------------------------------------------

SYSTEM_INJECTING = (  # as Qwen's: a default system turn unless the conversation opens with one
    "{% if messages[0]['role'] != 'system' %}[CLS]system: You are helpful.[SEP]{% endif %}"
    "{% for m in messages %}[CLS]{{ m['role'] }}: {{ m['content'] }}[SEP]{% endfor %}"
    "{% if add_generation_prompt %}[CLS]assistant:{% endif %}"
)


def _tok(tmp_path, template=None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_tiny_causal_lm_dir(tmp_path, chat=True))
    if template:
        tok.chat_template = template
    return tok


def _learnt(tok, ids, labels) -> str:
    from qat.tasks.chat import IGNORE_INDEX

    return tok.decode([i for i, t in zip(ids, labels) if t != IGNORE_INDEX])


def test_chat_row_opening_with_an_assistant_turn_learns_only_that_turn(tmp_path):
    from qat.tasks.chat import encode_chat

    tok = _tok(tmp_path, SYSTEM_INJECTING)
    msgs = [
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "How can I help?"},
    ]
    ids, labels = encode_chat(tok, msgs)
    assert tok.decode(ids).startswith("[CLS] system : you are helpful.")
    assert _learnt(tok, ids, labels) == "hello there. [SEP] how can i help? [SEP]"


def test_chat_labels_agree_with_prefix_tokenisation_on_the_fixture(tmp_path):
    """Mapping character spans to one tokenisation gives the labels that tokenising every
    prefix gave (the former, quadratic method), row by row."""
    from qat.tasks.chat import IGNORE_INDEX, encode_chat, row_messages

    tok = _tok(tmp_path, SYSTEM_INJECTING)
    rows = [json.loads(line) for line in (CHAT_DIR / "train.jsonl").read_text().splitlines()]
    for n, row in enumerate(rows[:8], 1):
        msgs = row_messages(row, n, "fixture")
        ids, labels = encode_chat(tok, msgs)
        ref = [IGNORE_INDEX] * len(ids)
        for i, m in enumerate(msgs):
            if m["role"] == "assistant" and i:
                pre = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
                upto = tok.apply_chat_template(msgs[: i + 1], tokenize=False)
                a = len(tok(pre, add_special_tokens=False)["input_ids"])
                b = len(tok(upto, add_special_tokens=False)["input_ids"])
                ref[a:b] = ids[a:b]
        assert labels == ref


def test_long_chat_row_stops_at_the_block(tmp_path):
    """Turns that start beyond block_size are not rendered at all (each costs a template of
    its prefix): count the template calls."""
    from qat.tasks.chat import encode_chat

    tok = _tok(tmp_path)
    msgs = [{"role": r, "content": f"turn {k}"} for k in range(200) for r in ("user", "assistant")]
    calls = []
    real = tok.apply_chat_template

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    tok.apply_chat_template = counting
    ids, labels = encode_chat(tok, msgs, max_tokens=32)
    assert len(calls) <= 1 + 2 * 6  # the whole once, then two per turn within 32 tokens
    full_ids, full_labels = encode_chat(tok, msgs)
    assert labels[:32] == full_labels[:32]


# --- codebook side files -----------------------------------------------------------------------


def _make_format_within(spec: dict, seconds: float = 30.0):
    """``make_format(spec)`` in a daemon thread: a hang fails the test instead of blocking it."""
    import threading

    from qat.formats import make_format

    box: dict = {}

    def go():
        try:
            box["fmt"] = make_format(spec)
        except Exception as e:  # noqa: BLE001 - handed to the test
            box["err"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "make_format hung"
    return box


@pytest.mark.parametrize("fmt", ["bof4", "lobcq"])
def test_codebook_file_that_is_a_fifo_is_refused_without_blocking(tmp_path, fmt):
    fifo = tmp_path / "levels.json"
    os.mkfifo(fifo)
    box = _make_format_within({"format": fmt, "codebook_file": str(fifo)})
    assert "is not a regular file" in str(box["err"]) and str(fifo) in str(box["err"])


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff", "'utf-8' codec can't decode byte 0x89"),
        (b"[" * 100_000, "JSON nested too deeply"),
        (b" " * ((1 << 20) + 1), "too large for a codebook file"),
    ],
)
def test_codebook_file_that_is_binary_deep_or_huge_is_one_line(tmp_path, data, reason):
    from qat.formats.base import FormatError

    f = tmp_path / "levels.json"
    f.write_bytes(data)
    err = _make_format_within({"format": "bof4", "codebook_file": str(f)})["err"]
    assert isinstance(err, FormatError) and reason in str(err) and "\n" not in str(err)


def test_fifo_codebook_file_through_qat_train(tmp_path, capsys):
    fifo = tmp_path / "levels.json"
    os.mkfifo(fifo)
    quant = {"weight": {"format": "bof4", "codebook_file": str(fifo)}}
    err = lm_train_error(tmp_path, capsys, quant=quant)
    assert err.endswith(f"codebook_file {str(fifo)!r} is not a regular file")
