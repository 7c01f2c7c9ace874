"""``qat export``: write a quantised model in its packed form (safetensors + config.json).

    qat export recipes/minilm_sst2.yaml --out exported/minilm_w4
    qat export outputs/minilm_sst2 --out exported/minilm_qat

Each quantised linear's weight is stored as its format's integer codes, bit-packed, plus its
shared scales: BFP as ``width``-bit mantissas + ``exponent_width``-bit exponents, OCP MX as
element codes + E8M0 exponents, codebook formats (NF4, AF4, BOF4, BOF4-S) as 4-bit level
indices + per-block scales (+ OPQ outlier positions and bf16 values). Everything else stays
float. ``config.json`` gets a ``quantization_config`` with ``quant_method: qat``; after
``import qat`` (see ``qat.hf_quantizer``) ``AutoModelFor...from_pretrained(dir)`` unpacks the
codes and rebuilds the fake-quantised model. Unpacking repeats the format's own float32
arithmetic, so the rebuilt weights are bit-identical to ``fmt.quantize(w)``.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qat.eval_cmd import CommandError, run_cli, split_options
from qat.formats import Format
from qat.formats.base import from_blocks, to_blocks

QUANT_METHOD = "qat"
PACK_VERSION = 1
USAGE = """usage: qat export RECIPE.yaml|CHECKPOINT_DIR --out DIR [--key value ...]

Writes DIR/model.safetensors (packed codes + scales; float for unquantised modules),
DIR/config.json with quantization_config {quant_method: qat, ...} and the tokenizer.
Load it back with `import qat` then AutoModelForSequenceClassification.from_pretrained(DIR).
Recipe keys override the recipe (or the checkpoint's recipe.yaml), e.g. --quant.weight.width 6.
--device D  where the model is loaded: cpu, cuda, cuda:N or auto (default)"""


class ExportError(ValueError):
    """A model or format that cannot be written in packed form."""


# --- bit packing ----------------------------------------------------------------------------


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Unsigned integer codes (< 2^bits) -> a little-endian bit stream in uint8."""
    c = codes.reshape(-1).to(torch.int64).numpy()
    if bits == 8:
        return torch.from_numpy(c.astype(np.uint8))
    planes = ((c[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_bits(stream: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of ``pack_bits``: ``count`` codes as int64."""
    s = stream.numpy()
    if bits == 8:
        return torch.from_numpy(s[:count].astype(np.int64))
    planes = np.unpackbits(s, count=count * bits, bitorder="little").reshape(count, bits)
    return torch.from_numpy((planes.astype(np.int64) << np.arange(bits)).sum(-1))


# --- per-family packers: (fmt, blocked float32 [rows, nblocks, B]) -> tensors, and back -------

Packed = dict[str, Tensor]


def _pack_bfp(fmt: Any, xb: Tensor, n: int) -> Packed:
    from qat.formats.bfp import bfp_mantissas

    m_bits = fmt.width - 1
    mant, e, _ = bfp_mantissas(from_blocks(xb, n), fmt.width, fmt.exponent_width, fmt.block_size)
    mant = mant.to(torch.int64)
    bias = 2 ** (fmt.exponent_width - 1) - 1
    return {"codes": pack_bits(mant + 2**m_bits, fmt.width),
            "exponents": pack_bits(e.to(torch.int64) + bias, fmt.exponent_width)}


def _unpack_bfp(fmt: Any, t: Packed, shape: tuple[int, int, int]) -> Tensor:
    rows, nb, bs = shape
    m_bits = fmt.width - 1
    mant = unpack_bits(t["codes"], fmt.width, rows * nb * bs) - 2**m_bits
    e = unpack_bits(t["exponents"], fmt.exponent_width, rows * nb)
    e = e - (2 ** (fmt.exponent_width - 1) - 1)
    scale = torch.exp2((e.reshape(rows, nb).to(torch.int32) - m_bits).float()).unsqueeze(-1)
    return mant.reshape(shape).float() * scale


def _mx_magnitudes(fmt: Any) -> Tensor:
    """Every non-negative value of an MX element format, ascending (< 2^(bits-1) of them)."""
    if fmt.name == "mxint8":
        return torch.arange(128, dtype=torch.float32) / 64.0
    m, emin = fmt.mantissa_bits, fmt.emin
    sub = [k * 2.0 ** (emin - m) for k in range(2**m)]
    normals = [2.0**e * (1 + k / 2**m) for e in range(emin, fmt.emax + 1) for k in range(2**m)]
    return torch.tensor(sub + [v for v in normals if v <= fmt.max_value], dtype=torch.float32)


def _pack_mx(fmt: Any, xb: Tensor, n: int) -> Packed:
    from qat.formats.mx import E8M0_MIN, mx_scale_exponent

    e = mx_scale_exponent(xb.abs().amax(dim=-1), fmt.emax)
    elems = fmt._round_elements(xb / torch.exp2(e.float()).unsqueeze(-1))
    mags = _mx_magnitudes(fmt)
    idx = torch.searchsorted(mags, elems.abs())
    if not torch.equal(mags[idx.clamp(max=len(mags) - 1)], elems.abs()):
        raise ExportError(f"{fmt.name}: an element is not on the format's grid")
    sign = (elems < 0).to(torch.int64) << (fmt.elem_bits - 1)
    return {"codes": pack_bits(idx + sign, fmt.elem_bits),
            "exponents": pack_bits(e.to(torch.int64) - E8M0_MIN, 8)}  # E8M0 code = e + 127


def _unpack_mx(fmt: Any, t: Packed, shape: tuple[int, int, int]) -> Tensor:
    from qat.formats.mx import E8M0_MIN

    rows, nb, bs = shape
    code = unpack_bits(t["codes"], fmt.elem_bits, rows * nb * bs)
    half = 1 << (fmt.elem_bits - 1)
    mag = _mx_magnitudes(fmt)[code % half]
    elems = torch.where(code >= half, -mag, mag).reshape(shape)
    e = unpack_bits(t["exponents"], 8, rows * nb) + E8M0_MIN
    return elems * torch.exp2(e.reshape(rows, nb).float()).unsqueeze(-1)


def _pack_codebook(fmt: Any, xb: Tensor, n: int) -> Packed:
    from qat.formats.codebook import level_tensors

    out: Packed = {}
    if fmt.outliers == "opq":
        from qat.formats.opq import split_outliers

        xb, mask, kept = split_outliers(xb, n, fmt.outlier_quantile)
        flat = mask.reshape(-1).nonzero().reshape(-1)
        out["outlier_index"] = flat.to(torch.int32)
        out["outlier_values"] = kept.reshape(-1)[flat].to(torch.bfloat16)
    _, mids = level_tensors(fmt.levels, xb.device)
    if fmt.normalization == "absmax":
        s = xb.abs().amax(dim=-1, keepdim=True)
    else:
        s = xb.gather(-1, xb.abs().argmax(dim=-1, keepdim=True))
    safe = torch.where(s == 0, torch.ones_like(s), s)
    code = torch.bucketize(xb / safe, mids, right=True)
    code = torch.where(s == 0, torch.full_like(code, fmt.levels.index(0.0)), code)
    out["codes"] = pack_bits(code, 4)
    # The format computes with a float32 scale; keep 16 bits only where that is exact.
    for dt in (torch.float16, torch.bfloat16):
        if torch.equal(s.to(dt).float(), s):
            out["scales"] = s.reshape(-1).to(dt)
            break
    else:
        out["scales"] = s.reshape(-1)
    return out


def _unpack_codebook(fmt: Any, t: Packed, shape: tuple[int, int, int]) -> Tensor:
    from qat.formats.codebook import level_tensors

    rows, nb, bs = shape
    lv, _ = level_tensors(fmt.levels, torch.device("cpu"))
    code = unpack_bits(t["codes"], 4, rows * nb * bs).reshape(shape)
    s = t["scales"].float().reshape(rows, nb, 1)
    q = torch.where(s == 0, torch.zeros(shape), lv[code] * s)
    if "outlier_index" in t:
        q = q.reshape(-1).clone()
        q[t["outlier_index"].long()] = t["outlier_values"].float()
        q = q.reshape(shape)
    return q


def _packers() -> dict[str, tuple[Callable, Callable]]:
    from qat.formats import FORMATS

    table: dict[str, tuple[Callable, Callable]] = {"bfp": (_pack_bfp, _unpack_bfp)}
    for name, cls in FORMATS.items():
        mod = cls.__module__.rsplit(".", 1)[-1]
        if mod == "mx":
            table[name] = (_pack_mx, _unpack_mx)
        elif mod == "codebook":
            table[name] = (_pack_codebook, _unpack_codebook)
    return table


def _packer(fmt: Format) -> tuple[Callable, Callable]:
    table = _packers()
    if fmt.name not in table:
        raise ExportError(f"packed export not supported for format {fmt.name!r} yet; "
                          f"supported: {', '.join(sorted(table))}")
    return table[fmt.name]


def pack_weight(fmt: Format, w: Tensor, dim: int) -> tuple[Packed, dict[str, Any]]:
    """Packed tensors of ``w`` blocked along ``dim``, and the metadata to unpack them."""
    pack, _ = _packer(fmt)
    x = w.detach().float().cpu().movedim(dim, -1).contiguous()
    rows = x.reshape(-1, x.shape[-1])
    xb, n = to_blocks(rows, getattr(fmt, "block_size", rows.shape[-1]))
    tensors = pack(fmt, xb, n)
    meta = {"format": fmt.spec(), "shape": list(w.shape), "dim": dim,
            "dtype": str(w.dtype).removeprefix("torch."), "blocks": list(xb.shape),
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                        for k, v in tensors.items()}}
    return tensors, meta


def unpack_weight(meta: dict[str, Any], tensors: Packed) -> Tensor:
    """Rebuild the fake-quantised weight from ``pack_weight``'s output (bit-exact)."""
    from qat.formats import make_format

    fmt = make_format(meta["format"])
    _, unpack = _packer(fmt)
    shape = [int(s) for s in meta["shape"]]
    dim = int(meta["dim"])
    moved = list(shape)
    moved.append(moved.pop(dim % len(shape)))
    q = from_blocks(unpack(fmt, {k: v.cpu() for k, v in tensors.items()},
                           tuple(meta["blocks"])), moved[-1])
    return q.reshape(moved).movedim(-1, dim).to(getattr(torch, meta["dtype"]))


# --- writing --------------------------------------------------------------------------------


def packed_state_dict(model: torch.nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The model's state dict with every quantised weight replaced by its packed tensors."""
    from tqdm.auto import tqdm

    from qat.modules import QuantConv1D, QuantLinear

    state = model.state_dict()
    packed: dict[str, Any] = {}
    mods = [(n, m) for n, m in model.named_modules()
            if isinstance(m, (QuantLinear, QuantConv1D)) and m.weight_quantizer is not None]
    for name, m in tqdm(mods, desc="packing", unit="layer"):
        wq = m.weight_quantizer
        tensors, meta = pack_weight(wq.fmt, m.weight, wq.dim)
        meta["kind"] = "conv1d" if isinstance(m, QuantConv1D) else "linear"
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
    return out, packed


def export_model(model: torch.nn.Module, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write ``model`` (fake-quantised by ``quantize_model``) packed to ``out_dir``."""
    from safetensors.torch import save_file

    if hasattr(model, "merge_and_unload"):  # LoRA: W + BA is what the quantiser sees
        model = model.merge_and_unload()
    quant = getattr(model, "qat_quant_config", None)
    if quant is None:
        raise ExportError("the model is not quantised (quant: null): nothing to pack; set a "
                          "quant section or --quant.weight ...")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    state, packed = packed_state_dict(model)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.quantization_config = {"quant_method": QUANT_METHOD, "version": PACK_VERSION,
                                  "quant": quant.to_dict(), "packed": packed}
    config.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def run(path: str, argv: list[str]) -> dict[str, Any]:
    from qat.density import density_report
    from qat.eval_cmd import load_model, resolve_source
    from qat.glue import get_task
    from qat.models import resolve_device

    opts, overrides = split_options(argv, {"out": str, "device": str})
    if not opts.get("out"):
        raise CommandError("--out DIR is required")
    src = resolve_source(path, overrides)
    task = get_task(src.recipe.args.task_name)
    device = resolve_device(opts.get("device"), src.recipe.training_args.use_cpu)
    model, tokenizer = load_model(src, task.num_labels, device)
    out = export_model(model, opts["out"], tokenizer)
    density = density_report(model)
    print(density.format(per_layer=False))
    size = (out / "model.safetensors").stat().st_size
    info = {"out": str(out), "weight_file_bytes": size, "density": density.to_dict()}
    (out / "qat_export.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv: list[str] | None = None) -> int:
    def body(argv: list[str]) -> None:
        info = run(argv[0], argv[1:])
        print(f"qat export: wrote {info['out']} (model.safetensors: "
              f"{info['weight_file_bytes'] / 2**20:.2f} MiB)")

    return run_cli("export", USAGE, argv, body, (ExportError,))


if __name__ == "__main__":
    sys.exit(main())
