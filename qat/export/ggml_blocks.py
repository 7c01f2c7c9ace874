"""A quantised weight as llama.cpp's block bytes (Q4_0, Q8_0, MXFP4), from its format's codes.

Byte layouts (ggml-common.h), one block per 32 elements of a row:

- Q8_0, 34 bytes: the fp16 scale ``d`` (little-endian), then 32 int8 codes;
- Q4_0, 18 bytes: ``d`` (fp16), then 16 bytes whose low nibble is code ``j`` and high nibble
  code ``j + 16``;
- MXFP4, 17 bytes: the E8M0 exponent byte, then 16 bytes of 4-bit E2M1 codes (sign in bit 3),
  nibbles laid out as Q4_0's. ggml stores zero as code 0, so a negative zero is written +0.

The codes are the format's own (``Format.encode``); nothing is re-quantised here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from qat.errors import QatError
from qat.formats import Format

# qat format name -> GGML type name (gguf.GGMLQuantizationType member).
GGML_TYPES = {"ggml_q4_0": "Q4_0", "ggml_q8_0": "Q8_0", "mxfp4": "MXFP4"}


class GGMLTypeError(QatError):
    """A format or shape llama.cpp's block types cannot hold."""


def ggml_type_name(fmt: Format | None, what: str = "format") -> str:
    """The GGML type that holds ``fmt`` (a ``what``: "format", "weight format") exactly;
    GGMLTypeError naming the ones that exist."""
    name = None if fmt is None else GGML_TYPES.get(fmt.name)
    if name is None or getattr(fmt, "block_size", 32) != 32:
        got = f"no {what}" if fmt is None else f"{what} {fmt}"
        raise GGMLTypeError(
            f"{got} has no GGML type; formats with one: "
            + ", ".join(f"{k} ({v})" for k, v in GGML_TYPES.items())
            + " (mxfp4 with block_size 32)"
        )
    return name


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """``[nblocks, 32]`` codes < 16 -> ``[nblocks, 16]`` bytes (low: j, high: j + 16)."""
    c = codes.astype(np.uint8)
    return c[:, :16] | (c[:, 16:] << np.uint8(4))


def ggml_block_bytes(fmt: Format, weight: Tensor) -> np.ndarray:
    """``weight`` ([rows, cols], cols a multiple of 32) quantised by ``fmt`` along its last dim,
    as a ``[rows, cols // 32 * block_bytes]`` uint8 array of llama.cpp blocks."""
    kind = ggml_type_name(fmt)
    rows, cols = weight.shape
    if cols % 32:
        raise GGMLTypeError(f"a {kind} row needs a multiple of 32 elements, got {cols}")
    enc = fmt.encode(weight.detach().float().cpu(), dim=-1)
    codes = enc.codes.reshape(-1, 32).numpy()
    if kind == "MXFP4":
        codes = np.where(codes & 7 == 0, 0, codes)  # one zero code, as ggml writes
        head = (enc.scales.reshape(-1, 1).to(torch.int64) + 127).numpy().astype(np.uint8)
        body = _nibbles(codes)
    else:
        head = enc.scales.reshape(-1).to(torch.float16).numpy().view(np.uint8).reshape(-1, 2)
        body = _nibbles(codes) if kind == "Q4_0" else codes.astype(np.int8).view(np.uint8)
    return np.concatenate([head, body], axis=1).reshape(rows, -1)
