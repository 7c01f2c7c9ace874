"""Build and load qat's C++ CPU kernels at first use (``torch.utils.cpp_extension``).

Each kernel is one source file under a ``csrc/`` folder that registers its ops with
``TORCH_LIBRARY``; ``build(name, source)`` compiles it once per machine and source (cached
under ``$TORCH_EXTENSIONS_DIR``, about 15 s on 2 cores), with the vector ISA flags of the
kernels ATen itself runs here (AVX512 or AVX2), OpenMP (``at::parallel_for`` is serial in a
unit built without it) and no contraction into fused multiply-adds (ATen's own vectorised
kernels do not contract, and the results must match theirs bit for bit); ``csrc/*.h`` here
are on the include path of every kernel. Where it cannot be built (no C++ compiler or
``ninja``) it returns False after one warning, and the caller takes its PyTorch path.

Locking: torch guards a build folder with a bare lock file that it waits on for as long as the
file exists, so a build killed half-way (kill -9, the OOM killer, a preempted job) would make
every later process wait forever. ``build`` first takes qat's own lock on the folder, an
``flock`` that the system releases when its holder dies; holding it, no other qat process is
building there, so a torch lock file found then was left by a killed build and is removed. A
process that holds qat's lock longer than ``$QAT_CPU_BUILD_TIMEOUT`` seconds (default 600: a
build takes seconds to a minute) is not waited for: the caller's PyTorch path runs, after one
warning.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Headers shared by the kernels (bfp_scale.h: the BFP exponent rule), on every include path.
INCLUDE = Path(__file__).parent / "csrc"
TIMEOUT_ENV = "QAT_CPU_BUILD_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
LOCK_FILE = "qat_build.lock"  # qat's lock, beside torch's "lock" in the build folder
TORCH_LOCK_FILE = "lock"  # torch.utils.cpp_extension's (a FileBaton)

_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


class BuildLockTimeout(RuntimeError):
    """Another live process held a kernel's build lock longer than the timeout."""


def extension_name(name: str, source: Path) -> str:
    """The cached extension's name: ``name``, the ISA and a digest of the source and the shared
    headers (cpp_extension itself hashes sources only, so a header change is a new name)."""
    digest = hashlib.sha256(Path(source).read_bytes())
    for header in sorted(INCLUDE.glob("*.h")):
        digest.update(header.read_bytes())
    cap = torch.backends.cpu.get_cpu_capability()
    return f"{name}_{cap.lower()}_{digest.hexdigest()[:10]}"


def build_directory(ext_name: str) -> Path:
    """The build folder of extension ``ext_name``: torch's own choice for it (under
    ``$TORCH_EXTENSIONS_DIR`` or torch's cache folder)."""
    from torch.utils import cpp_extension

    return Path(cpp_extension._get_build_directory(ext_name, verbose=False))


def build_timeout() -> float:
    """Seconds to wait for another process's build (``$QAT_CPU_BUILD_TIMEOUT``)."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        logger.warning(
            "qat: %s=%r is not a number of seconds >= 0; waiting up to %.0f s",
            TIMEOUT_ENV,
            raw,
            DEFAULT_TIMEOUT_S,
        )
        return DEFAULT_TIMEOUT_S
    return value


@contextlib.contextmanager
def build_lock(directory: Path, timeout: float) -> Iterator[None]:
    """Hold qat's lock on a build folder (an ``flock``, released by the system when its holder
    dies, kill -9 included), then remove a torch lock file a killed build left there. Raises
    ``BuildLockTimeout`` when another process holds it for more than ``timeout`` seconds."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "a+") as f:
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                f.seek(0)
                owner = f.read().strip() or "?"
                if time.monotonic() >= deadline:
                    raise BuildLockTimeout(
                        f"process {owner} has held the build lock {str(f.name)!r} for more "
                        f"than {timeout:g} s (${TIMEOUT_ENV})"
                    ) from None
                if not waited:
                    logger.info("qat: waiting for process %s's build in %s", owner, directory)
                    waited = True
                time.sleep(0.1)
        try:
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            stale = directory / TORCH_LOCK_FILE
            if stale.exists():  # no other qat process builds here now: a killed build's
                logger.warning("qat: removing %s, left by a build that was killed", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@functools.cache
def build(name: str, source: Path) -> bool:
    """Compile (or find in the cache) and load ``source`` as extension ``name``; False, with
    one warning, where it cannot be built here (or another process's build holds its lock
    beyond ``$QAT_CPU_BUILD_TIMEOUT``)."""
    try:
        from torch.utils import cpp_extension

        cap = torch.backends.cpu.get_cpu_capability()
        flags = ["-O3", "-fopenmp", "-ffp-contract=off", *_ISA_FLAGS.get(cap, [])]
        if cap in _ISA_FLAGS:
            flags.append(f"-DCPU_CAPABILITY_{cap}")
        ext = extension_name(name, source)
        directory = build_directory(ext)
        logger.info("qat: loading the CPU kernel %s (built once per machine, ~15 s)", name)
        with build_lock(directory, build_timeout()):
            cpp_extension.load(
                name=ext,
                sources=[str(source)],
                extra_include_paths=[str(INCLUDE)],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                build_directory=str(directory),
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
