"""How fast is LO-BCQ against BFP? Its quantisers on SmolLM2's shapes, and the every-role W4A4
PTQ of SmolLM2, measured side by side in one run (issue #29, item 2).

    python bench/lobcq_speed.py --part quantizers [--reps 7] [--threads 1]
    QAT_WIKITEXT_DIR=../shared/data/wikitext-2-raw python bench/lobcq_speed.py --part ptq \\
        --rows bfp lobcq bfp lobcq lobcq_reference lobcq_before

``--part quantizers``: per shape (a 2048-token activation ``2048 x 576`` and ``2048 x 1536``,
a weight ``576 x 1536``, a block of P ``9 x 64 x 2048``, V ``9 x 2048 x 64`` blocked along the
tokens), float32, the time to fake-quantise with: LO-BCQ's reference as it was before it was
vectorised (the per-codebook loop of commit 77a2f01, kept below as the baseline), its reference
now, ``backend: compile`` (its C++ kernel), and BFP W4 E8 B16's reference and compile (its C++
kernel); the time of a copy (``x.clone()``) is the floor. Implementations alternate within
each repetition (drift on a shared machine hits all alike); the minimum over ``--reps`` is
reported, ratios taken within one shape.

``--part ptq``: SmolLM2-135M (the model of ``--recipe``) with weights, linear inputs and both
attention matmuls (Q, K, V, P) in one format, ``lm_head`` float, scored by perplexity on the
first ``--test_chunks`` x ``--chunk_size`` WikiText-2 test tokens; the wall time of
``quantize_model`` + scoring, per row, rows in the order given (alternate them: the machine
drifts). Row ids: ``bfp`` (BFP W4 E8 B16, ``backend: auto``: its C++ kernels, quantiser and
attention), ``lobcq`` (LO-BCQ 16, 8, 64, ``backend: auto``: its C++ kernel, the PyTorch block
attention), ``lobcq_reference`` (``backend: reference``), ``lobcq_before`` (the reference as it
was: the per-codebook loop, P through the eager attention). ``--out``'s JSON is written after
every row (a long run can be stopped).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

BFP4 = {"format": "bfp", "width": 4, "exponent_width": 8, "block_size": 16}
LOBCQ = {"format": "lobcq"}
SHAPES = {  # name -> (shape, dim)
    "activation 2048x576": ((2048, 576), -1),
    "activation 2048x1536": ((2048, 1536), -1),
    "weight 576x1536": ((576, 1536), -1),
    "P 9x64x2048": ((9, 64, 2048), -1),
    "V 9x2048x64 (dim -2)": ((9, 2048, 64), -2),
}


def per_codebook_assign(y, lut_values, valid=None, res: int = 1):
    """``qat.formats.lobcq.assign`` before it was vectorised (77a2f01): one pass over ``y``
    per codebook, the 16 error tensors stacked."""
    from qat.formats.lobcq import bins_of

    bins = bins_of(y, res)
    errs = []
    for c in range(lut_values.shape[0]):
        sq = (y - lut_values[c].take(bins)).square()
        errs.append((sq if valid is None else sq * valid).sum(dim=-1))
    stacked = torch.stack(errs)
    choice = stacked.argmin(dim=0)
    err = stacked.gather(0, choice.unsqueeze(0)).squeeze(0)
    flat = choice.unsqueeze(-1) * lut_values.shape[1] + bins
    return choice, lut_values.flatten().take(flat), err


@contextlib.contextmanager
def lobcq_before():
    """LO-BCQ as it ran before: the per-codebook loop, and P through the eager attention
    (no row-local blocks then)."""
    import qat.formats.lobcq as lobcq

    assign, prefix = lobcq.assign, lobcq.LOBCQ.prefix_block
    lobcq.assign = per_codebook_assign
    lobcq.LOBCQ.prefix_block = property(lambda self: None)
    try:
        yield
    finally:
        lobcq.assign, lobcq.LOBCQ.prefix_block = assign, prefix


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "command": " ".join(sys.argv),
    }


def write(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


# --- quantisers ---------------------------------------------------------------------------------


def bench_quantizers(reps: int, out: Path) -> None:
    from qat.formats import make_format
    from qat.quant.backends import fake_quantize

    lobcq, bfp = make_format(LOBCQ), make_format(BFP4)

    def before(x, dim):
        with lobcq_before():
            return lobcq.quantize(x, dim)

    impls = {
        "lobcq_reference_before": before,
        "lobcq_reference": lambda x, d: lobcq.quantize(x, d),
        "lobcq_compile": lambda x, d: fake_quantize(x, lobcq, d, "compile"),
        "bfp_reference": lambda x, d: bfp.quantize(x, d),
        "bfp_compile": lambda x, d: fake_quantize(x, bfp, d, "compile"),
        "copy": lambda x, d: x.clone(),
    }
    rows = []
    doc = {"part": "quantizers", "reps": reps, "environment": environment(), "rows": rows}
    for name, (shape, dim) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(*shape, generator=g) * torch.exp(torch.randn(*shape, generator=g))
        if name.startswith("P"):
            x = torch.softmax(x, dim=-1)
        want = lobcq.quantize(x, dim)
        for key in ("lobcq_reference_before", "lobcq_compile"):  # the same values, checked
            assert torch.equal(impls[key](x, dim), want), key
        times: dict[str, list[float]] = {k: [] for k in impls}
        for fn in impls.values():  # warm up (first calls build and cache)
            fn(x, dim)
        for _ in range(reps):
            for key, fn in impls.items():
                t = time.perf_counter()
                fn(x, dim)
                times[key].append(time.perf_counter() - t)
        row = {"shape": name, "elements": x.numel()}
        row.update({f"{k}_ms": min(v) * 1e3 for k, v in times.items()})
        row.update({f"{k}_median_ms": statistics.median(v) * 1e3 for k, v in times.items()})
        rows.append(row)
        write(out, doc)
        print(
            f"{name:<22} "
            + "  ".join(f"{k} {row[f'{k}_ms']:8.2f}" for k in impls)
            + "  (ms, min of reps)",
            flush=True,
        )


# --- SmolLM2 PTQ --------------------------------------------------------------------------------


def quant_for(row: str) -> dict[str, Any]:
    fmt = BFP4 if row == "bfp" else LOBCQ
    quant: dict[str, Any] = {
        "weight": fmt,
        "activation": fmt,
        "matmul": fmt,
        "exclude": ["lm_head"],
    }
    if row in ("lobcq_reference", "lobcq_before"):
        quant["backend"] = "reference"
    return quant


ROWS = ("bfp", "lobcq", "lobcq_reference", "lobcq_before")


def bench_ptq(a: argparse.Namespace, out: Path) -> None:
    from qat.quant.quantize import quantize_model
    from qat.runs.build import build_model
    from qat.tasks.language_modeling import chunk_ids, load_wikitext, perplexity

    built = build_model(a.recipe, ["--quant", "null"], head="causal_lm", device="cpu")
    base, tok = built.model.eval(), built.tokenizer
    ids = tok(load_wikitext("test"), return_tensors="pt", verbose=False)["input_ids"][0]
    chunks = chunk_ids(ids, a.chunk_size, a.test_chunks)
    rows: list[dict[str, Any]] = []
    doc = {
        "part": "ptq",
        "recipe": a.recipe,
        "chunk_size": a.chunk_size,
        "test_chunks": a.test_chunks,
        "environment": environment(),
        "rows": rows,
    }
    for row in a.rows:
        quant = quant_for(row)
        ctx = lobcq_before() if row == "lobcq_before" else contextlib.nullcontext()
        with ctx:
            t = time.perf_counter()
            model = quantize_model(copy.deepcopy(base), quant)
            ppl = perplexity(model, chunks)[0]
            seconds = time.perf_counter() - t
        del model
        rows.append({"row": row, "quant": quant, "ppl": ppl, "seconds": seconds})
        summary = {}
        for name in ROWS:
            s = [r["seconds"] for r in rows if r["row"] == name]
            if s:
                summary[name] = {"runs": len(s), "median_s": statistics.median(s), "min_s": min(s)}
        if "bfp" in summary:
            for v in summary.values():
                v["median_vs_bfp"] = v["median_s"] / summary["bfp"]["median_s"]
        doc["summary"] = summary
        write(out, doc)
        print(f"{row}: {seconds:.1f} s, perplexity {ppl:.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["quantizers", "ptq"], required=True)
    p.add_argument("--out", type=Path, default=None, help="JSON (default: outputs/bench/...)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--recipe", default=str(REPO / "recipes" / "smollm2_wikitext_w4a4.yaml"))
    p.add_argument("--rows", nargs="+", choices=ROWS, default=["bfp", "lobcq", "bfp", "lobcq"])
    p.add_argument("--chunk_size", type=int, default=2048)
    p.add_argument("--test_chunks", type=int, default=2)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = a.out or REPO / "outputs" / "bench" / f"lobcq_{a.part}.json"
    if a.part == "quantizers":
        bench_quantizers(a.reps, out)
    else:
        bench_ptq(a, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
