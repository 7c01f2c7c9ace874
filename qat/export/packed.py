"""Packed export: a quantised model written as its formats' integer codes (safetensors +
config.json).

Each quantised linear's weight is stored as its format's integer codes, bit-packed, plus its
shared scales: BFP as ``width``-bit mantissas + ``exponent_width``-bit exponents, OCP MX as
element codes + E8M0 exponents, codebook formats (NF4, AF4, BOF4, BOF4-S) as 4-bit level
indices + per-block scales (+ OPQ outlier positions and bf16 values). Everything else stays
float, in ``qat_packed.safetensors``. ``config.json`` has ``model_type: qat_packed``, the
original config under ``base_config`` and the packing table under ``qat_packing``; the export
carries ``modeling_qat_packed.py``, so ``AutoModelFor...from_pretrained(dir,
trust_remote_code=True)`` (or, after ``import qat``, without it) unpacks the codes and rebuilds
the fake-quantised model. The codes and scales are the format's own (``Format.encode``; this
module only lays them out in bits), and unpacking repeats ``Format.decode``'s float32
arithmetic, so the rebuilt weights are bit-identical to ``fmt.quantize(w)``. Loading without
either fails with transformers' "pass trust_remote_code=True" error, never as a random model.

LO-BCQ is stored as 4-bit entry indices, per-block codebook selectors (``ceil(log2 N_c)``
bits) and per-array E8M0 exponents (255 marks an all-zero array); its codebooks are in the
codec.

The destination rules (new or empty, ``--overwrite`` replaces only an export, never the
source) and the atomic write (a temporary folder, then a rename) are
``qat.export.targets.write_export``'s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qat.errors import ExportError
from qat.export import modeling_qat_packed as mqp
from qat.export.modeling_qat_packed import unpack_weight as unpack
from qat.formats import FORMATS, Format, make_format
from qat.formats.base import Encoded
from qat.formats.bfp import BFP
from qat.formats.codebook import CodebookFormat
from qat.formats.lobcq import LOBCQ
from qat.formats.mx import E8M0_MIN, MXFormat
from qat.quant.modules import QuantConv1D, QuantLinear

QUANT_METHOD = "qat"


# --- bit packing ----------------------------------------------------------------------------


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Unsigned integer codes (< 2^bits) -> a little-endian bit stream in uint8."""
    c = codes.reshape(-1).to(torch.int64).numpy()
    if bits == 8:
        return torch.from_numpy(c.astype(np.uint8))
    planes = ((c[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


# --- per-family packers: (fmt, its Encoded, rows) -> tensors; codec: what unpacking needs --

Packed = dict[str, Tensor]


def _pack_bfp(fmt: Any, enc: Encoded) -> Packed:
    # Sign-magnitude codes -> offset binary (mantissa + 2^M), the layout of version-2 exports.
    m_bits = fmt.width - 1
    mag = (enc.codes & (2**m_bits - 1)).to(torch.int64)
    mant = torch.where((enc.codes >> m_bits).bool(), -mag, mag)
    bias = 2 ** (fmt.exponent_width - 1) - 1
    return {
        "codes": pack_bits(mant + 2**m_bits, fmt.width),
        "exponents": pack_bits(enc.scales.to(torch.int64) + bias, fmt.exponent_width),
    }


def _pack_mx(fmt: Any, enc: Encoded) -> Packed:

    # Exports hold one code for zero: a negative zero is written as +0.
    half = 1 << (fmt.elem_bits - 1)
    codes = torch.where(enc.codes & (half - 1) == 0, 0, enc.codes)
    return {
        "codes": pack_bits(codes, fmt.elem_bits),
        "exponents": pack_bits(enc.scales.to(torch.int64) - E8M0_MIN, 8),
    }  # E8M0 = e + 127


def _pack_codebook(fmt: Any, enc: Encoded) -> Packed:
    out: Packed = {}
    if "outlier_mask" in enc.extra:
        flat = enc.extra["outlier_mask"].reshape(-1).nonzero().reshape(-1)
        out["outlier_index"] = flat.to(torch.int32)
        out["outlier_values"] = enc.extra["outlier_values"].reshape(-1)[flat].to(torch.bfloat16)
    out["codes"] = pack_bits(enc.codes, 4)
    s = enc.scales
    # The format computes with a float32 scale; keep 16 bits only where that is exact.
    for dt in (torch.float16, torch.bfloat16):
        if torch.equal(s.to(dt).float(), s):
            out["scales"] = s.reshape(-1).to(dt)
            break
    else:
        out["scales"] = s.reshape(-1)
    return out


def _pack_lobcq(fmt: Any, enc: Encoded) -> Packed:
    # 4-bit entry indices, ceil(log2 N_c)-bit codebook selectors, E8M0 array exponents
    # (e + 127; 255, E8M0's NaN, marks an all-zero array); the codebooks go in the codec.
    out: Packed = {"codes": pack_bits(enc.codes, 4)}
    sel_bits = _selector_bits(fmt.num_codebooks)
    if sel_bits:
        out["selectors"] = pack_bits(enc.extra["selectors"], sel_bits)
    e8m0 = torch.where(enc.extra["zero"], 255, enc.scales.to(torch.int64) + 127)
    out["exponents"] = pack_bits(e8m0, 8)
    return out


def _selector_bits(num_codebooks: int) -> int:
    return math.ceil(math.log2(num_codebooks)) if num_codebooks > 1 else 0


def _bfp_codec(fmt: Any) -> dict[str, Any]:
    return {"family": "bfp", "width": fmt.width, "exponent_width": fmt.exponent_width}


def _mx_codec(fmt: Any) -> dict[str, Any]:
    return {"family": "mx", "elem_bits": fmt.elem_bits, "magnitudes": fmt.element_values().tolist()}


def _codebook_codec(fmt: Any) -> dict[str, Any]:
    return {"family": "codebook", "levels": [float(v) for v in fmt.levels]}


def _lobcq_codec(fmt: Any) -> dict[str, Any]:
    return {
        "family": "lobcq",
        "block_len": fmt.block_len,
        "selector_bits": _selector_bits(fmt.num_codebooks),
        "codebooks": [list(row) for row in fmt.codebooks],
    }


def _families() -> tuple[tuple[type, Callable, Callable], ...]:

    return (
        (BFP, _pack_bfp, _bfp_codec),
        (MXFormat, _pack_mx, _mx_codec),
        (CodebookFormat, _pack_codebook, _codebook_codec),
        (LOBCQ, _pack_lobcq, _lobcq_codec),
    )


def _packers() -> dict[str, tuple[Callable, Callable]]:
    """Format name -> (packer, codec) for every registered format export can pack."""

    return {
        name: (pack, codec)
        for name, cls in FORMATS.items()
        for family, pack, codec in _families()
        if issubclass(cls, family)
    }


def _packer(fmt: Format) -> tuple[Callable, Callable]:
    """(packer, codec): ``codec(fmt)`` is what ``modeling_qat_packed`` needs to unpack."""
    for family, pack, codec in _families():
        if isinstance(fmt, family):
            return pack, codec
    raise ExportError(
        f"packed export not supported for format {fmt.name!r} yet; "
        f"supported: {', '.join(sorted(_packers()))}"
    )


def pack_weight(fmt: Format, w: Tensor, dim: int) -> tuple[Packed, dict[str, Any]]:
    """Packed tensors of ``w`` blocked along ``dim``, and the metadata to unpack them."""
    pack, codec = _packer(fmt)
    enc = fmt.encode(w.detach().cpu(), dim)
    if not torch.isfinite(enc.nonfinite).all():
        raise ExportError(
            f"{fmt.name}: the weight holds NaN or inf, which packed codes cannot store"
        )
    blocks = [math.prod(enc.codes.shape[:-2]), *enc.codes.shape[-2:]]
    tensors = pack(fmt, enc)
    meta = {
        "format": fmt.spec(),
        "codec": codec(fmt),
        "shape": list(w.shape),
        "dim": dim,
        "dtype": str(w.dtype).removeprefix("torch."),
        "blocks": blocks,
        "tensors": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in tensors.items()
        },
    }
    return tensors, meta


def unpack_weight(
    meta: dict[str, Any], tensors: Packed, codecs: dict[str, dict[str, Any]] | None = None
) -> Tensor:
    """Rebuild the fake-quantised weight from ``pack_weight``'s output (bit-exact).

    ``meta["codec"]`` is the codec itself or its key in ``codecs``; version-1 exports have
    none, and the codec is derived from ``meta["format"]``."""

    codec = meta.get("codec")
    if isinstance(codec, str):
        codec = (codecs or {})[codec]
    if codec is None:
        fmt = make_format(meta["format"])
        codec = _packer(fmt)[1](fmt)
    return unpack(meta, tensors, codec)


# --- writing --------------------------------------------------------------------------------


def packed_state_dict(
    model: torch.nn.Module,
) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """The model's state dict with every quantised weight replaced by its packed tensors, the
    per-layer metadata, and the codec table the metadata refers to."""
    from tqdm.auto import tqdm

    state = model.state_dict()
    packed: dict[str, Any] = {}
    codecs: dict[str, Any] = {}
    mods = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, (QuantLinear, QuantConv1D)) and m.weight_quantizer is not None
    ]
    for name, m in tqdm(mods, desc="packing", unit="layer"):
        wq = m.weight_quantizer
        # a rotated layer stores its rotated weight (W H), quantised: what it computed with
        w = m.weight if wq.rotation is None else wq.rotation(m.weight.detach(), wq.dim)
        tensors, meta = pack_weight(wq.fmt, w, wq.dim)
        meta["kind"] = "conv1d" if isinstance(m, QuantConv1D) else "linear"
        key = json.dumps(meta["codec"], sort_keys=True)  # one table entry per distinct codec
        ids = {json.dumps(v, sort_keys=True): k for k, v in codecs.items()}
        if key not in ids:
            ids[key] = f"c{len(codecs)}"
            codecs[ids[key]] = meta["codec"]
        meta["codec"] = ids[key]
        packed[name] = meta
        del state[f"{name}.weight"]
        state.update({f"{name}.weight_{k}": v for k, v in tensors.items()})
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, t in state.items():  # tied weights (lm_head = embeddings) are written once
        ident = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (0, id(t))
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        out[key] = t.detach().cpu().contiguous()
    return out, packed, codecs


def _with_checksum(packing: dict[str, Any]) -> dict[str, Any]:

    # as config.json will hold it (tuples become lists), so the loader computes the same hash
    packing = json.loads(json.dumps(packing))
    return {**packing, "checksum": mqp.packing_checksum(packing)}


def check_target(quant: Any, config: Any, head: str) -> None:
    """What a packed export needs, checked before the model loads: a quant config (the codes
    are the export) whose every weight format has a packer. ``config`` and ``head``: any model
    and head transformers can rebuild."""
    if quant is None:
        raise ExportError(
            "the model is not quantised (quant: null): nothing to pack; set a "
            "quant section or --quant.weight ..."
        )
    for formats in quant.all_formats():
        if formats.weight is not None:
            _packer(formats.weight)


def write_packed(
    model: torch.nn.Module,
    folder: str | Path,
    tokenizer: Any = None,
) -> Path:
    """Write ``model`` (fake-quantised by ``quantize_model``; ``check_target`` passed, as
    ``qat.export_model`` checks it) packed into ``folder``. ``qat.export_model`` gives a
    temporary folder and renames it once written."""
    import shutil

    from safetensors.torch import save_file

    if hasattr(model, "merge_and_unload"):  # LoRA: W + BA is what the quantiser sees
        model = model.merge_and_unload()
    quant = model.qat_quant
    state, packed, codecs = packed_state_dict(model)
    arch = type(model).__name__
    base = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path"):  # no local paths in a shared export
        base.pop(key, None)
    base["architectures"] = [arch]
    if base.get("tie_word_embeddings") and getattr(
        model.get_output_embeddings(), "weight_quantizer", None
    ):
        # a quantised head is its own packed tensor; tied on loading, it would be the float
        # embeddings again
        base["tie_word_embeddings"] = False
    auto = mqp.auto_map(arch)
    config = mqp.QatPackedConfig(
        base_config=base,
        architectures=[auto[next(k for k in auto if k != "AutoConfig")].rsplit(".", 1)[1]],
        auto_map=auto,
        qat_packing=_with_checksum(
            {
                "version": mqp.PACK_VERSION,
                "quant": quant.to_dict(),
                "codecs": codecs,
                "packed": packed,
            }
        ),
    )

    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / mqp.WEIGHTS_NAME), metadata={"format": "pt"})
    config.save_pretrained(str(folder))
    shutil.copyfile(mqp.__file__, folder / "modeling_qat_packed.py")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder
