"""QDEC residuals on disk: ``save_qdec`` writes ``qdec.safetensors`` and ``qdec_config.json``
beside a saved model, ``load_qdec`` attaches them again (checked against the model by a
fingerprint of its weights and weight quantisers), ``read_qdec_meta`` checks the JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.quant.qdec.attach import install_residual, layer_shape, layers_to_serve, qdec_layers
from qat.quant.qdec.config import QDECConfig, QDECError

QDEC_WEIGHTS = "qdec.safetensors"
QDEC_CONFIG = "qdec_config.json"


def save_qdec(model: nn.Module, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``qdec.safetensors`` (``<layer>.codes``: int8 ``[d_in, d_out]``, or for residuals
    of at most 4 bits uint8 ``[d_in, ceil(d_out / 2)]`` two codes a byte; ``<layer>.scale``
    fp32 ``[d_out]``) and ``qdec_config.json`` into ``directory`` (beside a saved model)."""
    from safetensors.torch import save_file

    states = {n: m.__dict__["_qdec"] for n, m in model.named_modules() if "_qdec" in m.__dict__}
    if not states:
        raise QDECError("this model has no QDEC attached; attach_qdec(model, config) first")
    out = Path(directory)
    for fname in (QDEC_WEIGHTS, QDEC_CONFIG):
        if (out / fname).exists() and not overwrite:
            raise QDECError(
                f"{str(out / fname)!r} already exists; pass overwrite=True to replace it"
            )
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for n, s in states.items():
        tensors[f"{n}.codes"] = s.codes_t.cpu().contiguous()
        tensors[f"{n}.scale"] = s.scale.cpu().contiguous()
    save_file(tensors, str(out / QDEC_WEIGHTS))
    meta = {
        "version": 3,
        "config": model.qdec_config.to_dict(),
        "layers": {n: [s.codes_t.shape[0], s.d_out] for n, s in states.items()},
        "fingerprint": qdec_fingerprint(model),
    }
    (out / QDEC_CONFIG).write_text(json.dumps(meta, indent=2))
    return out


def has_saved_qdec(directory: str | Path) -> bool:
    return (Path(directory) / QDEC_CONFIG).is_file()


def qdec_fingerprint(model: nn.Module) -> str:
    """A hash of what the residuals ``W - Q(W)`` depend on: every served layer's name, weight
    bytes and weight quantiser (format and block dimension). Saved residuals are used only for
    the model they were computed from: a retrained model or another quantiser gets new ones."""
    import hashlib

    h = hashlib.sha256()
    for name, m in qdec_layers(model):
        q = m.weight_quantizer
        w = m.weight.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{q.fmt!r}|dim={q.dim}|{w.dtype}|{tuple(m.weight.shape)}\n".encode())
        h.update(w.view(torch.uint8).numpy().data)
    return h.hexdigest()


def read_qdec_meta(directory: str | Path) -> dict[str, Any]:
    """``qdec_config.json`` checked: a damaged or foreign file is one ``QDECError`` line."""
    path = Path(directory) / QDEC_CONFIG
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if (
            not isinstance(meta, dict)
            or not isinstance(meta.get("layers"), dict)
            or not isinstance(meta.get("config"), dict)
        ):
            raise ValueError("expected an object with 'config' and 'layers'")
        QDECConfig.from_dict(meta["config"])
    except FileNotFoundError:
        raise QDECError(
            f"{str(directory)!r} holds no {QDEC_CONFIG} (written by save_qdec)"
        ) from None
    except (ValueError, KeyError, TypeError, RecursionError, OSError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise QDECError(
            f"{str(path)!r} is not a valid QDEC config ({reason}); delete the "
            "qdec.* files to recompute the residuals"
        ) from None
    return meta


def load_qdec(
    model: nn.Module, directory: str | Path, config: QDECConfig | Mapping[str, Any] | None = None
) -> nn.Module:
    """Attach the residuals saved by ``save_qdec`` (not recomputed). ``config`` may change
    ``k_chunk``, ``residual_device`` and ``prefill``; ``residual_bits`` is the saved one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    meta = read_qdec_meta(d)
    saved, shapes = QDECConfig.from_dict(meta["config"]), meta["layers"]
    config = QDECConfig.from_dict(config) if config is not None else saved
    if config.residual_bits != saved.residual_bits:
        raise QDECError(
            f"qdec.residual_bits {config.residual_bits} differs from the saved "
            f"residuals' {saved.residual_bits} in {str(d)!r}"
        )
    layers = dict(layers_to_serve(model))
    if set(layers) != set(shapes):
        missing = sorted(set(shapes) ^ set(layers))
        raise QDECError(
            f"{str(d)!r}: saved QDEC layers do not match the model's quantised "
            f"linears (first difference: {missing[0]!r})"
        )
    if meta.get("fingerprint") != qdec_fingerprint(model):
        raise QDECError(
            f"{str(d)!r}: the saved QDEC residuals were computed from other "
            "weights or another weight quantiser than this model's; recompute "
            "them (attach_qdec) or delete the qdec.* files"
        )
    try:
        tensors = load_file(str(d / QDEC_WEIGHTS))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise QDECError(f"{str(d / QDEC_WEIGHTS)!r}: cannot be read ({e})") from None
    for name, m in layers.items():
        codes, scale = tensors.get(f"{name}.codes"), tensors.get(f"{name}.scale")
        d_in, d_out = layer_shape(m)
        # version 1 files hold int8 codes only; version 2 packs residuals of <= 4 bits
        want = (
            (d_in, (d_out + 1) // 2)
            if codes is not None and codes.dtype == torch.uint8
            else (d_in, d_out)
        )
        if (
            codes is None
            or scale is None
            or tuple(codes.shape) != want
            or tuple(scale.shape) != (d_out,)
            or codes.dtype not in (torch.int8, torch.uint8)
        ):
            raise QDECError(
                f"{str(d / QDEC_WEIGHTS)!r}: layer {name!r} is missing or has the "
                f"wrong shape (expected codes {list(want)})"
            )
    for name, m in layers.items():
        install_residual(model, name, m, tensors[f"{name}.codes"], tensors[f"{name}.scale"], config)
    model.qdec_config = config
    return model
