"""Tiny decoders for the language-modelling tests: a 2-layer, 32-wide random ``LlamaForCausalLM``
saved with the real BERT tokenizer (as ``tests/tiny.py`` does for classifiers), optionally with a
small chat template, and recipes for ``task_name: causal_lm`` / ``chat`` on committed fixtures."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tiny import (
    FIXTURES,
    QUIET_CPU_RUN,
    TOKENIZER_FILES,
    W4A4_BFP,
    bert_tokenizer_dir,
    write_recipe,
)

CHAT_DIR = FIXTURES / "chat"  # train.jsonl, validation.jsonl: {"messages": [...]} rows
WIKITEXT_DIR = FIXTURES / "wikitext-2-raw"
# [CLS] opens a turn and [SEP] closes it: both are special tokens of the BERT tokenizer, so a
# conversation tokenises turn by turn and every prefix's tokens are a prefix of the whole's.
CHAT_TEMPLATE = ("{% for m in messages %}[CLS]{{ m['role'] }}: {{ m['content'] }}[SEP]"
                 "{% endfor %}{% if add_generation_prompt %}[CLS]assistant:{% endif %}")


def make_tiny_causal_lm_dir(tmp_path: str | os.PathLike, seed: int = 0,
                            chat: bool = False) -> str:
    """Save a tiny random Llama causal LM (+ tokenizer, + chat template if ``chat``)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(tmp_path) / f"tiny-llama-lm{'-chat' if chat else ''}"
    if (out / "config.json").is_file():
        return str(out)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128, pad_token_id=0, bos_token_id=101,
                         eos_token_id=102)
    LlamaForCausalLM(config).save_pretrained(out)
    src = bert_tokenizer_dir()
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    if chat:
        cfg_path = out / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["chat_template"] = CHAT_TEMPLATE
        cfg_path.write_text(json.dumps(cfg))
    return str(out)


def lm_recipe(tmp_path: str | os.PathLike, name: str = "lm.yaml", chat: bool = False,
              **overrides) -> str:
    """A W4A4-BFP causal_lm recipe (WikiText-2 fixture: validation trains, test evaluates) or,
    with ``chat``, a chat recipe on the instruction fixture; keys override."""
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
        keys.update(train_file=str(CHAT_DIR / "train.jsonl"),
                    validation_file=str(CHAT_DIR / "validation.jsonl"))
    else:
        keys.update(dataset_name="wikitext", train_split="validation", eval_split="test")
    keys.update(overrides)
    return write_recipe(tmp / name, **keys)
