"""``qat perplexity``: WikiText-2 perplexity of a causal LM under a recipe's quant config.

    qat perplexity recipes/smollm2_sst2.yaml --quant null --max_chunks 4
    qat perplexity outputs/smollm2_wikitext_w4a4       # a run or checkpoint folder (LoRA too)

The recipe's ``task_name`` is irrelevant here; ``lm_head`` stays float through the quant
config's ``exclude`` list. The work is ``qat.perplexity`` (``qat.evaluation.perplexity``).
"""

from __future__ import annotations

import sys

from qat.cli.base import run_cli, split_options

WIKITEXT_ENV = "QAT_WIKITEXT_DIR"  # qat.tasks.language_modeling.WIKITEXT_ENV, without importing it
OPTIONS: dict[str, type] = {
    "max_chunks": int,
    "chunk_size": int,
    "split": str,
    "output": str,
    "device": str,
}
USAGE = f"""usage: qat perplexity RECIPE.yaml|RUN_DIR|MODEL|FILE.gguf [--max_chunks N]
                      [--chunk_size 2048] [--split test] [--output FILE] [--device D]
                      [--key value ...]

WikiText-2 (raw) perplexity of the recipe's model (a causal LM) under its quant config, of
a trained run / checkpoint folder (its quant config, LoRA adapter included), of a model
(Hub id, folder, pkg://; model keys such as --quant apply), or of a GGUF
file run by llama.cpp (`qat export --to gguf`; needs pip install 'qat[llama]'): llama.cpp
tokenises the text and computes the logits, scored by the same formula, so the two agree
when the recipe emulates the engine (activation: {{format: ggml_q8_0}}).
Recipe keys override the recipe as in `qat train` (--quant null for float,
--quant.weight.width 6, ...). ${WIKITEXT_ENV} may point at a folder holding test.txt.
--max_chunks N   evaluate only the first N chunks (quick runs)
--chunk_size T   tokens per chunk (default 2048)
--split S        test (default) or validation
--output FILE    results JSON (default: <output_dir or RUN_DIR>/perplexity.json; beside a
                 GGUF file: <name>.perplexity.json; a model: none)
--device D       cpu, cuda, cuda:N or auto (default: cuda when there is one, cpu with use_cpu)
--qdec.k_chunk K QDEC dynamic error compensation (k_chunk per 1024 inputs; also
                 --qdec.residual_bits B, --qdec.prefill step|token; default token here)
The last line printed reads perplexity=<value>. The library function: qat.perplexity
(qat.evaluation.perplexity)."""


def main(argv: list[str] | None = None) -> int:
    def body(argv: list[str]) -> None:
        from qat.evaluation.perplexity import perplexity

        opts, overrides = split_options(argv[1:], OPTIONS)
        r = perplexity(
            argv[0],
            overrides,
            split=opts.get("split", "test"),
            chunk_size=opts.get("chunk_size", 2048),
            max_chunks=opts.get("max_chunks"),
            output=opts.get("output"),
            device=opts.get("device"),
        )
        wrote = f"; wrote {r['output']}" if r["output"] else ""
        print(
            f"qat perplexity: {r['chunks']} of {r['total_chunks']} chunks of "
            f"{r['chunk_size']} tokens ({r['tokens_scored']} scored), mean loss "
            f"{r['mean_loss']:.4f}{wrote}"
        )
        print(f"perplexity={r['perplexity']:.4f}")

    return run_cli("perplexity", USAGE, argv, body)


if __name__ == "__main__":
    sys.exit(main())
