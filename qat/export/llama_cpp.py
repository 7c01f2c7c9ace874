"""Run an exported GGUF file in llama.cpp (through llama-cpp-python's C API): logits and
WikiText-2 perplexity by the same formula as ``qat perplexity``, so the engine can judge whether
it computes what ``qat`` trained.

The binding is optional (``pip install 'qat[llama]'``; it builds llama.cpp from source). The
model is loaded on the CPU with llama.cpp's defaults (F16 KV cache) except one: no "extra"
weight buffers (``use_extra_bufts = false``), so a quantised matmul runs llama.cpp's plain
kernels (each input row quantised to Q8_0 blocks, integer block dot products) rather than a
repacked or AMX variant; the AMX tile path also faults (SIGILL) in sandboxes that do not grant
the tile state, as on the machines this was written on.
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from qat.errors import UsageError

INSTALL_HINT = (
    "pip install 'qat[llama]' (llama-cpp-python: builds llama.cpp from source, "
    "many minutes on a small CPU; see docs/deploy.md)"
)


def require_llama_cpp() -> ModuleType:
    """The ``llama_cpp`` module, or UsageError saying how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise UsageError(
            f"llama.cpp's Python binding is not installed ({e}); {INSTALL_HINT}"
        ) from None
    return llama_cpp


_QUIET = None  # the C log callback must outlive every call into the library


def _silence(lib: ModuleType) -> None:
    global _QUIET
    if _QUIET is None:
        _QUIET = lib.llama_log_callback(lambda level, text, data: None)
        lib.llama_log_set(_QUIET, ctypes.c_void_p(0))


class LlamaCppModel:
    """A GGUF model and one llama.cpp context of ``n_ctx`` tokens (a context manager).

    ``logits(ids)`` evaluates one sequence from an empty cache and returns every position's
    logits, ``[len(ids), vocab]`` float32. ``exact_attention`` keeps K and V in F32 (llama.cpp
    stores them in F16 by default): then the engine's only rounding beyond qat's is the order
    of its sums.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        n_ctx: int,
        threads: int | None = None,
        exact_attention: bool = False,
    ):
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"GGUF file {str(path)!r} does not exist")
        self.lib = lib = require_llama_cpp()
        _silence(lib)
        lib.llama_backend_init()
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = False
        self.model = lib.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise UsageError(f"llama.cpp could not load {str(path)!r} (not a GGUF model it knows?)")
        threads = threads or max(1, len(os.sched_getaffinity(0)))
        cp = lib.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_threads = cp.n_threads_batch = threads
        if exact_attention:  # F32 K/V cache, no flash attention: only weights/inputs rounded
            cp.type_k = cp.type_v = lib.GGML_TYPE_F32
            cp.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = lib.llama_init_from_model(self.model, cp)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise UsageError(
                f"llama.cpp could not make a context of {n_ctx} tokens for {str(path)!r}"
            )
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = n_ctx
        self.batch = lib.llama_batch_init(n_ctx, 0, 1)

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = None

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenisation of ``text`` (no BOS, special tokens as text)."""
        raw = text.encode("utf-8")
        buf = (self.lib.llama_token * (len(raw) + 16))()
        n = self.lib.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), False, False)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needed {-n} tokens, had room for {len(buf)}")
        return list(buf[:n])

    def _decode(self, ids: Sequence[int], start: int, all_logits: bool) -> np.ndarray:
        """Append ``ids`` at positions ``start...`` of sequence 0; the logits asked for."""
        n = len(ids)
        if not 0 < n or start + n > self.n_ctx:
            raise UsageError(f"{start + n} tokens for a context of {self.n_ctx}")
        lib, b = self.lib, self.batch
        for i, t in enumerate(ids):
            b.token[i], b.pos[i], b.n_seq_id[i] = int(t), start + i, 1
            b.seq_id[i][0] = 0
            b.logits[i] = all_logits or i == n - 1
        b.n_tokens = n
        if lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        rows = n if all_logits else 1
        return np.ctypeslib.as_array(
            lib.llama_get_logits(self.ctx), shape=(rows, self.n_vocab)
        ).copy()

    def _clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        self._clear()
        return self._decode(ids, 0, all_logits=True)

    def greedy(self, prompt: Sequence[int], n_new: int) -> list[int]:
        """``n_new`` greedily decoded tokens after ``prompt``, one ``llama_decode`` per token
        (as a server generates)."""
        self._clear()
        last = self._decode(prompt, 0, all_logits=False)[0]
        out: list[int] = []
        for i in range(n_new):
            out.append(int(last.argmax()))
            if i + 1 < n_new:
                last = self._decode([out[-1]], len(prompt) + i, all_logits=False)[0]
        return out


def llama_cpp_perplexity(
    model: LlamaCppModel, chunks: Sequence[Sequence[int]], progress: bool = True
) -> tuple[float, float, int]:
    """``(ppl, mean token loss, tokens scored)`` of an open GGUF ``model`` over ``chunks`` of
    token ids (each at most ``model.n_ctx`` long), each chunk from an empty cache predicting
    its ``len - 1`` next tokens, as ``qat.tasks.language_modeling.perplexity`` scores a
    PyTorch model."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    total, count = 0.0, 0
    for chunk in tqdm(chunks, desc="llama.cpp perplexity", unit="chunk", disable=not progress):
        logits = torch.from_numpy(model.logits(chunk))[:-1]
        targets = torch.as_tensor(list(chunk[1:]), dtype=torch.long)
        total += float(F.cross_entropy(logits, targets, reduction="sum").double())
        count += len(chunk) - 1
    mean = total / count
    return math.exp(mean), mean, count
