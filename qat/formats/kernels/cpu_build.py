"""Build and load qat's C++ CPU kernels at first use (``torch.utils.cpp_extension``).

Each kernel is one source file under a ``csrc/`` folder that registers its ops with
``TORCH_LIBRARY``; ``build(name, source)`` compiles it once per machine and source (cached
under ``$TORCH_EXTENSIONS_DIR``, about 15 s on 2 cores), with the vector ISA flags of the
kernels ATen itself runs here (AVX512 or AVX2), OpenMP (``at::parallel_for`` is serial in a
unit built without it) and no contraction into fused multiply-adds (ATen's own vectorised
kernels do not contract, and the results must match theirs bit for bit); ``csrc/*.h`` here
are on the include path of every kernel. Where it cannot be built (no C++ compiler or
``ninja``) it returns False after one warning, and the caller takes its PyTorch path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Headers shared by the kernels (bfp_scale.h: the BFP exponent rule), on every include path.
INCLUDE = Path(__file__).parent / "csrc"

_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


@functools.cache
def build(name: str, source: Path) -> bool:
    """Compile (or find in the cache) and load ``source`` as extension ``name``; False, with
    one warning, where it cannot be built here."""
    try:
        from torch.utils import cpp_extension

        cap = torch.backends.cpu.get_cpu_capability()
        flags = ["-O3", "-fopenmp", "-ffp-contract=off", *_ISA_FLAGS.get(cap, [])]
        if cap in _ISA_FLAGS:
            flags.append(f"-DCPU_CAPABILITY_{cap}")
        # the build cache is keyed on the name: a digest of the source and the shared headers
        # makes any change to either a new build (cpp_extension itself hashes sources only)
        digest = hashlib.sha256(Path(source).read_bytes())
        for header in sorted(INCLUDE.glob("*.h")):
            digest.update(header.read_bytes())
        logger.info("qat: loading the CPU kernel %s (built once per machine, ~15 s)", name)
        cpp_extension.load(
            name=f"{name}_{cap.lower()}_{digest.hexdigest()[:10]}",
            sources=[str(source)],
            extra_include_paths=[str(INCLUDE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        return True
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a failed build: fall back
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        logger.warning(
            "qat: the CPU kernel %s could not be built (%s); its PyTorch path runs instead",
            name,
            first,
        )
        return False
