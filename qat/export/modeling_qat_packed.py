"""Loader of ``qat export`` folders; ``qat export`` copies this file into every export.

An export's ``config.json`` has ``model_type: qat_packed`` and an ``auto_map`` naming this
file, so transformers' custom-code mechanism loads it without the caller importing ``qat``:

    AutoModelForSequenceClassification.from_pretrained(export_dir, trust_remote_code=True)

Without ``trust_remote_code`` (and without ``import qat``, which registers the same classes)
transformers refuses the unknown model type and says to pass ``trust_remote_code=True``; the
weights are in ``qat_packed.safetensors``, not ``model.safetensors``, so a loader that skips
the config (``BertForSequenceClassification.from_pretrained``) finds no weights and fails too.
A packed export never loads as a silently random model.

Self-contained on purpose (torch, transformers and safetensors only): the unpacking maths lives
here and ``qat.export.packed`` uses it, so both paths give the same bits. When ``qat`` is
installed it
re-inserts the activation and attention-matmul quantisers; without ``qat`` an export that
quantises only weights loads exactly (its weights already lie on the format's grid), and one
that also quantises activations or attention raises ImportError rather than run a different
forward.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import PretrainedConfig, PreTrainedModel

MODEL_TYPE = "qat_packed"
WEIGHTS_NAME = "qat_packed.safetensors"
PACK_VERSION = 2
# from_pretrained keywords that the Hub / Auto classes pass along and that do not change the
# model; anything else (num_labels, a device_map that splits the model, ...) is refused rather
# than silently ignored.
_PASSTHROUGH = {
    "cache_dir",
    "force_download",
    "proxies",
    "revision",
    "token",
    "local_files_only",
    "subfolder",
    "trust_remote_code",
    "code_revision",
    "_from_auto",
    "_commit_hash",
    "use_safetensors",
    "adapter_kwargs",
    "resume_download",
    "_from_pipeline",
    "user_agent",
}


# --- unpacking (the inverse of qat.export.packed's packers; float32 arithmetic as the formats)


def unpack_bits(stream: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """``count`` unsigned codes of ``bits`` bits from a little-endian uint8 bit stream."""
    s = stream.reshape(-1).to(torch.uint8)
    if s.numel() != -(-count * bits // 8):  # exactly: a stream of another width is not ours
        raise ValueError(
            f"packed stream holds {s.numel()} bytes, {-(-count * bits // 8)} "
            f"expected for {count} codes of {bits} bits"
        )
    if bits == 8:
        return s.to(torch.int64)
    planes = (s.to(torch.int64).unsqueeze(-1) >> torch.arange(8)) & 1  # little-endian bits
    planes = planes.reshape(-1)[: count * bits].reshape(count, bits)
    return (planes << torch.arange(bits)).sum(-1)


def _unpack_bfp(
    c: dict[str, Any], t: dict[str, torch.Tensor], shape: tuple[int, int, int]
) -> torch.Tensor:
    rows, nb, bs = shape
    width, ew = int(c["width"]), int(c["exponent_width"])
    m_bits = width - 1
    mant = unpack_bits(t["codes"], width, rows * nb * bs) - 2**m_bits
    e = unpack_bits(t["exponents"], ew, rows * nb) - (2 ** (ew - 1) - 1)
    scale = torch.exp2((e.reshape(rows, nb).to(torch.int32) - m_bits).float()).unsqueeze(-1)
    return mant.reshape(shape).float() * scale


def _unpack_mx(
    c: dict[str, Any], t: dict[str, torch.Tensor], shape: tuple[int, int, int]
) -> torch.Tensor:
    rows, nb, bs = shape
    bits = int(c["elem_bits"])
    code = unpack_bits(t["codes"], bits, rows * nb * bs)
    half = 1 << (bits - 1)
    mag = torch.tensor(c["magnitudes"], dtype=torch.float32)[code % half]
    elems = torch.where(code >= half, -mag, mag).reshape(shape)
    e = unpack_bits(t["exponents"], 8, rows * nb) - 127  # E8M0: code = exponent + 127
    return elems * torch.exp2(e.reshape(rows, nb).float()).unsqueeze(-1)


def _unpack_codebook(
    c: dict[str, Any], t: dict[str, torch.Tensor], shape: tuple[int, int, int]
) -> torch.Tensor:
    rows, nb, bs = shape
    lv = torch.tensor(c["levels"], dtype=torch.float32)
    code = unpack_bits(t["codes"], 4, rows * nb * bs).reshape(shape)
    s = t["scales"].float().reshape(rows, nb, 1)
    q = torch.where(s == 0, torch.zeros(shape), lv[code] * s)
    if "outlier_index" in t:
        q = q.reshape(-1).clone()
        q[t["outlier_index"].long()] = t["outlier_values"].float()
        q = q.reshape(shape)
    return q


def _unpack_lobcq(
    c: dict[str, Any], t: dict[str, torch.Tensor], shape: tuple[int, int, int]
) -> torch.Tensor:
    rows, na, la = shape
    block_len, sel_bits = int(c["block_len"]), int(c["selector_bits"])
    books = torch.tensor(c["codebooks"], dtype=torch.float32)  # [N_c, 16] integer entries
    if la % block_len or books.dim() != 2 or books.shape[1] != 16:
        raise ValueError(f"lobcq codec: arrays of {la} in blocks of {block_len}, 16 entries")
    code = unpack_bits(t["codes"], 4, rows * na * la).reshape(shape)
    nsel = rows * na * (la // block_len)
    sel = unpack_bits(t["selectors"], sel_bits, nsel) if sel_bits else torch.zeros(nsel).long()
    if int(sel.max()) >= books.shape[0]:
        raise ValueError(f"a codebook selector is past the {books.shape[0]} codebooks")
    sel = sel.reshape(rows, na, -1).repeat_interleave(block_len, dim=-1)
    e8m0 = unpack_bits(t["exponents"], 8, rows * na).reshape(rows, na, 1)
    # 255 (E8M0's NaN) marks an all-zero array; else the scale is 2^(code - 127)
    q = books[sel, code] * torch.exp2((e8m0 - 127).float())
    q = torch.where(e8m0 == 255, torch.zeros(shape), q)
    big = torch.finfo(torch.float32).max  # saturated, as the format does (31 * 2^124 > max)
    return q.clamp(-big, big)


UNPACKERS = {
    "bfp": _unpack_bfp,
    "mx": _unpack_mx,
    "codebook": _unpack_codebook,
    "lobcq": _unpack_lobcq,
}


def unpack_weight(
    meta: dict[str, Any], tensors: dict[str, torch.Tensor], codec: dict[str, Any]
) -> torch.Tensor:
    """One layer's weight from its packed tensors (``meta``: shape, dim, dtype, blocks)."""
    family = codec.get("family")
    if family not in UNPACKERS:
        raise ValueError(f"unknown packed family {family!r}; known: {', '.join(UNPACKERS)}")
    for key, spec in meta["tensors"].items():
        if key not in tensors:
            raise ValueError(f"packed tensor {key!r} is missing")
        if list(tensors[key].shape) != list(spec["shape"]):
            raise ValueError(
                f"packed tensor {key!r} has shape {list(tensors[key].shape)}, "
                f"expected {spec['shape']}"
            )
    shape = [int(s) for s in meta["shape"]]
    dim = int(meta["dim"]) % len(shape)
    moved = shape[:dim] + shape[dim + 1 :] + [shape[dim]]
    blocks = tuple(int(b) for b in meta["blocks"])
    if blocks[0] != math.prod(moved[:-1]) or blocks[1] * blocks[2] < moved[-1]:
        raise ValueError(f"blocks {list(blocks)} do not cover a weight of shape {shape}")
    q = UNPACKERS[family](codec, {k: v.cpu() for k, v in tensors.items()}, blocks)
    q = q.reshape(blocks[0], blocks[1] * blocks[2])[:, : moved[-1]]
    return q.reshape(moved).movedim(-1, dim).to(getattr(torch, meta["dtype"]))


# --- transformers classes -------------------------------------------------------------------


class QatPackedConfig(PretrainedConfig):
    """``config.json`` of an export: the original model's config plus the packing table."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        base_config: dict[str, Any] | None = None,
        qat_packing: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.base_config = base_config or {}
        self.qat_packing = qat_packing or {}
        super().__init__(**kwargs)


def packing_checksum(packing: dict[str, Any]) -> str:
    """SHA-256 of the packing table (version, quant, codecs, per-layer layout): an edited codec
    field (a width, an exponent width) would unpack the same bytes into other weights."""
    import hashlib

    body = {k: packing.get(k) for k in ("version", "quant", "codecs", "packed")}
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def _only_weights_quantised(quant: dict[str, Any] | None) -> bool:
    if not quant:
        return True
    parts = [quant] + list((quant.get("overrides") or {}).values())
    # a rotation needs qat too: the input is rotated before the stored (rotated) weight
    return all(p.get(role) is None for p in parts for role in ("activation", "matmul", "rotation"))


def load_packed(
    path: str | os.PathLike, config: QatPackedConfig | None = None, dtype: Any = None
) -> torch.nn.Module:
    """The model of a ``qat export`` folder, with the forward of the exported model."""
    import transformers

    path = os.fspath(path)
    if config is None:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = QatPackedConfig(**{k: v for k, v in json.load(f).items() if k != "model_type"})
    packing = config.qat_packing
    if packing.get("version") != PACK_VERSION:
        raise ValueError(
            f"{path}: qat_packing version {packing.get('version')!r} is not "
            f"{PACK_VERSION}; load it with the qat version that wrote it"
        )
    if packing.get("checksum") != packing_checksum(packing):
        raise ValueError(
            f"{path}: config.json's qat_packing does not match its checksum (its "
            "codec or layout fields were edited or damaged); export the model "
            "again"
        )
    base = dict(config.base_config)
    base_type = base.pop("model_type")
    arch = (base.get("architectures") or [None])[0]
    model_cls = getattr(transformers, str(arch), None)
    if model_cls is None:
        raise ValueError(f"{path}: base architecture {arch!r} is not in this transformers")
    base_config = transformers.AutoConfig.for_model(base_type, **base)
    if dtype is not None and dtype != "auto":
        base_config.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = model_cls(base_config)
    state = load_file(os.path.join(path, WEIGHTS_NAME))
    codecs = packing["codecs"]
    for name, meta in packing["packed"].items():
        tensors = {k: state.pop(f"{name}.weight_{k}", None) for k in meta["tensors"]}
        tensors = {k: v for k, v in tensors.items() if v is not None}
        try:
            state[f"{name}.weight"] = unpack_weight(meta, tensors, codecs[meta["codec"]])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: {WEIGHTS_NAME}: layer {name}: {e}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    sd = model.state_dict()
    loaded = {sd[k].data_ptr() for k in sd if k not in missing}
    untied = [k for k in missing if sd[k].data_ptr() not in loaded]  # tied copies are fine
    if untied or unexpected:
        raise ValueError(
            f"{path}: {WEIGHTS_NAME} does not match {arch}: missing "
            f"{untied[:5]}, unexpected {list(unexpected)[:5]}"
        )
    quant = packing.get("quant")
    try:
        from qat.quant.quantize import quantize_model
    except ImportError:
        quantize_model = None
    if quantize_model is not None:
        if quant is not None:
            quantize_model(model, quant)
        for name in packing["packed"]:
            wq = getattr(model.get_submodule(name), "weight_quantizer", None)
            if wq is not None:
                wq.enabled = False  # already on the grid; re-quantising BFP is not a no-op
                wq.rotation = None  # stored rotated (W H); the input is still rotated
    elif not _only_weights_quantised(quant):
        raise ImportError(
            f"{path} quantises activations or attention matmuls (or rotates "
            "inputs), which needs the qat package to run: pip install qat "
            "(weights-only exports load without it)"
        )
    return model.eval()


_SPLITTING_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _single_device(device_map: Any) -> Any:
    """The one device of a ``device_map`` that places the whole model (``"cuda:0"``,
    ``{"": "cuda:0"}``: what lm-evaluation-harness passes), or None for no map. Maps that
    split the model are refused: the unpacked model is built whole on the CPU."""
    if device_map is None:
        return None
    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    if isinstance(device_map, (str, int, torch.device)) and device_map not in _SPLITTING_MAPS:
        return torch.device(device_map)
    raise TypeError(
        f"qat packed exports take no device_map {device_map!r} in from_pretrained "
        "(only one device for the whole model, e.g. {'': 'cuda:0'})"
    )


class _QatPackedBase(PreTrainedModel):
    config_class = QatPackedConfig
    base_model_prefix = "qat_packed"

    def __init__(self, config: QatPackedConfig, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a qat packed export is built by from_pretrained(export_dir)")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *args: Any,
        config: QatPackedConfig | None = None,
        **kwargs: Any,
    ) -> torch.nn.Module:
        """Returns the original architecture's model (e.g. ``BertForSequenceClassification``)
        with the unpacked weights and, with qat installed, its quantisers."""
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        device = _single_device(kwargs.pop("device_map", None))
        unknown = sorted(k for k, v in kwargs.items() if k not in _PASSTHROUGH and v is not None)
        if args or unknown:
            raise TypeError(
                f"qat packed exports take no {', '.join(unknown) or 'extra args'} "
                "in from_pretrained"
            )
        path = pretrained_model_name_or_path
        if not os.path.isdir(path):
            raise OSError(f"{path}: a qat packed export is a local folder")
        model = load_packed(path, config, dtype)
        return model if device is None else model.to(device)


class QatPackedForSequenceClassification(_QatPackedBase):
    pass


class QatPackedForCausalLM(_QatPackedBase):
    pass


class QatPackedModel(_QatPackedBase):
    pass


AUTO_CLASSES = {
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForCausalLM": "AutoModelForCausalLM",
}


def auto_map(architecture: str) -> dict[str, str]:
    """config.json's ``auto_map`` for an export of ``architecture``."""
    mod = __name__.rsplit(".", 1)[-1]
    out = {"AutoConfig": f"{mod}.QatPackedConfig"}
    for suffix, auto in AUTO_CLASSES.items():
        if architecture.endswith(suffix):
            out[auto] = f"{mod}.QatPacked{suffix}"
            return out
    out["AutoModel"] = f"{mod}.QatPackedModel"
    return out


def register() -> None:
    """Let ``import qat`` load exports without ``trust_remote_code`` (idempotent)."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    AutoConfig.register(MODEL_TYPE, QatPackedConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(
        QatPackedConfig, QatPackedForSequenceClassification, exist_ok=True
    )
    AutoModelForCausalLM.register(QatPackedConfig, QatPackedForCausalLM, exist_ok=True)
    AutoModel.register(QatPackedConfig, QatPackedModel, exist_ok=True)


# Imported by qat itself, this module may have been half-built when qat's registration ran
# (importing PreTrainedModel runs that hook): register now. Inside an export folder, loaded by
# trust_remote_code without qat, transformers registers the classes from auto_map instead.
if "qat.export.hf_quantizer" in sys.modules:
    register()
