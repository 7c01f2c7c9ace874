"""Tiny random models of each supported architecture, for fast unit tests."""

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

ARCHS = ("opt", "llama", "bert", "gpt2")


def tiny_model(arch: str, seed: int = 0, num_labels: int = 2, init: float = 0.2):
    """A 2-layer model with a large init so quantisation visibly moves the logits."""
    torch.manual_seed(seed)
    common = dict(num_labels=num_labels, initializer_range=init)
    if arch == "opt":
        cfg = OPTConfig(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=4,
                        word_embed_proj_dim=32, vocab_size=100, max_position_embeddings=64,
                        pad_token_id=1, init_std=init, **common)
        return OPTForSequenceClassification(cfg)
    if arch == "llama":
        cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                          pad_token_id=0, **common)
        return LlamaForSequenceClassification(cfg)
    if arch == "bert":
        cfg = BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                         num_attention_heads=4, vocab_size=100, **common)
        return BertForSequenceClassification(cfg)
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64,
                         pad_token_id=0, **common)
        return GPT2ForSequenceClassification(cfg)
    raise ValueError(arch)


def tiny_batch(seed: int = 0, batch: int = 3, seq: int = 20):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 100, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, seq - 6:] = 0  # one padded row exercises the attention mask
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1][:batch])}
