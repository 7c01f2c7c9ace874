"""``qat generate``: greedy text generation from a recipe's (quantised) causal LM, streamed.

    qat generate recipes/smollm2_sst2.yaml --prompt "The tower is" --qdec.k_chunk 32

The model loads as in ``qat perplexity`` (recipe or run folder; quantised by its ``quant``
section). With QDEC (``--qdec.*`` options, a recipe ``qdec:`` section, or residuals saved
beside the model by ``qat.quant.qdec.files.save_qdec``) the prompt is generated twice, without
and with QDEC, and both speeds are printed (tokens/s over the new tokens, prefill included).
"""

from __future__ import annotations

import sys

from qat.cli.base import run_cli, split_options

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
--device D           cpu, cuda, cuda:N or auto (default: cuda when there is one)
The library function: qat.generate (qat.evaluation.generate)."""


def main(argv: list[str] | None = None) -> int:
    def body(argv: list[str]) -> None:
        from qat.evaluation.generate import generate

        opts, overrides = split_options(argv[1:], OPTIONS)
        r = generate(
            argv[0],
            opts.get("prompt", ""),
            overrides,
            max_new_tokens=opts.get("max_new_tokens", 64),
            device=opts.get("device"),
            stream=sys.stdout,
        )
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
