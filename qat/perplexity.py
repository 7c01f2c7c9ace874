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
OPTIONS: dict[str, type] = {"max_chunks": int, "chunk_size": int, "split": str, "output": str,
                            "device": str}
USAGE = f"""usage: qat perplexity RECIPE.yaml [--max_chunks N] [--chunk_size 2048] [--split test]
                      [--output FILE] [--device D] [--key value ...]

WikiText-2 (raw) perplexity of the recipe's model (a causal LM) under its quant config.
Recipe keys override the recipe as in `qat train` (--quant null for float,
--quant.weight.width 6, ...). ${WIKITEXT_ENV} may point at a folder holding test.txt.
--max_chunks N   evaluate only the first N chunks (quick runs)
--chunk_size T   tokens per chunk (default 2048)
--split S        test (default) or validation
--output FILE    results JSON (default: <output_dir>/perplexity.json)
--device D       cpu, cuda, cuda:N or auto (default: cuda when there is one, cpu with use_cpu)
--qdec.k_chunk K QDEC dynamic error compensation (k_chunk per 1024 inputs; also
                 --qdec.residual_bits B, --qdec.prefill step|token; default token here)
The last line printed reads perplexity=<value>."""


def load_wikitext(split: str = "test") -> str:
    """The raw WikiText-2 split as one string (local folder or the Hub)."""
    if split not in ("test", "validation", "train"):
        raise CommandError(f"--split must be test, validation or train; got {split!r}")
    path = wikitext_path(split)
    if path is not None:
        raw = path.read_bytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise CommandError(f"{str(path)!r} line {line}: not valid UTF-8 (byte "
                               f"0x{raw[e.start]:02x})") from None
    try:
        from datasets import load_dataset

        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    except Exception as e:  # noqa: BLE001 - any Hub failure gets the same advice
        raise CommandError(f"could not load wikitext/wikitext-2-raw-v1 from the Hub ({e}); "
                           f"set {WIKITEXT_ENV} to a folder holding {split}.txt") from None
    return "".join(ds["text"])


def wikitext_path(split: str) -> Path | None:
    """``$QAT_WIKITEXT_DIR/<split>.txt``, checked (None: no folder set, use the Hub)."""
    root = os.environ.get(WIKITEXT_ENV)
    if not root:
        return None
    folder = Path(root).expanduser()
    if folder.exists() and not folder.is_dir():
        raise CommandError(f"{WIKITEXT_ENV}={root!r} is a file, expected a folder holding "
                           f"{split}.txt")
    path = folder / f"{split}.txt"
    if path.is_dir():
        raise CommandError(f"{WIKITEXT_ENV}={root!r}: {split}.txt is a directory, expected the "
                           "raw text file")
    if not path.is_file():
        raise CommandError(f"{WIKITEXT_ENV}={root!r} holds no {split}.txt")
    return path


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

    model.eval()
    device = next(model.parameters()).device
    # The loss sum stays on the device (float64) so no chunk waits for the host (hence no
    # running perplexity on the bar; the result line gives it).
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with torch.no_grad():
        bar = tqdm(chunks, desc="perplexity", unit="chunk")
        for chunk in bar:
            ids = chunk.unsqueeze(0).to(device, non_blocking=True)
            logits = model(input_ids=ids).logits[0, :-1].float()
            total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").double()
            count += ids.shape[1] - 1
    mean = float(total) / count
    return math.exp(mean), mean, count


def check_chunk_size(config: Any, chunk_size: int, name: str) -> None:
    """A chunk longer than the model's positions would fail (or read garbage) mid-run."""
    from qat.models import position_limit

    limit = position_limit(config)
    if limit is not None and chunk_size > limit:
        raise CommandError(f"--chunk_size {chunk_size} is beyond the position limit of model "
                           f"{name!r} ({limit} positions); pass --chunk_size {limit} or less")


def load_lm(args: Any, chunk_size: int = 2):
    """Config checks first (cheap), then the causal LM and its tokenizer."""
    from qat.models import load_causal_lm, load_config, load_tokenizer

    # reading a GGUF's config costs as much as its tokenizer: load_config returns None, check
    # the loaded model's config instead
    config = load_config(args.model_name_or_path, args.gguf_file)
    if config is not None:
        check_causal(config, args.model_name_or_path)
        check_chunk_size(config, chunk_size, args.model_name_or_path)
    tok_name = args.tokenizer_name_or_path or args.model_name_or_path
    tokenizer = load_tokenizer(tok_name, None if args.tokenizer_name_or_path else args.gguf_file)
    model = load_causal_lm(args.model_name_or_path, args.gguf_file, args.torch_dtype)
    check_causal(model.config, args.model_name_or_path)
    check_chunk_size(model.config, chunk_size, args.model_name_or_path)
    return model, tokenizer


def run(path: str, argv: list[str]) -> dict[str, Any]:
    from qat import models
    from qat.density import density_report
    from qat.eval_cmd import check_output_file
    from qat.quantize import quantize_model
    from qat.recipe import load_recipe

    opts, overrides = split_options(argv, OPTIONS)
    chunk_size = opts.get("chunk_size", 2048)
    if chunk_size < 2:
        raise CommandError(f"--chunk_size must be >= 2, got {chunk_size}")
    if opts.get("max_chunks") is not None and opts["max_chunks"] < 1:
        raise CommandError(f"--max_chunks must be >= 1, got {opts['max_chunks']}")
    if opts.get("output"):
        check_output_file(opts["output"])
    recipe = load_recipe(path, overrides)
    args = recipe.args
    from qat.qdec import check_quant_for_qdec

    check_quant_for_qdec(args.quant, args.qdec)
    out = Path(opts["output"]) if opts.get("output") else Path(
        recipe.training_args.output_dir) / "perplexity.json"
    check_output_file(out)
    device = models.resolve_device(opts.get("device"), recipe.training_args.use_cpu)
    text = load_wikitext(opts.get("split", "test"))
    model, tokenizer = load_lm(args, chunk_size)
    if args.quant is not None:
        quantize_model(model, args.quant)
    model.to(device)
    qdec = _apply_qdec(model, args)
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0].to(device)
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
        "qdec": None if qdec is None else {**qdec.to_dict(), "prefill": qdec.prefill or "token"},
    }
    return write_results(results, out)


def _apply_qdec(model: Any, args: Any) -> Any:
    """QDEC from the recipe's ``qdec`` section or saved beside the model; scored per token
    (``prefill: token``) unless the section says otherwise, so the perplexity is the one
    token-by-token decoding would give."""
    from qat.qdec import apply_qdec, set_default_prefill

    src = Path(args.model_name_or_path)
    qdec = apply_qdec(model, args.qdec, src if src.is_dir() else None)
    if qdec is not None:
        set_default_prefill(model, "token")
    return qdec


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
