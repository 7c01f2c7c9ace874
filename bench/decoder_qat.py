"""Decoder QAT under one budget: WikiText-2 test perplexity of float (before and after
fine-tuning), PTQ and QAT (full, LoRA) side by side, every model evaluated on the same chunks.

    QAT_WIKITEXT_DIR=../shared/data/wikitext-2-raw python bench/decoder_qat.py \\
        --steps 200 --block_size 512 --batch 4 --seed 42 [--eval_chunks 16] \\
        [--codebook_recipe recipes/smollm2_wikitext_bof4s_a4.yaml] [--key value ...]

The recipe (default ``recipes/smollm2_wikitext_w4a4.yaml``) says the model, data and quant
config; the budget comes from the command line and is the same for every trained row. Rows:
float before FT, float after FT, PTQ (the recipe's quant on the untrained model), QAT full,
QAT LoRA, and with ``--codebook_recipe`` that recipe's PTQ and QAT full. Extra ``--key value``
pairs override every run's recipe (e.g. ``--use_cpu true``). Prints a markdown table and writes
``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from qat_vs_ptq import quant_label  # noqa: E402

from qat.runs.recipe import load_recipe  # noqa: E402

EVAL_ONLY = ["--do_train", "false", "--do_eval", "true"]


def rows(recipe: str, codebook: str | None, lora_lr: float) -> list[tuple[str, str, str, list]]:
    """(row id, display name, recipe, overrides); {q} is the recipe's quant label."""
    out = [
        ("float-before", "float, before FT", recipe, ["--quant", "null", *EVAL_ONLY]),
        ("float-after", "float, after FT", recipe, ["--quant", "null"]),
        ("ptq", "{q} PTQ", recipe, EVAL_ONLY),
        ("qat-full", "{q} QAT full", recipe, []),
        ("qat-lora", "{q} QAT LoRA", recipe,
         ["--finetune", "lora", "--learning_rate", str(lora_lr)]),
    ]
    if codebook:
        out += [("cb-ptq", "{q} PTQ", codebook, EVAL_ONLY),
                ("cb-qat-full", "{q} QAT full", codebook, [])]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(REPO / "recipes/smollm2_wikitext_w4a4.yaml"))
    p.add_argument("--codebook_recipe", default=None,
                   help="a second recipe (e.g. BOF4-S+OPQ weights): its PTQ and QAT full rows")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--block_size", type=int, required=True)
    p.add_argument("--batch", type=int, required=True, help="per-device train batch (chunks)")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--eval_chunks", type=int, default=None,
                   help="first N chunks of the test split (default: all of them)")
    p.add_argument("--lora_lr", type=float, default=2e-4)
    p.add_argument("--out", default=str(REPO / "outputs/bench_decoder_qat"))
    p.add_argument("--only", nargs="+", default=None, help="row ids to run (default: all)")
    a, extra = p.parse_known_args(argv)
    from qat.training.run import run

    out = Path(a.out)
    budget = ["--max_steps", str(a.steps), "--block_size", str(a.block_size),
              "--per_device_train_batch_size", str(a.batch), "--seed", str(a.seed),
              "--eval_split", "test", "--max_eval_samples",
              "null" if a.eval_chunks is None else str(a.eval_chunks),
              "--save_strategy", "no", "--report_to", "none", "--overwrite_output_dir", "true",
              *extra]
    targs = load_recipe(a.recipe, budget).training_args
    tokens = a.steps * a.batch * a.block_size * targs.gradient_accumulation_steps \
        * max(1, targs.world_size)
    results: list[dict[str, Any]] = []
    path = out / "results.json"

    def write() -> None:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "recipe": a.recipe, "codebook_recipe": a.codebook_recipe,
            "budget": {"steps": a.steps, "block_size": a.block_size, "batch": a.batch,
                       "seed": a.seed, "training_tokens": tokens, "eval_chunks": a.eval_chunks,
                       "lora_lr": a.lora_lr, "overrides": extra},
            "results": results}, indent=2))

    for row_id, name, recipe_path, overrides in rows(a.recipe, a.codebook_recipe, a.lora_lr):
        if a.only and row_id not in a.only:
            continue
        recipe = load_recipe(recipe_path, [*budget, *overrides, "--output_dir",
                                           str(out / row_id)])
        label = quant_label(None if recipe.args.quant is None else recipe.args.quant.to_dict())
        t0 = time.time()
        metrics = run(recipe)
        row = {"id": row_id, "name": name.format(q=label), "recipe": recipe_path,
               "eval_loss": metrics["eval_loss"], "perplexity": metrics["eval_perplexity"],
               "train_loss": metrics.get("train_loss"), "seconds": round(time.time() - t0, 1)}
        results.append(row)
        print(f"[{row['name']}] perplexity={row['perplexity']:.3f}", flush=True)
        write()  # after every row: a long CPU run that dies keeps what it measured
    after = next((r["perplexity"] for r in results if r["id"] == "float-after"), None)
    print(f"\n{Path(a.recipe).name}: {a.steps} steps x {a.batch} x {a.block_size} tokens "
          f"(x{targs.gradient_accumulation_steps} accumulation) = {tokens} training tokens, "
          f"seed {a.seed}; WikiText-2 test, "
          f"{'all' if a.eval_chunks is None else f'the first {a.eval_chunks}'} chunks of "
          f"{a.block_size} tokens\n")
    print("| model | WikiText-2 test PPL | vs float after FT |")
    print("| --- | ---: | ---: |")
    for r in results:
        rel = f"{r['perplexity'] / after - 1:+.1%}" if after and math.isfinite(
            r["perplexity"]) else ""
        print(f"| {r['name']} | {r['perplexity']:.2f} | {rel} |")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
