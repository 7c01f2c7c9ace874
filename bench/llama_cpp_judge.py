"""llama.cpp as the judge of a GGUF export (issue #19).

For each recipe or trained run: ``qat export --to gguf``, then WikiText-2 perplexity of the same
token chunks twice, by ``qat`` (the recipe's fake-quantised PyTorch model, which should emulate
the engine: GGML weights, ``activation: {format: ggml_q8_0}``) and by llama.cpp running the
file; with the file size and llama.cpp's speed on this CPU (prompt tokens/s while scoring,
generated tokens/s decoding one token per call). Rows go to ``--out``/results.json after each.

    python bench/llama_cpp_judge.py --float_baseline \\
        "Q4_0 PTQ=recipes/smollm2_wikitext_q4_0.yaml" "Q4_0 QAT=outputs/smollm2_wikitext_q4_0"
    python bench/llama_cpp_judge.py --table outputs/bench_llama_cpp/results.json

Needs ``pip install 'qat[llama]'``; the tokenisers are compared too (``same_tokens``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _qat_side(
    recipe: str, overrides: list[str], text: str, chunks: int, chunk_size: int
) -> tuple[float, list]:
    import torch

    from qat.runs.build import build_model, resolve_source
    from qat.tasks.language_modeling import chunk_ids, perplexity

    built = build_model(
        resolve_source(recipe, overrides), head="causal_lm", device=torch.device("cpu")
    )
    ids = built.tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0]
    parts = chunk_ids(ids, chunk_size, chunks)
    ppl, _, _ = perplexity(built.model, parts)
    return ppl, [p.tolist() for p in parts]


def speed(gguf: Path, prompt: list[int], gen: int = 64, repeats: int = 3) -> dict[str, float]:
    """llama.cpp's tokens/s on this CPU, the best of ``repeats``: a prompt evaluated in one
    batch, and ``gen`` tokens decoded one per call after a 128-token prompt."""
    from qat.export.llama_cpp import LlamaCppModel

    best_prompt = best_gen = 0.0
    with LlamaCppModel(gguf, n_ctx=len(prompt) + gen) as model:
        model.greedy(prompt[:16], 4)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            model.logits(prompt)
            best_prompt = max(best_prompt, len(prompt) / (time.perf_counter() - t))
            t = time.perf_counter()
            model.greedy(prompt[:128], gen)
            best_gen = max(best_gen, gen / (time.perf_counter() - t))
    return {"prompt_tokens_per_s": best_prompt, "gen_tokens_per_s": best_gen}


def _engine_side(gguf: Path, text: str, chunks: list[list[int]], gen: int) -> dict[str, Any]:
    from qat.export.llama_cpp import LlamaCppModel, llama_cpp_perplexity

    with LlamaCppModel(gguf, n_ctx=max(len(c) for c in chunks)) as model:
        own = model.tokenize(text)[: sum(len(c) for c in chunks)]
        ppl, _, _ = llama_cpp_perplexity(model, chunks, progress=False)
    return {
        "llama_cpp_ppl": ppl,
        "same_tokens": own == [t for c in chunks for t in c],
        "gguf": str(gguf),
        **speed(gguf, chunks[0][:512], gen),
    }


def judge(
    recipe: str,
    out_dir: str | os.PathLike,
    chunks: int = 2,
    chunk_size: int = 2048,
    wikitext_dir: str | os.PathLike | None = None,
    gen: int = 64,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Export ``recipe`` (a recipe or run folder; recipe keys ``overrides``) to
    ``out_dir``/model.gguf and score it both ways on the first ``chunks`` test chunks."""
    overrides = list(overrides or [])
    if wikitext_dir is not None:
        os.environ["QAT_WIKITEXT_DIR"] = str(wikitext_dir)
    from qat.exporting import export_model
    from qat.tasks.language_modeling import load_wikitext

    t = time.perf_counter()
    done = export_model(recipe, out_dir, to="gguf", overrides=overrides, overwrite=True)
    export_s = time.perf_counter() - t
    gguf = done.weights
    text = load_wikitext("test")
    qat_ppl, ids = _qat_side(recipe, overrides, text, chunks, chunk_size)
    row = {
        "recipe": recipe,
        "overrides": overrides,
        "chunks": chunks,
        "chunk_size": chunk_size,
        "qat_ppl": qat_ppl,
        **_engine_side(gguf, text, ids, gen),
        "file_bytes": gguf.stat().st_size,
        "export_seconds": round(export_s, 1),
    }
    row["difference"] = row["llama_cpp_ppl"] / qat_ppl - 1
    return row


def table(rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if r.get("label") == "F16"), None)
    lines = [
        "| model | qat PPL | llama.cpp PPL | difference | file MiB | prompt tok/s | gen tok/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        speed = f"{r['prompt_tokens_per_s']:.0f} | {r['gen_tokens_per_s']:.1f}"
        if base is not None and r is not base:
            speed = (
                f"{r['prompt_tokens_per_s']:.0f} "
                f"({r['prompt_tokens_per_s'] / base['prompt_tokens_per_s']:.2f}x) | "
                f"{r['gen_tokens_per_s']:.1f} "
                f"({r['gen_tokens_per_s'] / base['gen_tokens_per_s']:.2f}x)"
            )
        lines.append(
            f"| {r.get('label') or r['recipe']} | {r['qat_ppl']:.2f} | "
            f"{r['llama_cpp_ppl']:.2f} | {100 * r['difference']:+.2f}% | "
            f"{r['file_bytes'] / 2**20:.1f} | {speed} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sources", nargs="*", help="recipes or run folders; LABEL=PATH names a row")
    p.add_argument(
        "--float_baseline",
        action="store_true",
        help="first, an F16 row: the first source with --quant null",
    )
    p.add_argument("--chunks", type=int, default=2)
    p.add_argument("--chunk_size", type=int, default=2048)
    p.add_argument("--out", type=Path, default=REPO / "outputs/bench_llama_cpp")
    p.add_argument("--table", type=Path, default=None, metavar="RESULTS_JSON")
    p.add_argument(
        "--speed",
        type=Path,
        default=None,
        metavar="RESULTS_JSON",
        help="only measure llama.cpp's speed again for the rows' GGUF files, "
        "interleaved (run it on a quiet machine), and rewrite the file",
    )
    a = p.parse_args(argv)
    if a.speed is not None:
        data = json.loads(a.speed.read_text())
        prompt = list(range(1000, 1512))
        for r in data["results"]:
            r.update(speed(Path(r["gguf"]), prompt))
        a.speed.write_text(json.dumps(data, indent=2))
        print(table(data["results"]))
        return 0
    if a.table is not None:
        print(table(json.loads(a.table.read_text())["results"]))
        return 0
    if not a.sources:
        p.error("give recipes / run folders, or --table")
    from qat.export.llama_cpp import require_llama_cpp

    require_llama_cpp()
    results = a.out / "results.json"
    rows: list[dict[str, Any]] = []
    jobs = [(s.rpartition("=")[0] or Path(s).stem, s.rpartition("=")[2], []) for s in a.sources]
    if a.float_baseline:
        jobs.insert(0, ("F16", jobs[0][1], ["--quant", "null"]))
    for i, (label, path, overrides) in enumerate(jobs):
        row = judge(path, a.out / f"gguf_{i}", a.chunks, a.chunk_size, overrides=overrides)
        row["label"] = label
        rows.append(row)
        a.out.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps({"results": rows}, indent=2))
        print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
