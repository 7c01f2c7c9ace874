"""``compressed-tensors`` export: nvfp4 / mxfp4 linears as vLLM's ``nvfp4-pack-quantized`` and
``mxfp4-pack-quantized`` checkpoints.

Per quantised linear ``NAME`` (weight ``[out, in]``, blocks along ``in``):

- ``NAME.weight_packed``: uint8 ``[out, in / 2]``, two E2M1 codes per byte (element ``2j`` in
  the low nibble, ``2j + 1`` in the high one; sign in bit 3; zero written as +0);
- ``NAME.weight_scale``: nvfp4 the E4M3 block scales (float8_e4m3fn ``[out, in / 16]``),
  mxfp4 the E8M0 exponents (uint8 ``[out, in / 32]``, ``2^(e - 127)``);
- nvfp4 only: ``NAME.weight_global_scale`` (float32 ``[1]``, compressed-tensors' ``g``: the
  value is ``e2m1 * scale / g``) and, with nvfp4 activations, ``NAME.input_global_scale``
  (float32 ``[1]``, ``2688 / amax`` of the inputs seen in calibration).

Everything else (embeddings, norms, ``lm_head``, unquantised linears) is written in bfloat16,
the dtype compressed-tensors decompresses the fp4 weights to (a float32 model is cast, with a
warning); ``config.json`` is the model's config (dtype bfloat16) plus ``quantization_config``
(one config group, targets ``Linear``, the unquantised linears under ``ignore``). The codes and
scales are the format's own (``Format.encode``), so the weights vLLM decompresses are
``qat``'s fake-quantised weights bit for bit in bfloat16 (mxfp4's exactly: its values need 2
mantissa bits).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qat.errors import ExportError
from qat.export.engines import refuse_rotation
from qat.formats import Format
from qat.quant.config import FLOAT
from qat.quant.modules import QuantConv1D, QuantLinear

CT_FORMATS = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}
CT_BLOCKS = {"nvfp4": 16, "mxfp4": 32}  # the block each scheme stores a scale for
# compressed-tensors decompresses fp4 weights to bfloat16 (and vLLM runs these schemes in it):
# the rest of the checkpoint is written in the same dtype, or transformers' default loader
# fails at the first matmul of a float32 model (float != BFloat16)
ENGINE_DTYPE = torch.bfloat16
logger = logging.getLogger(__name__)
WEIGHTS_NAME = "model.safetensors"


def _args(fmt: Format, activation: bool) -> dict[str, Any]:
    """compressed-tensors ``QuantizationArgs`` (as config.json holds them) for ``fmt``."""
    if fmt.name == "nvfp4":
        return {
            "num_bits": 4,
            "type": "float",
            "symmetric": True,
            "group_size": 16,
            "strategy": "tensor_group",
            "dynamic": "local" if activation else False,
            "scale_dtype": "torch.float8_e4m3fn",
        }
    return {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "group_size": 32,
        "strategy": "group",
        "dynamic": activation,
        "scale_dtype": "torch.uint8",
    }


def check_ct_format(weight: Format | None, activation: Format | None, matmul: bool) -> str:
    """The compressed-tensors format name for this weight/activation pair, or ExportError
    (raised before any heavy work) saying what the engine runs instead."""
    if (
        weight is None
        or weight.name not in CT_FORMATS
        or getattr(weight, "block_size", 0) != CT_BLOCKS[weight.name]
    ):
        got = "no weight format" if weight is None else f"weight format {weight}"
        raise ExportError(
            f"--to compressed-tensors: {got} has no compressed-tensors type; "
            "formats with one: nvfp4 (nvfp4-pack-quantized), mxfp4 with "
            "block_size 32 (mxfp4-pack-quantized)"
        )
    if activation is not None and (
        activation.name != weight.name
        or getattr(activation, "block_size", 0) != CT_BLOCKS[weight.name]
    ):
        # the pair is the scheme's (format and block); a weight's scale rule is its own: its
        # codes are stored, however their scales were chosen
        raise ExportError(
            f"--to compressed-tensors: vLLM runs {weight.name} weights with "
            f"{weight.name} activations (W4A4) or float ones (W4A16), not "
            f"activation format {activation}; set quant.activation to "
            f"{{format: {weight.name}}} or null"
        )
    if getattr(activation, "scale", "max") != "max":
        # an input is quantised by the engine at run time, with its own (max) scale rule
        raise ExportError(
            "--to compressed-tensors: vLLM quantises a layer's input with the max scale "
            f"rule, not activation format {activation}; drop scale from quant.activation"
        )
    if matmul:
        raise ExportError(
            "--to compressed-tensors: vLLM runs attention (QK^T, PV) in float; "
            "quant.matmul cannot be exported: set quant.matmul to null"
        )
    return CT_FORMATS[weight.name]


def check_target(quant: Any, config: Any, head: str) -> None:
    """What vLLM runs, checked before the model loads: every quantised module's formats have a
    compressed-tensors scheme (``quant``: its base formats and each override's); nvfp4
    activations are calibrated on a decoder recipe's text. ``config``: any model."""
    if quant is None:
        raise ExportError("--to compressed-tensors: the model is not quantised (quant: null)")
    if quant.is_rotated():
        refuse_rotation("compressed-tensors")
    for formats in quant.all_formats():
        if formats == FLOAT:
            continue
        check_ct_format(formats.weight, formats.activation, formats.matmul is not None)
        if needs_calibration(formats.activation) and head != "causal_lm":
            raise ExportError(
                "--to compressed-tensors: nvfp4 activations are calibrated on a "
                f"decoder recipe's text; this source builds a {head} model"
            )


def needs_calibration(activation: Format | None) -> bool:
    """nvfp4 inputs need a calibrated global scale (vLLM reads a static one)."""
    return activation is not None and activation.name == "nvfp4"


def _quantised_linears(model: torch.nn.Module) -> tuple[list[tuple[str, Any]], list[str]]:
    """(quantised QuantLinears, names of the other Linear-like modules: the ignore list)."""

    quantised, ignore = [], []
    for name, m in model.named_modules():
        if isinstance(m, QuantConv1D):
            raise ExportError(
                f"--to compressed-tensors: {name} is a GPT-2 Conv1D; vLLM's "
                "loader expects Linear layers"
            )
        if isinstance(m, QuantLinear) and m.weight_quantizer is not None:
            quantised.append((name, m))
        elif isinstance(m, torch.nn.Linear):
            ignore.append(name)
    return quantised, ignore


def check_model(model: torch.nn.Module) -> tuple[str, Format, Format | None]:
    """(compressed-tensors format, weight format, activation format) of a quantised model
    (formats checked by ``check_target``): one weight/activation pair for every quantised
    linear, each reduction dim a whole number of blocks, or ExportError."""
    quantised, _ = _quantised_linears(model)
    if not quantised:
        raise ExportError("--to compressed-tensors: the model has no quantised linear layer")
    pairs = {
        (
            m.weight_quantizer.fmt,
            None if m.activation_quantizer is None else m.activation_quantizer.fmt,
        )
        for _, m in quantised
    }
    if len(pairs) > 1:
        raise ExportError(
            "--to compressed-tensors writes one scheme for every quantised "
            f"linear; this model mixes {sorted(map(str, pairs))}"
        )
    ((weight, act),) = pairs
    for name, m in quantised:
        if m.weight.shape[1] % CT_BLOCKS[weight.name]:
            raise ExportError(
                f"--to compressed-tensors: {name}'s reduction dim "
                f"{m.weight.shape[1]} is not a multiple of the {weight.name} "
                "block"
            )
    return CT_FORMATS[weight.name], weight, act


def _pack_e2m1(codes: Tensor, rows: int) -> Tensor:
    """4-bit sign-magnitude E2M1 codes -> uint8 ``[rows, n / 2]`` (low nibble first)."""
    c = codes.reshape(rows, -1).to(torch.int64)
    c = torch.where(c & 7 == 0, 0, c)  # one code for zero
    return (c[:, 0::2] | (c[:, 1::2] << 4)).to(torch.uint8)


def ct_weight_tensors(fmt: Format, weight: Tensor) -> dict[str, Tensor]:
    """``weight_packed``, ``weight_scale`` (+ ``weight_global_scale``) of ``weight``."""
    rows = weight.shape[0]
    enc = fmt.encode(weight.detach().float().cpu(), dim=-1)
    if not torch.isfinite(enc.nonfinite).all():
        raise ExportError(f"{fmt.name}: the weight holds NaN or inf, which codes cannot store")
    out = {"weight_packed": _pack_e2m1(enc.codes, rows)}
    if fmt.name == "nvfp4":
        out["weight_scale"] = enc.scales.reshape(rows, -1).to(torch.float8_e4m3fn)
        out["weight_global_scale"] = enc.extra["global_scale"].reshape(1).float()
    else:
        out["weight_scale"] = (enc.scales.reshape(rows, -1) + 127).to(torch.uint8)
    return out


def quantization_config(
    ct_format: str, weight: Format, act: Format | None, ignore: list[str]
) -> dict[str, Any]:
    """The ``quantization_config`` entry of config.json."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("compressed-tensors")
    except importlib.metadata.PackageNotFoundError:
        version = "0.20.1"  # the version this layout was written against
    return {
        "quant_method": "compressed-tensors",
        "format": ct_format,
        "version": version,
        "quantization_status": "compressed",
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
        "global_compression_ratio": None,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": _args(weight, False),
                "input_activations": None if act is None else _args(act, True),
                "output_activations": None,
                "format": ct_format,
            }
        },
    }


def write_compressed_tensors(
    model: torch.nn.Module,
    folder: str | Path,
    tokenizer: Any = None,
    *,
    input_amax: Mapping[str, float] | None = None,
) -> Path:
    """Write ``model`` (quantised with nvfp4 or mxfp4 linears; ``check_target`` passed, as
    ``qat.export_model`` checks it) as a compressed-tensors checkpoint into ``folder``.
    ``input_amax`` (max |input| per quantised linear, from calibration) is needed for nvfp4
    activations, whose global scale vLLM reads from the checkpoint. ``qat.export_model``
    gives a temporary folder and renames it once written."""
    from safetensors.torch import save_file

    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    ct_format, weight, act = check_model(model)
    quantised, ignore = _quantised_linears(model)
    if needs_calibration(act):
        missing = [n for n, _ in quantised if n not in (input_amax or {})]
        if missing:
            raise ExportError(
                f"--to compressed-tensors: nvfp4 activations need a calibrated "
                f"input_global_scale; no input range for {missing[0]}"
            )
    state = {k: v for k, v in model.state_dict().items()}
    tensors: dict[str, Tensor] = {}
    for name, m in quantised:
        del state[f"{name}.weight"]
        for key, t in ct_weight_tensors(weight, m.weight).items():
            tensors[f"{name}.{key}"] = t
        if needs_calibration(act):
            amax = max(float(input_amax[name]), float(np.finfo(np.float32).tiny))
            g = np.float32(448.0 * 6.0) / np.float32(amax)
            tensors[f"{name}.input_global_scale"] = torch.tensor(
                [g if np.isfinite(g) else 1.0], dtype=torch.float32
            )
    seen: set[tuple[int, int]] = set()
    for key, t in state.items():  # tied weights (lm_head = embeddings) are written once
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        tensors[key] = (
            t.detach().cpu().to(ENGINE_DTYPE if t.is_floating_point() else t.dtype).contiguous()
        )
    if any(t.is_floating_point() and t.dtype != ENGINE_DTYPE for t in state.values()):
        logger.warning(
            "compressed-tensors export: the model's float tensors (embeddings, norms, "
            "unquantised linears) are written as bfloat16, the dtype the engine runs"
        )
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    for key in ("dtype", "torch_dtype"):  # transformers >= 5 writes dtype, older torch_dtype
        if key in config or key == "dtype":
            config[key] = "bfloat16"
    config["architectures"] = [type(model).__name__]
    config["quantization_config"] = quantization_config(ct_format, weight, act, ignore)
    head = model.get_output_embeddings()
    if config.get("tie_word_embeddings") and any(m is head for _, m in quantised):
        # a quantised head is its own packed tensor; tied, vLLM's loader skips lm_head.*
        config["tie_word_embeddings"] = False

    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


@torch.no_grad()
def record_input_amax(model: torch.nn.Module, batches: list[dict[str, Tensor]]) -> dict[str, float]:
    """max |input| of every quantised linear over ``batches`` (the float input, before any
    activation quantiser: what the engine's quantiser sees), for nvfp4's input global scale."""
    quantised, _ = _quantised_linears(model)
    amax: dict[str, float] = {}

    def hook(name: str):
        def record(_m: torch.nn.Module, args: tuple[Tensor, ...]) -> None:
            v = float(args[0].detach().abs().amax())
            amax[name] = max(amax.get(name, 0.0), v)

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in quantised]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(**batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return amax
