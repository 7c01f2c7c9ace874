"""What each accuracy lever buys a decoder after post-training quantisation: block rotations,
least-error scales, 8-bit attention matmuls, fused rotations, GPTQ rounding, per format
(W6A6 / W4A4 BFP, MXFP4 W4A4, Q4_0 weights with Q8_0 inputs).

    QAT_WIKITEXT_DIR=../shared/data/wikitext-2-raw python bench/decoder_levers.py \\
        --out outputs/bench_levers [--rows w4a4 w4a4-rot64 ...] [--test_chunks 2] \\
        [--val_chunks 1] [--chunk_size 2048]

The float model (the recipe's, default SmolLM2-135M) is loaded once; every row quantises a
copy with its quant config and scores WikiText-2 perplexity on the first ``--test_chunks``
chunks of the test split (what ``qat perplexity --max_chunks N`` scores) and on the first
``--val_chunks`` of the validation split (where settings are chosen). ``results.json`` is
written after every row; ``--table`` prints the markdown table of one or more of them and
``--plot`` draws it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _bfp(width: int, **extra: Any) -> dict[str, Any]:
    return {"format": "bfp", "width": width, "exponent_width": 8, "block_size": 16, **extra}


def _quant(w: dict, a: dict, mm: dict | None, rotation: int | None = None) -> dict[str, Any]:
    q: dict[str, Any] = {"weight": w, "activation": a, "matmul": mm, "exclude": ["lm_head"]}
    if rotation:
        q["rotation"] = {"kind": "hadamard", "size": rotation}
    return q


def grid() -> dict[str, tuple[str, dict[str, Any] | None]]:
    """Row id -> (display name, quant config); ``None`` is the float model."""
    rows: dict[str, tuple[str, dict[str, Any] | None]] = {"float": ("float", None)}
    mx4 = {"format": "mxfp4"}
    q4_0, q8_0 = {"format": "ggml_q4_0"}, {"format": "ggml_q8_0"}
    families = {
        "w6a6": ("W6A6 BFP", _bfp(6)),
        "w4a4": ("W4A4 BFP", _bfp(4)),
        "mxfp4": ("MXFP4 W4A4", mx4),
    }
    for key, (label, fmt) in families.items():
        mse = {**fmt, "scale": "mse"}
        rows[key] = (label, _quant(fmt, fmt, fmt))
        for size in (16, 32, 64, 128):
            rows[f"{key}-rot{size}"] = (f"{label} + rotation {size}", _quant(fmt, fmt, fmt, size))
        rows[f"{key}-mse"] = (f"{label} + mse scales", _quant(mse, mse, mse))
        for size in (16, 32, 64):
            rows[f"{key}-rot{size}-mse"] = (
                f"{label} + rotation {size} + mse",
                _quant(mse, mse, mse, size),
            )
    rows["w4a4-mm8"] = ("W4A4 BFP, 8-bit matmuls", _quant(_bfp(4), _bfp(4), _bfp(8)))
    rows["w4a4-mmfloat"] = ("W4A4 BFP, float matmuls", _quant(_bfp(4), _bfp(4), None))
    for key, (label, fused) in _fused_rows().items():
        w4 = _quant(_bfp(4), _bfp(4), _bfp(4))
        rows[f"w4a4-{key}"] = (f"W4A4 BFP + {label}", {**w4, "rotation": fused})
    # what llama.cpp runs: Q4_0 weights, Q8_0 inputs to the linears, float attention
    rows["q4_0"] = ("Q4_0 weights, Q8_0 inputs", _quant(q4_0, q8_0, None))
    gptq = {"samples": 16}
    for key in (
        "w4a4",
        "w4a4-rot16",
        "w4a4-fused",
        "w4a4-fused-b16-online16",
        "w4a4-fused-b64-online16",
        "w6a6",
        "w6a6-rot16",
        "q4_0",
    ):
        label, quant = rows[key]
        rows[f"{key}-gptq"] = (f"{label} + GPTQ", {**quant, "gptq": gptq})
    rows.update(_w4a4_families())
    rows["float-fused"] = ("float + fused R1+R2", {"rotation": _fused_rows()["fused"][1]})
    rows["w4-only"] = ("W4 BFP weight-only", _quant(_bfp(4), None, None))
    rows["w4-only-rot16"] = ("W4 BFP weight-only + rotation 16", _quant(_bfp(4), None, None, 16))
    return rows


LOBCQ_CODEBOOKS = "docs/papers/codebooks"  # fitted on SmolLM2 by bench/papers.py (fit-codebooks)


def _w4a4_families() -> dict[str, tuple[str, dict[str, Any]]]:
    """The other ~4.5-bit W4A4 formats under the rotations that work for BFP: NVFP4, MXFP4,
    LO-BCQ (default codebooks, and with the activation and matmul codebooks fitted on SmolLM2's
    validation chunks 1-2), and llama.cpp's Q4_0 weights with Q8_0 linear inputs."""
    fused = _fused_rows()
    lobcq = {"format": "lobcq"}
    fit = {role: {**lobcq, "codebook_file": f"{LOBCQ_CODEBOOKS}/smollm2_lobcq_{role}.json"}
           for role in ("activation", "matmul")}  # fmt: skip
    every = {  # id -> (label, weight, activation, matmul formats)
        "nvfp4": ("NVFP4 W4A4", *[{"format": "nvfp4"}] * 3),
        "mxfp4": ("MXFP4 W4A4", *[{"format": "mxfp4"}] * 3),
        "lobcq": ("LO-BCQ W4A4", lobcq, lobcq, lobcq),
        "lobcq-fit": ("LO-BCQ W4A4, fitted A + matmul", lobcq, fit["activation"], fit["matmul"]),
    }
    rows: dict[str, tuple[str, dict[str, Any]]] = {}
    for key, (label, *roles) in every.items():
        quant = _quant(*roles)
        if key != "mxfp4":
            rows[key] = (label, quant)
            rows[f"{key}-rot16"] = (f"{label} + rotation 16", _quant(*roles, 16))
        for lever in ("fused", "fused-b64-online16"):
            name, rot = fused[lever]
            rows[f"{key}-{lever}"] = (f"{label} + {name}", {**quant, "rotation": rot})
    q4 = _quant({"format": "ggml_q4_0"}, {"format": "ggml_q8_0"}, None)
    for lever in ("fused", "fused-b64-online16"):
        name, rot = fused[lever]
        rows[f"q4_0-{lever}"] = (f"Q4_0 weights, Q8_0 inputs + {name}", {**q4, "rotation": rot})
    return rows


def _fused_rows() -> dict[str, tuple[str, dict[str, Any]]]:
    """Fused rotations (qat.quant.transforms.fuse): R1 on the residual stream, R2 per head, each a
    Hadamard (576 = 36 x 16 for SmolLM2), with seeded signs, or random orthogonal; with online
    blocks on the down projection's input and Q/K."""
    had = {"residual": "hadamard", "heads": "hadamard"}
    on16 = {"online": {"size": 16}}

    def blocks(n: int) -> dict[str, Any]:
        return {
            "residual": {"kind": "hadamard", "size": n},
            "heads": {"kind": "hadamard", "size": n},
        }

    return {
        "fused-r1": ("fused R1", {"residual": "hadamard"}),
        "fused": ("fused R1+R2", had),
        "fused-signed": (
            "fused R1+R2 signed",
            {"residual": "random_hadamard", "heads": "random_hadamard"},
        ),
        "fused-random": ("fused R1+R2 random", {"residual": "random", "heads": "random"}),
        "fused-online16": ("fused R1+R2 + online 16", {**had, **on16}),
        "fused-b16": ("fused R1+R2 blocks of 16", blocks(16)),
        "fused-b16-online16": ("fused R1+R2 blocks of 16 + online 16", {**blocks(16), **on16}),
        "fused-b64-online16": ("fused R1+R2 blocks of 64 + online 16", {**blocks(64), **on16}),
        "fused-onlinefull": ("fused R1+R2 + online full", {**had, "online": {"size": "full"}}),
    }


def _commit() -> str | None:
    """The measured commit: git's, or QAT_COMMIT for a snapshot without .git."""
    import os
    import subprocess

    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        out = None
    if out is not None and out.returncode == 0:
        return out.stdout.strip()
    return os.environ.get("QAT_COMMIT")


def score(model: Any, chunks: list[Any]) -> float:
    from qat.tasks.language_modeling import perplexity

    return perplexity(model, chunks)[0]


def run(a: argparse.Namespace) -> None:
    import torch

    from qat.quant.quantize import quantize_model
    from qat.runs.build import build_model
    from qat.tasks.language_modeling import chunk_ids, load_wikitext

    rows = grid()
    unknown = [r for r in a.rows or [] if r not in rows]
    if unknown:
        raise SystemExit(f"decoder_levers: unknown row(s) {unknown}; rows: {', '.join(rows)}")
    built = build_model(a.recipe, ["--quant", "null"], head="causal_lm", device="cpu")
    base, tok = built.model.eval(), built.tokenizer
    chunks = {}
    for split, n in (("test", a.test_chunks), ("validation", a.val_chunks)):
        ids = tok(load_wikitext(split), return_tensors="pt", verbose=False)["input_ids"][0]
        chunks[split] = chunk_ids(ids, a.chunk_size, n)
    # GPTQ calibrates on validation text after the chunks that choose settings (the recipe's
    # train split; WikiText-2's train split is not offline), never on the test chunks
    skip = a.val_chunks * a.chunk_size
    calib = chunk_ids(ids[skip:], a.calib_len, a.calib_rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    done = json.loads(path.read_text())["results"] if path.is_file() else []
    have = {r["id"] for r in done}
    for row_id in a.rows or list(rows):
        if row_id in have:
            continue
        name, quant = rows[row_id]
        t0 = time.time()
        try:
            model = base if quant is None else quantize_model(copy.deepcopy(base), quant)
            if quant is not None and quant.get("gptq"):
                from qat.quant.transforms.gptq import apply_gptq

                batches = [
                    {"input_ids": torch.stack(calib[i : i + 4])} for i in range(0, len(calib), 4)
                ]
                apply_gptq(model, batches, model.qat_quant.gptq_spec)
        except Exception as e:  # noqa: BLE001 - a row the model cannot take is reported
            print(f"{row_id}: skipped: {e}", flush=True)
            done.append({"id": row_id, "name": name, "quant": quant, "skipped": str(e)})
        else:
            val = score(model, chunks["validation"])
            test = score(model, chunks["test"])
            done.append(
                {
                    "id": row_id,
                    "name": name,
                    "quant": quant,
                    "validation_ppl": val,
                    "test_ppl": test,
                    "seconds": round(time.time() - t0, 1),
                }
            )
            print(f"{row_id}: validation {val:.3f}, test {test:.3f}", flush=True)
            del model
        path.write_text(
            json.dumps(
                {
                    "command": " ".join(["python", "bench/decoder_levers.py", *sys.argv[1:]]),
                    "commit": _commit(),
                    "threads": torch.get_num_threads(),
                    "recipe": a.recipe,
                    "chunk_size": a.chunk_size,
                    "test_chunks": a.test_chunks,
                    "val_chunks": a.val_chunks,
                    "gptq_calibration": f"{a.calib_rows} x {a.calib_len} validation tokens "
                    f"after the first {a.val_chunks * a.chunk_size}",
                    "results": done,
                },
                indent=2,
            )
        )


def report(paths: list[Path], figure: Path | None) -> None:
    results: list[dict[str, Any]] = []
    meta: dict[str, Any] = {}
    for p in paths:
        data = json.loads(p.read_text())
        meta = meta or data
        results += data["results"]
    order = list(grid())  # by format, then lever, whatever order the rows ran in
    results.sort(key=lambda r: order.index(r["id"]) if r["id"] in order else len(order))
    ref = next((r for r in results if r["id"] == "float"), None)
    print(
        f"\nWikiText-2, chunks of {meta['chunk_size']} tokens: test = first "
        f"{meta['test_chunks']}, validation = first {meta['val_chunks']}\n"
    )
    print("| model | validation PPL | test PPL | test vs float |")
    print("| --- | ---: | ---: | ---: |")
    for r in results:
        if "skipped" in r:
            print(f"| {r['name']} | n/a | n/a | {r['skipped'][:60]} |")
            continue
        rel = "" if ref is None else f"{r['test_ppl'] / ref['test_ppl'] - 1:+.1%}"
        print(f"| {r['name']} | {r['validation_ppl']:.2f} | {r['test_ppl']:.2f} | {rel} |")
    if figure is not None:
        plot(results, figure)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if "test_ppl" in r]
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.32 * len(rows)))
    names = [r["name"] for r in rows][::-1]
    ppl = [r["test_ppl"] for r in rows][::-1]
    bars = ax.barh(
        names,
        ppl,
        color=[
            "#4c72b0"
            if r["id"] == "float"
            else "#c44e52"
            if "rot" not in r["id"] and "mse" not in r["id"]
            else "#55a868"
            for r in rows
        ][::-1],
    )
    for bar, v in zip(bars, ppl):
        ax.text(
            bar.get_width() * 1.01,
            bar.get_y() + bar.get_height() / 2,
            f"{v:.1f}",
            va="center",
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_xlabel("WikiText-2 test perplexity, PTQ (log scale; lower is better)")
    ax.set_title(
        "SmolLM2-135M post-training quantisation: plain (red) vs levers (green)", fontsize=10
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"drew {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(REPO / "recipes/smollm2_wikitext_w4a4.yaml"))
    p.add_argument("--out", default=str(REPO / "outputs/bench_levers"))
    p.add_argument(
        "--rows", nargs="+", default=None, help=f"row ids (default: all): {', '.join(grid())}"
    )
    p.add_argument("--chunk_size", type=int, default=2048)
    p.add_argument("--test_chunks", type=int, default=2)
    p.add_argument("--val_chunks", type=int, default=1)
    p.add_argument("--calib_rows", type=int, default=16, help="GPTQ rows (validation, after val)")
    p.add_argument("--calib_len", type=int, default=512, help="tokens per GPTQ row")
    p.add_argument("--table", nargs="+", type=Path, default=None, metavar="RESULTS_JSON")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG")
    a = p.parse_args(argv)
    if a.table:
        report(a.table, a.plot)
        return 0
    run(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
