"""GGUF export (llama.cpp) of a Llama-family decoder: quantised linears as their GGML type.

Quantised linears (``ggml_q4_0`` -> Q4_0, ``ggml_q8_0`` -> Q8_0, ``mxfp4`` -> MXFP4) are written
as llama.cpp blocks built from the format's own codes (``qat.export.ggml_blocks``), so
llama.cpp dequantises exactly ``qat``'s fake-quantised weights. ``token_embd`` and an
unquantised ``output`` are written as ``embeddings`` says (F16, Q8_0 or F32), other unquantised
linears as F16 (F32 with ``embeddings="f32"``), norms as F32.

Names follow llama.cpp's Llama layout (``token_embd``, ``blk.N.attn_q`` ... ``output``). Q and K
rows are permuted from Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved pairs:
per head, row ``j`` of the first half and row ``j`` of the second half become rows ``2j`` and
``2j + 1``. Blocks run along a row (the reduction dim), so permuting rows of the quantised
blocks is exact. Metadata: the hyper-parameters from the model config; the tokenizer (and any
other key the writer does not set) from the source GGUF file if there is one, else from the
Hugging Face tokenizer (BPE -> ``gpt2`` with merges, WordPiece -> ``bert``).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from torch import Tensor

from qat.errors import ExportError
from qat.export.engines import refuse_rotation
from qat.export.ggml_blocks import GGMLTypeError, ggml_block_bytes, ggml_type_name
from qat.formats import Format, make_format
from qat.quant.config import FLOAT
from qat.quant.modules import QuantLinear

GGUF_ARCHS = {"LlamaForCausalLM": "llama"}
EMBEDDING_TYPES = ("f16", "q8_0", "f32")
GGUF_NAME = "model.gguf"
_LINEARS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def check_gguf_arch(config: Any) -> str:
    """The GGUF architecture of a model config, or ExportError naming the ones known."""
    archs = list(getattr(config, "architectures", None) or [])
    known = [a for a in archs if a in GGUF_ARCHS]
    if not known and getattr(config, "model_type", None) == "llama":
        known = ["LlamaForCausalLM"]
    if not known:
        raise ExportError(
            f"--to gguf: architecture {archs or config.model_type!r} is not one "
            f"the GGUF writer knows; known: {', '.join(GGUF_ARCHS)}"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ExportError("--to gguf: the GGUF writer knows Llama without linear biases")
    _check_rope(config)
    return GGUF_ARCHS[known[0]]


def rope_theta(config: Any) -> float:
    """RoPE base: ``rope_parameters`` (transformers >= 5) or the older ``rope_theta``."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(10000.0 if theta is None else theta)


def _check_rope(config: Any) -> None:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    kind = (params or {}).get("rope_type", (params or {}).get("type", "default"))
    if kind not in ("default", None):
        raise ExportError(
            f"--to gguf: RoPE scaling {kind!r} is not written by the GGUF writer (plain RoPE only)"
        )


def check_gguf_formats(weight: Format | None, activation: Format | None, matmul: bool) -> None:
    """Refuse formats llama.cpp cannot hold or run (before any heavy work)."""
    try:
        kind = ggml_type_name(weight, "weight format")
    except GGMLTypeError as e:
        raise ExportError(f"--to gguf: {e}") from None
    if activation is not None and activation.name != "ggml_q8_0":
        raise ExportError(
            f"--to gguf: llama.cpp quantises the input of a {kind}"
            f" matmul to Q8_0 blocks, not activation format {activation}; set "
            "quant.activation to {format: ggml_q8_0} (to train with it) or null"
        )
    if matmul:
        raise ExportError(
            "--to gguf: llama.cpp runs attention (QK^T, PV) in F16/F32; "
            "quant.matmul cannot be exported: set quant.matmul to null"
        )


def check_target(quant: Any, config: Any, head: str) -> None:
    """What llama.cpp runs, checked before the model loads: a decoder of a Llama-family
    architecture (``config``; for a GGUF source, its architecture key) whose every quantised
    module has a GGML type (``quant``: its base formats and each override's; null: a float
    export with F16 linears, the baseline an engine compares against)."""
    if head != "causal_lm":
        raise ExportError(f"--to gguf writes decoders; this source builds a {head} model")
    check_gguf_arch(config)
    if quant is None:
        return
    if quant.is_rotated():
        refuse_rotation("gguf")
    for formats in quant.all_formats():
        if formats != FLOAT:
            check_gguf_formats(formats.weight, formats.activation, formats.matmul is not None)


def source_config(path: str | Path) -> Any:
    """What ``check_target`` reads of a GGUF source without loading it: its architecture
    (transformers builds a Llama from a ``llama`` GGUF)."""
    import gguf

    arch = gguf.GGUFReader(str(path)).fields["general.architecture"].contents()
    return SimpleNamespace(model_type=arch, architectures=[])


def rope_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Rows ``[n_head * head_dim, ...]`` from rotate-half order to interleaved pairs."""
    head_dim = rows.shape[0] // n_head
    r = rows.reshape(n_head, 2, head_dim // 2, *rows.shape[1:])
    return np.swapaxes(r, 1, 2).reshape(rows.shape)


def _float(t: Tensor, kind: str) -> tuple[np.ndarray, Any]:
    """A float tensor as (array, raw GGML type or None for the array's own dtype)."""
    a = t.detach().float().cpu().numpy()
    return (a.astype(np.float32) if kind == "f32" else a.astype(np.float16)), None


def _tensor(module: Any, weight: Tensor, kind: str, what: str) -> tuple[np.ndarray, Any]:
    """(array, raw_dtype) of a weight: GGML blocks if quantised by a GGML format, else float or
    Q8_0 as ``kind`` says."""
    import gguf

    wq = getattr(module, "weight_quantizer", None)
    fmt = None if wq is None else wq.fmt
    if fmt is None and kind == "q8_0":
        fmt = make_format({"format": "ggml_q8_0"})
    if fmt is None:
        return _float(weight, kind)
    if weight.shape[-1] % 32:
        raise ExportError(
            f"--to gguf: {what}'s reduction dim {weight.shape[-1]} is not a "
            "multiple of the GGML block (32)"
        )
    data = ggml_block_bytes(fmt, weight)
    return data, getattr(gguf.GGMLQuantizationType, ggml_type_name(fmt))


def _hparams(writer: Any, config: Any, n_tensors_type: int) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(n_tensors_type)


def _source_fields(path: Path) -> list[Any]:
    """The source GGUF's tokenizer fields (ReaderField objects)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return [f for name, f in reader.fields.items() if name.startswith("tokenizer.")]


def _copy_field(writer: Any, field: Any) -> None:
    import gguf

    vtype = field.types[0]
    if vtype == gguf.GGUFValueType.ARRAY:  # element types follow the Python values' types
        writer.add_array(field.name, [field.contents(i) for i in range(len(field.data))])
    else:
        writer.add_key_value(field.name, field.contents(), vtype)


def _hf_tokenizer(writer: Any, tokenizer: Any, config: Any) -> None:
    """Tokenizer metadata from a Hugging Face (fast) tokenizer (BOS/EOS from the model config
    where the tokenizer has none, as a WordPiece one)."""
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]["type"]
    vocab = tokenizer.get_vocab()
    tokens = [""] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    special = set(tokenizer.all_special_ids)
    types = [
        gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
        for i in range(len(tokens))
    ]
    if model == "BPE":
        writer.add_tokenizer_model("gpt2")
        merges = state["model"].get("merges", [])
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    elif model == "WordPiece":
        writer.add_tokenizer_model("bert")
    else:
        raise ExportError(
            f"--to gguf: a {model} Hugging Face tokenizer is not supported here "
            "(BPE and WordPiece are); export from a GGUF source instead"
        )
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0]
    for key, tid in (
        ("bos", bos),
        ("eos", eos),
        ("unk", tokenizer.unk_token_id),
        ("sep", tokenizer.sep_token_id),
        ("pad", tokenizer.pad_token_id),
    ):
        if tid is not None:
            getattr(writer, f"add_{key}_token_id")(tid)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def gguf_tensors(model: Any, embeddings: str = "f16") -> list[tuple[str, np.ndarray, Any]]:
    """(GGUF name, array, raw GGML type or None) of every tensor llama.cpp's Llama loader reads."""
    config = model.config
    n_head = config.num_attention_heads
    n_kv = config.num_key_value_heads or n_head
    base = model.model
    other = "f32" if embeddings == "f32" else "f16"
    out: list[tuple[str, np.ndarray, Any]] = []
    out.append(
        ("token_embd.weight", *_tensor(None, base.embed_tokens.weight, embeddings, "token_embd"))
    )
    for i, layer in enumerate(base.layers):
        for hf, name in _NORMS.items():
            out.append(
                (
                    f"blk.{i}.{name}.weight",
                    getattr(layer, hf).weight.detach().float().cpu().numpy(),
                    None,
                )
            )
        for hf, name in _LINEARS.items():
            mod = layer.get_submodule(hf)
            arr, raw = _tensor(mod, mod.weight, other, f"layers.{i}.{hf}")
            if name in ("attn_q", "attn_k"):
                arr = rope_permute(arr, n_head if name == "attn_q" else n_kv)
            out.append((f"blk.{i}.{name}.weight", arr, raw))
    out.append(("output_norm.weight", base.norm.weight.detach().float().cpu().numpy(), None))
    # llama.cpp computes the logits with token_embd when the file has no output.weight: right
    # for a float head tied to the embeddings, wrong for a quantised one (written untied)
    tied = model.lm_head.weight is base.embed_tokens.weight
    if not tied or getattr(model.lm_head, "weight_quantizer", None) is not None:
        out.append(
            ("output.weight", *_tensor(model.lm_head, model.lm_head.weight, embeddings, "lm_head"))
        )
    return out


def write_gguf(
    model: Any,
    folder: str | Path,
    tokenizer: Any = None,
    *,
    source_gguf: str | Path | None = None,
    embeddings: str = "f16",
    name: str | None = None,
) -> Path:
    """Write ``model`` (a Llama-family decoder, quantised or wholly float; ``check_target``
    passed, as ``qat.export_model`` checks it) as ``folder/model.gguf``; a float model's
    linears are F16 (F32 with ``embeddings="f32"``). ``qat.export_model`` gives a temporary
    folder and renames it once written."""
    import gguf

    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    arch = GGUF_ARCHS[type(model).__name__]
    quantised = [
        m for m in model.modules() if isinstance(m, QuantLinear) and m.weight_quantizer is not None
    ]
    tensors = gguf_tensors(model, embeddings)  # shapes checked before anything is written
    kinds = {ggml_type_name(m.weight_quantizer.fmt) for m in quantised}
    if not kinds:  # quant: null, every linear float
        kinds = {"F32" if embeddings == "f32" else "F16"}
    file_type = {
        "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "MXFP4": gguf.LlamaFileType.MOSTLY_MXFP4_MOE,
        "F16": gguf.LlamaFileType.MOSTLY_F16,
        "F32": gguf.LlamaFileType.ALL_F32,
    }[sorted(kinds)[0]]

    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(folder / GGUF_NAME), arch)
    writer.add_name(name or getattr(model.config, "_name_or_path", "") or "qat-export")
    _hparams(writer, model.config, int(file_type))
    if source_gguf is not None:
        for field in _source_fields(Path(source_gguf)):
            _copy_field(writer, field)
    elif tokenizer is not None:
        _hf_tokenizer(writer, tokenizer, model.config)
    for tname, arr, raw in tensors:
        writer.add_tensor(tname, arr, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return folder
