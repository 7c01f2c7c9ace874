"""``qat perplexity``: WikiText-2 perplexity of a causal LM under a recipe's quant config.

    qat perplexity recipes/smollm2_sst2.yaml --quant null --max_chunks 4
    qat perplexity outputs/smollm2_wikitext_w4a4       # a run or checkpoint folder (LoRA too)

The recipe's ``task_name`` is irrelevant here; ``lm_head`` stays float through the quant
config's ``exclude`` list. Chunking and the formula: ``qat.tasks.language_modeling``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from qat.cli.base import run_cli, split_options, write_results
from qat.errors import UsageError
from qat.runs.folders import check_output_file

WIKITEXT_ENV = "QAT_WIKITEXT_DIR"  # qat.tasks.language_modeling.WIKITEXT_ENV, without importing it
OPTIONS: dict[str, type] = {
    "max_chunks": int,
    "chunk_size": int,
    "split": str,
    "output": str,
    "device": str,
}
USAGE = f"""usage: qat perplexity RECIPE.yaml|RUN_DIR|MODEL.gguf [--max_chunks N]
                      [--chunk_size 2048] [--split test] [--output FILE] [--device D]
                      [--key value ...]

WikiText-2 (raw) perplexity of the recipe's model (a causal LM) under its quant config, of
a trained run / checkpoint folder (its quant config, LoRA adapter included), or of a GGUF
file run by llama.cpp (`qat export --to gguf`; needs pip install 'qat[llama]'): llama.cpp
tokenises the text and computes the logits, scored by the same formula, so the two agree
when the recipe emulates the engine (activation: {{format: ggml_q8_0}}).
Recipe keys override the recipe as in `qat train` (--quant null for float,
--quant.weight.width 6, ...). ${WIKITEXT_ENV} may point at a folder holding test.txt.
--max_chunks N   evaluate only the first N chunks (quick runs)
--chunk_size T   tokens per chunk (default 2048)
--split S        test (default) or validation
--output FILE    results JSON (default: <output_dir or RUN_DIR>/perplexity.json; beside a
                 GGUF file: <name>.perplexity.json)
--device D       cpu, cuda, cuda:N or auto (default: cuda when there is one, cpu with use_cpu)
--qdec.k_chunk K QDEC dynamic error compensation (k_chunk per 1024 inputs; also
                 --qdec.residual_bits B, --qdec.prefill step|token; default token here)
The last line printed reads perplexity=<value>."""


def run(path: str, argv: list[str]) -> dict[str, Any]:
    from qat import models
    from qat.quant.density import density_report
    from qat.quant.qdec import check_quant_for_qdec
    from qat.runs.build import build_model, resolve_source
    from qat.tasks.language_modeling import (
        check_chunk_size,
        chunk_ids,
        load_wikitext,
        perplexity,
    )

    opts, overrides = split_options(argv, OPTIONS)
    chunk_size = opts.get("chunk_size", 2048)
    if chunk_size < 2:
        raise UsageError(f"--chunk_size must be >= 2, got {chunk_size}")
    if opts.get("max_chunks") is not None and opts["max_chunks"] < 1:
        raise UsageError(f"--max_chunks must be >= 1, got {opts['max_chunks']}")
    if opts.get("output"):
        check_output_file(opts["output"])
    if path.endswith(".gguf"):
        return _run_gguf(Path(path), opts, overrides, chunk_size)
    src = resolve_source(path, overrides)
    recipe, args = src.recipe, src.recipe.args
    check_quant_for_qdec(args.quant, args.qdec)
    out = (
        Path(opts["output"])
        if opts.get("output")
        else (src.checkpoint or Path(recipe.args.output_dir)) / "perplexity.json"
    )
    check_output_file(out)
    device = models.resolve_device(opts.get("device"), recipe.args.use_cpu)
    text = load_wikitext(opts.get("split", "test"))
    built = build_model(
        src,
        head="causal_lm",
        device=device,
        check=lambda config: check_chunk_size(config, chunk_size, args.model_name_or_path),
    )
    model, tokenizer = built.model, built.tokenizer
    qdec = _apply_qdec(model, args)
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0].to(device)
    chunks = chunk_ids(ids, chunk_size, opts.get("max_chunks"))
    ppl, loss, count = perplexity(model, chunks)
    density = density_report(model)
    results = {
        "model_name_or_path": args.model_name_or_path,
        "gguf_file": args.gguf_file,
        "quant": None if args.quant is None else args.quant.to_dict(),
        "split": opts.get("split", "test"),
        "chunk_size": chunk_size,
        "chunks": len(chunks),
        "total_chunks": ids.numel() // chunk_size,
        "tokens_scored": count,
        "mean_loss": loss,
        "perplexity": ppl,
        "bits_per_element": density.quantized_bits_per_element or None,
        "qdec": None if qdec is None else {**qdec.to_dict(), "prefill": qdec.prefill or "token"},
    }
    return write_results(results, out)


def _run_gguf(
    path: Path, opts: dict[str, Any], overrides: list[str], chunk_size: int
) -> dict[str, Any]:
    """A GGUF file scored by llama.cpp: its own tokeniser and logits, qat's chunks and formula."""
    import torch

    from qat.export.llama_cpp import LlamaCppModel, llama_cpp_perplexity, require_llama_cpp
    from qat.tasks.language_modeling import chunk_ids, load_wikitext

    if overrides:
        raise UsageError(
            f"{overrides[0]}: recipe keys do not apply to a GGUF file (llama.cpp "
            "runs it as written)"
        )
    if opts.get("device") not in (None, "cpu"):
        raise UsageError(
            f"--device {opts['device']!r}: a GGUF file is run by llama.cpp on the CPU here"
        )
    if not path.is_file():
        raise UsageError(f"GGUF file {str(path)!r} does not exist")
    out = Path(opts["output"]) if opts.get("output") else path.with_suffix(".perplexity.json")
    check_output_file(out)
    require_llama_cpp()
    text = load_wikitext(opts.get("split", "test"))
    with LlamaCppModel(path, n_ctx=chunk_size) as model:
        ids = model.tokenize(text)
        chunks = [
            c.tolist() for c in chunk_ids(torch.tensor(ids), chunk_size, opts.get("max_chunks"))
        ]
        ppl, loss, count = llama_cpp_perplexity(model, chunks)
    results = {
        "gguf": str(path),
        "engine": "llama.cpp",
        "split": opts.get("split", "test"),
        "chunk_size": chunk_size,
        "chunks": len(chunks),
        "total_chunks": len(ids) // chunk_size,
        "tokens_scored": count,
        "mean_loss": loss,
        "perplexity": ppl,
        "file_bytes": path.stat().st_size,
    }
    return write_results(results, out)


def _apply_qdec(model: Any, args: Any) -> Any:
    """QDEC from the recipe's ``qdec`` section or saved beside the model; scored per token
    (``prefill: token``) unless the section says otherwise, so the perplexity is the one
    token-by-token decoding would give."""
    from qat.quant.qdec import apply_qdec, set_default_prefill

    src = Path(args.model_name_or_path)
    qdec = apply_qdec(model, args.qdec, src if src.is_dir() else None)
    if qdec is not None:
        set_default_prefill(model, "token")
    return qdec


def main(argv: list[str] | None = None) -> int:
    def body(argv: list[str]) -> None:
        r = run(argv[0], argv[1:])
        print(
            f"qat perplexity: {r['chunks']} of {r['total_chunks']} chunks of "
            f"{r['chunk_size']} tokens ({r['tokens_scored']} scored), mean loss "
            f"{r['mean_loss']:.4f}; wrote {r['output']}"
        )
        print(f"perplexity={r['perplexity']:.4f}")

    return run_cli("perplexity", USAGE, argv, body)


if __name__ == "__main__":
    sys.exit(main())
