"""What an engine export (``--to gguf`` for llama.cpp, ``--to compressed-tensors`` for vLLM)
refuses that the packed export carries: the rules both engine targets share."""

from __future__ import annotations

from qat.errors import ExportError


def refuse_rotation(target: str) -> None:
    """An engine export of a model trained with ``quant.rotation``: the engine would not
    rotate the inputs, so it is refused."""
    engine = "llama.cpp" if target == "gguf" else "vLLM"
    raise ExportError(
        f"--to {target}: {engine} does not rotate a layer's input, so a model "
        "trained with quant.rotation cannot run there as trained; train without "
        "rotation for this engine, or export --to packed (which rotates)"
    )
