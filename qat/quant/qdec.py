"""QDEC: dynamic error compensation of quantised linears at inference (METHODS.md section 3).

For every ``QuantLinear`` (or GPT-2 ``QuantConv1D``) with a weight quantiser, the residual
``R = W - Q(W)`` is computed once with the model's own weight quantiser and quantised to
``residual_bits`` (symmetric, one scale per output channel, scale by an MSE grid search over
fractions of the row's max |R|).
At inference each layer adds ``R_hat[:, S] @ x[S]`` to its output, ``S`` being the ``k`` input
channels of largest |x| (``x`` as the layer multiplies it: after its input quantiser, so that
``k = d_in`` gives exactly the layer with weight ``Q(W) + R_hat``).

``k = round(k_chunk * d_in / 1024)``, Python's ``round`` (half to even), clamped to
``[0, d_in]``; ``k_chunk = 1024`` is every channel, ``0`` none.

Which channels, for an input ``[..., T, d_in]`` (every leading dim a sequence, ``T`` tokens of
the step; a 2-D input is one token per row):

- decode, ``T == 1``: per token, exactly as the paper (top-k of that token's |x|).
- several tokens per sequence (prefill), ``prefill: step`` (the default): per sequence, the
  top-k of ``max over the step's tokens of |x|``; that one set ``S`` serves every token of the
  sequence, so one gather of ``k`` residual columns per sequence and step.
- ``prefill: token``: per token, as if each token were decoded alone (what ``qat perplexity``
  uses unless told otherwise, so perplexity measures decode-time quality). Computed densely
  (mask the unselected channels, multiply by the whole ``R_hat``): an evaluation mode, it moves
  all of ``R_hat`` to the model's device for the call.

Where the residual lives: ``residual_device: cpu`` keeps the int8 codes and fp32 scales in CPU
memory (pinned once the model runs on CUDA); only the ``k`` selected columns (and the scales)
are copied to the model's device, ``non_blocking``, from a pinned staging buffer.
``residual_device: same`` moves them to the model's device on first use (no host sync; more
device memory). Nothing is registered as a parameter or buffer: ``model.to()``,
``state_dict()`` and optimisers never see the residual. Codes are stored as int8 (not packed),
transposed to ``[d_in, d_out]`` so that a selected input channel is one contiguous row.

QDEC is inference-only: a forward under grad mode raises ``QDECError`` (run under
``torch.no_grad()`` / ``torch.inference_mode()``, as ``generate`` and evaluation do, or
``detach_qdec`` first), so it can never leak into training.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qat.quant.config import QuantConfigError, check_section
from qat.quant.modules import QuantConv1D, QuantLinear

QuantLayer = QuantLinear | QuantConv1D
logger = logging.getLogger(__name__)

RESIDUAL_DEVICES = ("cpu", "same")
PREFILL_RULES = ("step", "token")
QDEC_WEIGHTS = "qdec.safetensors"
QDEC_CONFIG = "qdec_config.json"
# Fractions of max|R| tried as the clipping point of the residual's scale; 1.0 (plain max-abs)
# is included, so the search never does worse than max-abs.
SCALE_FRACTIONS = tuple(1.0 - 0.02 * i for i in range(36))  # 1.00, 0.98, ..., 0.30


class QDECError(QuantConfigError):
    """An invalid ``qdec:`` setting or a model QDEC cannot serve; one line naming the key."""


@dataclasses.dataclass
class QDECConfig:
    """``qdec: {k_chunk: 32, residual_bits: 4, residual_device: cpu, prefill: null}``.

    ``prefill`` null means: ``token`` in ``qat perplexity``, ``step`` elsewhere (see the
    module docstring).
    """

    k_chunk: int = 32
    residual_bits: int = 4
    residual_device: str = "cpu"
    prefill: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        k = self.k_chunk
        if isinstance(k, float) and k.is_integer():
            self.k_chunk = k = int(k)  # YAML / CLI "32.0"
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise QDECError(f"qdec.k_chunk must be an integer >= 0 (channels per 1024 inputs), "
                            f"got {k!r}")
        b = self.residual_bits
        if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8:
            raise QDECError(f"qdec.residual_bits must be an integer in 2..8, got {b!r}")
        if self.residual_device not in RESIDUAL_DEVICES:
            raise QDECError(f"qdec.residual_device must be one of {', '.join(RESIDUAL_DEVICES)}; "
                            f"got {self.residual_device!r}")
        if self.prefill is not None and self.prefill not in PREFILL_RULES:
            raise QDECError(f"qdec.prefill must be one of {', '.join(PREFILL_RULES)} or null; "
                            f"got {self.prefill!r}")

    @classmethod
    def from_dict(cls, d: Any) -> QDECConfig | None:
        """From a recipe's ``qdec:`` mapping; ``None`` (no QDEC) passes through."""
        if d is None or isinstance(d, QDECConfig):
            return d
        check_section(d, cls, "qdec", QDECError)
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def k_for(k_chunk: int, d_in: int) -> int:
    """Channels compensated per step: ``round(k_chunk * d_in / 1024)`` (half to even),
    clamped to ``[0, d_in]``."""
    return max(0, min(d_in, round(k_chunk * d_in / 1024)))


def quantize_residual(r: Tensor, bits: int, fractions: tuple[float, ...] = SCALE_FRACTIONS
                      ) -> tuple[Tensor, Tensor]:
    """Symmetric ``bits``-bit quantisation of ``r [out, in]`` with one scale per row.

    Codes lie in ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]`` (symmetric: no extra negative code);
    the scale is ``f * max|r_row| / qmax`` with ``f`` from ``fractions`` minimising the row's
    squared error (round half to even). Returns ``(codes int8 [out, in], scale fp32 [out])``;
    an all-zero row gets scale 0.
    """
    r = r.float()
    qmax = 2 ** (bits - 1) - 1
    amax = r.abs().amax(dim=1)
    best_err = torch.full_like(amax, math.inf)
    best_scale = amax / qmax
    for f in fractions:
        s = (amax * f / qmax).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(r / s[:, None]).clamp_(-qmax, qmax)
        err = (q * s[:, None] - r).square_().sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, s, best_scale)
    best_scale = torch.where(amax > 0, best_scale, torch.zeros_like(best_scale))
    safe = best_scale.clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round(r / safe[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    return codes, best_scale


def select_channels(x: Tensor, k: int) -> Tensor:
    """Top-``k`` input channels by |x| for each sequence of ``x [B, T, d]`` (max over the
    ``T`` tokens of the step; with ``T == 1`` that token's own |x|): indices ``[B, k]``."""
    return x.abs().amax(dim=1).topk(k, dim=-1, sorted=False).indices


def pack_nibbles(codes: Tensor) -> Tensor:
    """int8 codes in ``[-8, 7]``, ``[n, m]`` -> uint8 ``[n, ceil(m / 2)]``: column ``2j`` in the
    low nibble, ``2j + 1`` in the high one, each stored as ``code + 8`` (an odd ``m`` is padded
    with code 0)."""
    c = (codes.to(torch.int16) + 8).to(torch.uint8)
    if c.shape[-1] % 2:
        c = torch.cat([c, c.new_full((*c.shape[:-1], 1), 8)], dim=-1)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: Tensor, m: int, dtype: torch.dtype = torch.int8) -> Tensor:
    """Inverse of ``pack_nibbles`` for the first ``m`` columns, as ``dtype``."""
    lo = (packed & 15).to(dtype) - 8
    hi = (packed >> 4).to(dtype) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)[..., :m]


class QDECState:
    """One layer's residual (plain attributes, deliberately not a module or buffer).

    Residuals of at most 4 bits are held two codes per byte (``pack_nibbles``): half the host
    memory, and half the bytes each decode step moves to the GPU; they are unpacked after
    the gather, on the device.
    """

    def __init__(self, codes_t: Tensor, scale: Tensor, k: int, config: QDECConfig) -> None:
        self.scale = scale.float().contiguous()  # fp32 [d_out]
        self.d_out = self.scale.shape[0]
        if codes_t.dtype == torch.int8 and config.residual_bits <= 4:
            codes_t = pack_nibbles(codes_t)
        # int8 [d_in, d_out], or uint8 [d_in, ceil(d_out / 2)] packed; on the CPU until used
        self.codes_t = codes_t.contiguous()
        self.k = k
        self.config = config
        self.handle: Any = None
        self._staging: Tensor | None = None  # pinned rows of codes_t, reused every step
        self._staging_done: Any = None  # CUDA event: the last copy out of the staging buffer

    @property
    def packed(self) -> bool:
        return self.codes_t.dtype == torch.uint8

    def _unpack(self, rows: Tensor, dtype: torch.dtype) -> Tensor:
        return unpack_nibbles(rows, self.d_out, dtype) if self.packed else rows.to(dtype)

    def codes(self) -> Tensor:
        """The residual's codes, int8 ``[d_in, d_out]`` (unpacked)."""
        return self._unpack(self.codes_t, torch.int8)

    def residual(self) -> Tensor:
        """``R_hat [d_out, d_in]`` in fp32 (on the residual's device)."""
        return (self._unpack(self.codes_t, torch.float32) * self.scale).t()

    def _place(self, device: torch.device) -> None:
        """Lazily settle where the residual lives for inputs on ``device``."""
        if self.codes_t.device == device:
            return
        if self.config.residual_device == "same":
            self.codes_t, self.scale = self.codes_t.to(device), self.scale.to(device)
        elif device.type == "cuda" and not self.codes_t.is_pinned():
            self.codes_t, self.scale = self.codes_t.pin_memory(), self.scale.pin_memory()

    def gather(self, idx: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Residual rows ``idx [B, k]`` as ``[B, k, d_out]`` and the scales, on ``idx``'s
        device in ``dtype``.

        With the residual in host memory and ``idx`` on a GPU this is the one host sync of a
        decode step per layer: the top-k indices must reach the host before the selected rows
        can be gathered there (nothing else waits on the device). The gather writes into a
        pinned staging buffer so the copy to the device is truly asynchronous.
        """
        device = idx.device
        if self.codes_t.device == device:
            return self._unpack(self.codes_t[idx], dtype), self.scale.to(dtype)
        flat = idx.reshape(-1).to("cpu")  # host sync (see the docstring)
        n = flat.numel()
        if self._staging is None or self._staging.shape[0] < n:
            self._staging = torch.empty((n, self.codes_t.shape[1]), dtype=self.codes_t.dtype,
                                        pin_memory=device.type == "cuda")
            self._staging_done = None
        if self._staging_done is not None:
            self._staging_done.synchronize()  # the previous copy out of it has finished
        staged = self._staging[:n]
        torch.index_select(self.codes_t, 0, flat, out=staged)
        rows = staged.to(device, non_blocking=True)
        scale = self.scale.to(device, non_blocking=True)
        if device.type == "cuda":
            self._staging_done = torch.cuda.Event()
            self._staging_done.record()
        return self._unpack(rows.view(*idx.shape, -1), dtype), scale.to(dtype)

    def compensation(self, qx: Tensor, prefill: str) -> Tensor | None:
        """``R_hat[:, S] @ x[S]`` for the input ``qx`` (shape of the layer's input, last dim
        ``d_out``), or None when ``k == 0``."""
        if self.k == 0:
            return None
        self._place(qx.device)
        shape = qx.shape
        x3 = qx.reshape(-1, 1, shape[-1]) if qx.dim() <= 2 else qx.reshape(-1, *shape[-2:])
        if x3.shape[1] > 1 and prefill == "token":
            x2 = x3.reshape(-1, shape[-1])
            idx = x2.abs().topk(self.k, dim=-1, sorted=False).indices
            masked = torch.zeros_like(x2).scatter_(1, idx, x2.gather(1, idx))
            r = self.residual().to(qx.device, qx.dtype, non_blocking=True)
            out = masked @ r.t()
        else:
            idx = select_channels(x3, self.k)  # [B, k]
            rows, scale = self.gather(idx, qx.dtype)  # [B, k, d_out]
            xs = x3.gather(2, idx[:, None, :].expand(-1, x3.shape[1], -1))  # [B, T, k]
            out = torch.bmm(xs, rows) * scale
        return out.reshape(*shape[:-1], -1)


def _hook(module: QuantLayer, args: tuple, output: Tensor) -> Tensor:
    state: QDECState = module._qdec
    if torch.is_grad_enabled():
        raise QDECError("QDEC is inference-only: run the model under torch.no_grad() or "
                        "torch.inference_mode(), or detach_qdec(model) before training")
    if state.k == 0:
        return output
    prefill = state.config.prefill or getattr(module, "_qdec_prefill", None) or "step"
    delta = state.compensation(module.quantized_input(args[0]), prefill)
    return output if delta is None else output + delta.to(output.dtype)


def qdec_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    """The layers QDEC serves: ``QuantLinear`` / ``QuantConv1D`` modules with an enabled
    weight quantiser."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (QuantLinear, QuantConv1D))
            and m.weight_quantizer is not None and m.weight_quantizer.enabled]


def layer_shape(m: QuantLayer) -> tuple[int, int]:
    """``(d_in, d_out)``: a Conv1D stores its weight as ``[in, out]``, a Linear ``[out, in]``."""
    d0, d1 = m.weight.shape
    return (d0, d1) if isinstance(m, QuantConv1D) else (d1, d0)


def weight_residual(m: QuantLayer) -> Tensor:
    """``W - Q(W)`` as ``[d_out, d_in]`` in fp32, quantised as the layer quantises it."""
    w = m.weight.detach()
    wq = m.weight_quantizer
    # a rotated layer computes with W H (its quantiser rotates): the residual is W H - Q(W H)
    target = w if wq.rotation is None else wq.rotation(w, wq.dim)
    r = target.float() - wq(w).float()
    return r.t() if isinstance(m, QuantConv1D) else r


def _layers_or_raise(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    if any(hasattr(m, "_qdec") for m in model.modules()):
        raise QDECError("QDEC is already attached to this model; detach_qdec(model) first")
    layers = qdec_layers(model)
    if not layers:
        raise QDECError("QDEC needs quantised weights, and this model has no linear layer with "
                        "a weight quantiser; set quant.weight (e.g. {format: bfp, width: 3})")
    return layers


def _install(model: nn.Module, name: str, module: QuantLayer, codes_t: Tensor, scale: Tensor,
             config: QDECConfig) -> None:
    state = QDECState(codes_t, scale, k_for(config.k_chunk, layer_shape(module)[0]), config)
    module.__dict__["_qdec"] = state  # plain attribute: model.to() / state_dict() skip it
    state.handle = module.register_forward_hook(_hook)


def attach_qdec(model: nn.Module, config: QDECConfig | Mapping[str, Any] | None = None
                ) -> nn.Module:
    """Compute, quantise and attach every quantised linear's residual; returns ``model``.

    >>> import torch, qat
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    >>> w4 = {"format": "bfp", "width": 4, "block_size": 16}
    >>> model = qat.quantize_model(model, {"weight": w4})
    >>> model = qat.attach_qdec(model, {"residual_bits": 4})
    >>> model.qdec_config.residual_bits
    4
    >>> with torch.no_grad():  # QDEC is inference-only
    ...     model(torch.randn(2, 32)).shape
    torch.Size([2, 8])"""
    config = QDECConfig.from_dict(config if config is not None else {})
    layers = _layers_or_raise(model)
    with torch.no_grad():
        for name, m in layers:
            codes, scale = quantize_residual(weight_residual(m), config.residual_bits)
            _install(model, name, m, codes.t().cpu(), scale.cpu(), config)
    model.qdec_config = config
    return model


def detach_qdec(model: nn.Module) -> nn.Module:
    """Remove QDEC from every layer (the residuals are dropped)."""
    for m in model.modules():
        state = m.__dict__.pop("_qdec", None)
        m.__dict__.pop("_qdec_prefill", None)
        if state is not None and state.handle is not None:
            state.handle.remove()
    model.__dict__.pop("qdec_config", None)
    return model


def enable_qdec(model: nn.Module, on: bool) -> None:
    """Switch an attached QDEC's hooks off (the residuals stay) or back on; off, the model
    runs exactly as without QDEC (no hook is called)."""
    for m in model.modules():
        state = m.__dict__.get("_qdec")
        if state is None:
            continue
        if on and state.handle is None:
            state.handle = m.register_forward_hook(_hook)
        elif not on and state.handle is not None:
            state.handle.remove()
            state.handle = None


def set_k_chunk(model: nn.Module, k_chunk: int) -> None:
    """Change ``k_chunk`` of an attached QDEC without recomputing residuals."""
    config = dataclasses.replace(model.qdec_config, k_chunk=k_chunk)
    model.qdec_config = config
    for m in model.modules():
        state = m.__dict__.get("_qdec")
        if state is not None:
            state.k, state.config = k_for(k_chunk, layer_shape(m)[0]), config


def set_default_prefill(model: nn.Module, rule: str | None) -> None:
    """The prefill rule used where the config's ``prefill`` is null (``qat perplexity``:
    ``token``)."""
    for m in model.modules():
        if "_qdec" in m.__dict__:
            m.__dict__["_qdec_prefill"] = rule


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
            raise QDECError(f"{str(out / fname)!r} already exists; pass overwrite=True to "
                            "replace it")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for n, s in states.items():
        tensors[f"{n}.codes"] = s.codes_t.cpu().contiguous()
        tensors[f"{n}.scale"] = s.scale.cpu().contiguous()
    save_file(tensors, str(out / QDEC_WEIGHTS))
    meta = {"version": 3, "config": model.qdec_config.to_dict(),
            "layers": {n: [s.codes_t.shape[0], s.d_out] for n, s in states.items()},
            "fingerprint": qdec_fingerprint(model)}
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
        if not isinstance(meta, dict) or not isinstance(meta.get("layers"), dict) \
                or not isinstance(meta.get("config"), dict):
            raise ValueError("expected an object with 'config' and 'layers'")
        QDECConfig.from_dict(meta["config"])
    except FileNotFoundError:
        raise QDECError(f"{str(directory)!r} holds no {QDEC_CONFIG} (written by save_qdec)"
                        ) from None
    except (ValueError, KeyError, TypeError, RecursionError, OSError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise QDECError(f"{str(path)!r} is not a valid QDEC config ({reason}); delete the "
                        "qdec.* files to recompute the residuals") from None
    return meta


def load_qdec(model: nn.Module, directory: str | Path,
              config: QDECConfig | Mapping[str, Any] | None = None) -> nn.Module:
    """Attach the residuals saved by ``save_qdec`` (not recomputed). ``config`` may change
    ``k_chunk``, ``residual_device`` and ``prefill``; ``residual_bits`` is the saved one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    meta = read_qdec_meta(d)
    saved, shapes = QDECConfig.from_dict(meta["config"]), meta["layers"]
    config = QDECConfig.from_dict(config) if config is not None else saved
    if config.residual_bits != saved.residual_bits:
        raise QDECError(f"qdec.residual_bits {config.residual_bits} differs from the saved "
                        f"residuals' {saved.residual_bits} in {str(d)!r}")
    layers = dict(_layers_or_raise(model))
    if set(layers) != set(shapes):
        missing = sorted(set(shapes) ^ set(layers))
        raise QDECError(f"{str(d)!r}: saved QDEC layers do not match the model's quantised "
                        f"linears (first difference: {missing[0]!r})")
    if meta.get("fingerprint") != qdec_fingerprint(model):
        raise QDECError(f"{str(d)!r}: the saved QDEC residuals were computed from other "
                        "weights or another weight quantiser than this model's; recompute "
                        "them (attach_qdec) or delete the qdec.* files")
    try:
        tensors = load_file(str(d / QDEC_WEIGHTS))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise QDECError(f"{str(d / QDEC_WEIGHTS)!r}: cannot be read ({e})") from None
    for name, m in layers.items():
        codes, scale = tensors.get(f"{name}.codes"), tensors.get(f"{name}.scale")
        d_in, d_out = layer_shape(m)
        # version 1 files hold int8 codes only; version 2 packs residuals of <= 4 bits
        want = (d_in, (d_out + 1) // 2) if codes is not None and codes.dtype == torch.uint8 \
            else (d_in, d_out)
        if codes is None or scale is None or tuple(codes.shape) != want \
                or tuple(scale.shape) != (d_out,) or codes.dtype not in (torch.int8, torch.uint8):
            raise QDECError(f"{str(d / QDEC_WEIGHTS)!r}: layer {name!r} is missing or has the "
                            f"wrong shape (expected codes {list(want)})")
    for name, m in layers.items():
        _install(model, name, m, tensors[f"{name}.codes"], tensors[f"{name}.scale"], config)
    model.qdec_config = config
    return model


def check_quant_for_qdec(quant: Any, qdec: QDECConfig | None) -> None:
    """Before any work: QDEC asked for on a quant config without weight quantisation."""
    if qdec is None:
        return
    weights = quant is not None and (quant.weight is not None or any(
        (o or {}).get("weight") is not None for o in quant.overrides.values()))
    if not weights:
        raise QDECError("qdec needs quantised weights, but quant.weight is null (the model's "
                        "weights stay float); set quant.weight, e.g. {format: bfp, width: 3}")


def apply_qdec(model: nn.Module, config: QDECConfig | None, model_dir: str | Path | None
               ) -> QDECConfig | None:
    """What the commands do: residuals saved in ``model_dir`` (by ``save_qdec``, same
    ``residual_bits``) are loaded, others computed; a saved QDEC is used even without a
    ``qdec`` section (with its saved settings). Returns the config in use (None: no QDEC)."""
    saved = model_dir is not None and has_saved_qdec(model_dir)
    if saved:
        meta = read_qdec_meta(model_dir)
        if meta.get("fingerprint") != qdec_fingerprint(model):
            # a retrained model or another quantiser: those residuals would be wrong
            logger.warning("%s: the saved QDEC residuals belong to other weights or another "
                           "weight quantiser; recomputing them", model_dir)
            config = config if config is not None else QDECConfig.from_dict(meta["config"])
        elif config is None or config.residual_bits == meta["config"].get("residual_bits"):
            load_qdec(model, model_dir, config)
            return model.qdec_config
    if config is None:
        return None
    attach_qdec(model, config)
    return config
