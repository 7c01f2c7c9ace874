"""``qat export``: write a quantised model in its packed form, or for an engine: ``--to
compressed-tensors`` (vLLM) or ``--to gguf`` (llama.cpp). The work is ``qat.export_model``
(``qat.exporting``); this module parses the options and prints.

    qat export recipes/minilm_sst2.yaml --out exported/minilm_w4
    qat export outputs/minilm_sst2 --out exported/minilm_qat
    qat export outputs/llama_nvfp4 --to compressed-tensors --out exported/llama_nvfp4
    qat export outputs/smollm2_q4_0 --to gguf --out exported/smollm2_q4_0
"""

from __future__ import annotations

import sys

from qat.cli.base import run_cli, split_options
from qat.errors import UsageError

USAGE = """usage: qat export RECIPE.yaml|RUN_DIR --out DIR
                  [--to packed|compressed-tensors|gguf] [--overwrite] [--key value ...]

--to packed (default) writes DIR/qat_packed.safetensors (packed codes + scales; float for
unquantised modules), DIR/config.json (model_type qat_packed), DIR/modeling_qat_packed.py and
the tokenizer. Load it with AutoModelForSequenceClassification.from_pretrained(DIR,
trust_remote_code=True) (a decoder, task_name causal_lm / chat: AutoModelForCausalLM, and
model.generate works), or without trust_remote_code after `import qat`.
--to compressed-tensors writes a vLLM checkpoint (model.safetensors, config.json with
quantization_config, tokenizer) for nvfp4 (nvfp4-pack-quantized) or mxfp4 (mxfp4-pack-quantized)
linears, weight-only or with the same format on activations (W4A4); nvfp4 activations get their
input_global_scale from --calibration_samples N (default 32) training chunks of the recipe.
--to gguf writes DIR/model.gguf (llama.cpp) of a Llama-family decoder whose linears are
ggml_q4_0, ggml_q8_0 or mxfp4 (activations null or ggml_q8_0); --gguf_embeddings f16 (default),
q8_0 or f32 for token_embd and an unquantised output; tokenizer from the source GGUF if any.
Every target also writes DIR/qat_export.json (target, quant config, density). DIR must be new
or empty; --overwrite replaces only an earlier qat export (of any target), never anything
else, and DIR can never be, lie inside or contain the source.
--device D  where the model is loaded: cpu, cuda, cuda:N or auto (default)
Recipe keys override the recipe (or the checkpoint's recipe.yaml), e.g. --quant.weight.width 6.
The library function: qat.export_model (qat.exporting)."""


OPTIONS: dict[str, type] = {
    "out": str,
    "to": str,
    "overwrite": bool,
    "device": str,
    "calibration_samples": int,
    "gguf_embeddings": str,
}


def main(argv: list[str] | None = None) -> int:
    def body(argv: list[str]) -> None:
        from qat.exporting import export_model

        opts, overrides = split_options(argv[1:], OPTIONS)
        if not opts.get("out"):
            raise UsageError("--out DIR is required")
        done = export_model(
            argv[0],
            opts["out"],
            to=opts.get("to", "packed"),
            overrides=overrides,
            overwrite=bool(opts.get("overwrite")),
            device=opts.get("device"),
            calibration_samples=opts.get("calibration_samples"),
            gguf_embeddings=opts.get("gguf_embeddings"),
        )
        print(done.density.format(per_layer=False))
        print(
            f"qat export: wrote {done.out} ({done.weights.name}: "
            f"{done.weight_file_bytes / 2**20:.2f} MiB)"
        )

    return run_cli("export", USAGE, argv, body)


if __name__ == "__main__":
    sys.exit(main())
