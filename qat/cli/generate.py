"""``qat generate``: greedy text generation from a recipe's (quantised) causal LM, streamed.

    qat generate recipes/smollm2_sst2.yaml --prompt "The tower is" --qdec.k_chunk 32

The model loads as in ``qat perplexity`` (recipe or run folder; quantised by its ``quant``
section). With QDEC (``--qdec.*`` options, a recipe ``qdec:`` section, or residuals saved
beside the model by ``qat.quant.qdec.save_qdec``) the prompt is generated twice, without and with
QDEC, and both speeds are printed (tokens/s over the new tokens, prefill included).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from qat.cli.base import run_cli, split_options
from qat.errors import UsageError

OPTIONS: dict[str, type] = {"prompt": str, "max_new_tokens": int, "device": str}
USAGE = """usage: qat generate RECIPE.yaml|RUN_DIR --prompt TEXT [--max_new_tokens 64]
                    [--qdec.k_chunk K] [--qdec.residual_bits B] [--device D] [--key value ...]

Greedy generation from the recipe's causal LM under its quant config; tokens are streamed to
stdout. Recipe keys override the recipe as in `qat train` (--quant.weight.width 3, ...).
--prompt TEXT        the prompt (required)
--max_new_tokens N   tokens to generate (default 64; stops early at the end-of-text token)
--qdec.k_chunk K     QDEC dynamic error compensation: K channels per 1024 inputs (e.g. 32);
                     then the prompt runs without and with QDEC and both speeds are printed
--qdec.residual_bits B   bits of the stored residual (2..8, default 4)
--qdec.residual_device   cpu (default) or same (the model's device)
--device D           cpu, cuda, cuda:N or auto (default: cuda when there is one)"""


def _generate(
    model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, label: str
) -> tuple[int, float]:
    """Stream one greedy generation; returns (new tokens, seconds)."""
    import torch
    from transformers import TextStreamer

    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt")
    # only what a causal LM takes (BERT-style tokenizers add token_type_ids)
    enc = {k: enc[k].to(device) for k in ("input_ids", "attention_mask") if k in enc}
    print(f"--- {label} ---", flush=True)
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    # no_grad, not inference_mode: under inference_mode qat.quant.ste.SharedInput cannot
    # track in-place changes (no version counters), so q/k/v would each quantise their input
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id,
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return int(out.shape[1] - enc["input_ids"].shape[1]), seconds


def run(path: str, argv: list[str]) -> dict[str, Any]:
    from pathlib import Path

    from qat import models
    from qat.quant.qdec import apply_qdec, check_quant_for_qdec
    from qat.runs.build import build_model, resolve_source

    opts, overrides = split_options(argv, OPTIONS)
    prompt = opts.get("prompt")
    if not prompt:
        raise UsageError("--prompt is required (the text to continue)")
    max_new = opts.get("max_new_tokens", 64)
    if max_new < 1:
        raise UsageError(f"--max_new_tokens must be >= 1, got {max_new}")
    src = resolve_source(path, overrides)
    if src.finetune == "lora":
        raise UsageError(
            f"{path!r} is a LoRA run; qat generate needs a full model (merge the adapter first)"
        )
    args = src.recipe.args
    check_quant_for_qdec(args.quant, args.qdec)
    device = models.resolve_device(opts.get("device"), src.recipe.args.use_cpu)
    built = build_model(src, head="causal_lm", device=device)
    model, tokenizer = built.model, built.tokenizer
    results: dict[str, Any] = {}
    n, secs = _generate(model, tokenizer, prompt, max_new, "without QDEC")
    results["plain"] = {"tokens": n, "seconds": secs, "tokens_per_s": n / secs}
    model_dir = Path(args.model_name_or_path)
    qdec = apply_qdec(model, args.qdec, model_dir if model_dir.is_dir() else None)
    if qdec is not None:
        label = f"with QDEC (k_chunk {qdec.k_chunk}, {qdec.residual_bits}-bit residual)"
        n, secs = _generate(model, tokenizer, prompt, max_new, label)
        results["qdec"] = {
            "tokens": n,
            "seconds": secs,
            "tokens_per_s": n / secs,
            "config": qdec.to_dict(),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    def body(argv: list[str]) -> None:
        r = run(argv[0], argv[1:])
        for key, label in (("plain", "without QDEC"), ("qdec", "with QDEC")):
            if key in r:
                print(
                    f"qat generate: {label}: {r[key]['tokens']} tokens in "
                    f"{r[key]['seconds']:.2f} s, {r[key]['tokens_per_s']:.2f} tokens/s"
                )
        if "qdec" in r:
            ratio = r["qdec"]["tokens_per_s"] / r["plain"]["tokens_per_s"]
            print(
                f"qat generate: QDEC speed {ratio:.3f}x of plain (measured one after the "
                "other in this run)"
            )

    return run_cli("generate", USAGE, argv, body)


if __name__ == "__main__":
    sys.exit(main())
