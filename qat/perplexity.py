"""``qat perplexity``: WikiText-2 perplexity of a causal LM under a recipe's quant config.

    qat perplexity recipes/smollm2_sst2.yaml --quant null --max_chunks 4

The raw split is joined, tokenised once and cut into non-overlapping chunks of
``chunk_size`` tokens (the ragged tail is dropped); PPL = exp(mean token loss) over every
predicted token of every chunk (docs/formats.md, reference protocol). The text comes from the Hub
(``wikitext`` / ``wikitext-2-raw-v1``) unless ``$QAT_WIKITEXT_DIR`` names a folder holding
``<split>.txt``. The recipe's ``task_name`` is irrelevant here; ``lm_head`` stays float
through the quant config's ``exclude`` list.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

from qat.eval_cmd import CommandError, run_cli, split_options, write_results

WIKITEXT_ENV = "QAT_WIKITEXT_DIR"
OPTIONS: dict[str, type] = {"max_chunks": int, "chunk_size": int, "split": str, "output": str}
USAGE = f"""usage: qat perplexity RECIPE.yaml [--max_chunks N] [--chunk_size 2048] [--split test]
                      [--output FILE] [--key value ...]

WikiText-2 (raw) perplexity of the recipe's model (a causal LM) under its quant config.
Recipe keys override the recipe as in `qat train` (--quant null for float,
--quant.weight.width 6, ...). ${WIKITEXT_ENV} may point at a folder holding test.txt.
--max_chunks N   evaluate only the first N chunks (quick runs)
--chunk_size T   tokens per chunk (default 2048)
--split S        test (default) or validation
--output FILE    results JSON (default: <output_dir>/perplexity.json)
The last line printed reads perplexity=<value>."""


def load_wikitext(split: str = "test") -> str:
    """The raw WikiText-2 split as one string (local folder or the Hub)."""
    if split not in ("test", "validation", "train"):
        raise CommandError(f"--split must be test, validation or train; got {split!r}")
    root = os.environ.get(WIKITEXT_ENV)
    if root:
        path = Path(root).expanduser() / f"{split}.txt"
        if not path.is_file():
            raise CommandError(f"{WIKITEXT_ENV}={root!r} holds no {split}.txt")
        return path.read_text(encoding="utf-8")
    try:
        from datasets import load_dataset

        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    except Exception as e:  # noqa: BLE001 - any Hub failure gets the same advice
        raise CommandError(f"could not load wikitext/wikitext-2-raw-v1 from the Hub ({e}); "
                           f"set {WIKITEXT_ENV} to a folder holding {split}.txt") from None
    return "".join(ds["text"])


def check_causal(config: Any, name: str) -> None:
    """Refuse encoders (BERT & co.) with a clear message: perplexity needs a decoder."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mtype = getattr(config, "model_type", None)
    causal = mtype in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        getattr(config, "is_decoder", False)
        or mtype not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    if not causal or getattr(config, "is_encoder_decoder", False):
        raise CommandError(f"model {name!r} is a {mtype!r} model, not a causal (decoder-only) "
                           "language model; perplexity needs one such as Llama, OPT or GPT-2")


def chunk_ids(ids: Any, chunk_size: int, max_chunks: int | None) -> list[Any]:
    """Non-overlapping ``chunk_size`` slices of a 1-D id tensor; the ragged tail is dropped."""
    if chunk_size < 2:
        raise CommandError(f"--chunk_size must be >= 2, got {chunk_size}")
    n = ids.numel() // chunk_size
    if max_chunks is not None:
        if max_chunks < 1:
            raise CommandError(f"--max_chunks must be >= 1, got {max_chunks}")
        n = min(n, max_chunks)
    if n == 0:
        raise CommandError(f"the text has {ids.numel()} tokens, fewer than one chunk of "
                           f"{chunk_size}")
    return [ids[i * chunk_size:(i + 1) * chunk_size] for i in range(n)]


def perplexity(model: Any, chunks: list[Any]) -> tuple[float, float, int]:
    """``(ppl, mean token loss, tokens scored)`` over ``chunks`` (each predicts len-1 tokens)."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        bar = tqdm(chunks, desc="perplexity", unit="chunk")
        for chunk in bar:
            ids = chunk.unsqueeze(0)
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll = F.cross_entropy(logits, ids[0, 1:], reduction="sum")
            total += float(nll)
            count += ids.shape[1] - 1
            bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
    mean = total / count
    return math.exp(mean), mean, count


def load_lm(args: Any):
    """Config check first (cheap), then the causal LM and its tokenizer."""
    from transformers import AutoConfig

    from qat.models import _from_pretrained, load_causal_lm, load_tokenizer

    if not args.gguf_file:  # reading a GGUF's config costs as much as its tokenizer: check later
        config = _from_pretrained(AutoConfig, args.model_name_or_path, "config")
        check_causal(config, args.model_name_or_path)
    tok_name = args.tokenizer_name_or_path or args.model_name_or_path
    tokenizer = load_tokenizer(tok_name, None if args.tokenizer_name_or_path else args.gguf_file)
    model = load_causal_lm(args.model_name_or_path, args.gguf_file, args.torch_dtype)
    check_causal(model.config, args.model_name_or_path)
    return model, tokenizer


def run(path: str, argv: list[str]) -> dict[str, Any]:
    from qat.density import density_report
    from qat.quantize import quantize_model
    from qat.recipe import load_recipe

    opts, overrides = split_options(argv, OPTIONS)
    recipe = load_recipe(path, overrides)
    args = recipe.args
    chunk_size = opts.get("chunk_size", 2048)
    text = load_wikitext(opts.get("split", "test"))
    model, tokenizer = load_lm(args)
    if args.quant is not None:
        quantize_model(model, args.quant)
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0]
    chunks = chunk_ids(ids, chunk_size, opts.get("max_chunks"))
    ppl, loss, count = perplexity(model, chunks)
    density = density_report(model)
    results = {
        "model_name_or_path": args.model_name_or_path, "gguf_file": args.gguf_file,
        "quant": None if args.quant is None else args.quant.to_dict(),
        "split": opts.get("split", "test"), "chunk_size": chunk_size, "chunks": len(chunks),
        "total_chunks": ids.numel() // chunk_size, "tokens_scored": count,
        "mean_loss": loss, "perplexity": ppl,
        "bits_per_element": density.quantized_bits_per_element or None,
    }
    out = Path(opts["output"]) if opts.get("output") else Path(
        recipe.training_args.output_dir) / "perplexity.json"
    return write_results(results, out)


def main(argv: list[str] | None = None) -> int:
    def body(argv: list[str]) -> None:
        r = run(argv[0], argv[1:])
        print(f"qat perplexity: {r['chunks']} of {r['total_chunks']} chunks of "
              f"{r['chunk_size']} tokens ({r['tokens_scored']} scored), mean loss "
              f"{r['mean_loss']:.4f}; wrote {r['output']}")
        print(f"perplexity={r['perplexity']:.4f}")

    return run_cli("perplexity", USAGE, argv, body)


if __name__ == "__main__":
    sys.exit(main())
