"""The C++ BFP quantiser of ``backend: compile`` on CPU (qat.formats.kernels.cpu): equal bit for
bit to the reference ``BFP.quantize`` (signs of zero, subnormals, clamped exponents, non-finite
values included), and where it steps aside."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import qat.formats.kernels.cpu as cpu
import qat.formats.kernels.cpu_build as cpu_build
import qat.quant.backends as backends
from qat.formats import make_format
from qat.quant.backends import fake_quantize


@pytest.fixture(autouse=True)
def kernel_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpu.ENV, raising=False)
    assert cpu.load(), "the CPU BFP kernel did not build"


def _hostile(rows: int, block: int, seed: int) -> torch.Tensor:
    """Gaussian blocks at scales from 2^-150 to 2^127, with hand-placed special values."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-150, 128, (rows, 1), generator=g).float())
    x = torch.randn(rows, block, generator=g) * scale
    specials = [
        (0, 0, float("nan")),
        (1, block - 1, float("inf")),
        (2, 0, -float("inf")),
        (4, 0, -1e-30),  # rounds to -0.0 beside a large value
        (4, block - 1, 1.0),
        (6, 0, 1.5 * 2.0**127),  # the exponent clamps at its top
        (7, 0, 2.0**-3),  # an exact power of two: the block max saturates
    ]
    x[3] = -0.0  # -0.0 gives +0.0 (sign(-0.0) = 0)
    x[5] = 1e-41  # subnormal block
    x[8] = -1e-45
    x[9] = 0.0
    for r, c, v in specials:
        x[r, c] = v
    return x


SPECS = [
    {"format": "bfp", "width": 4, "exponent_width": 8, "block_size": 16},  # AVX512 path
    {"format": "bfp", "width": 3, "exponent_width": 3, "block_size": 16},  # clamped exponents
    {"format": "bfp", "width": 8, "exponent_width": 8, "block_size": 32},  # vector path
    {"format": "bfp", "width": 6, "exponent_width": 5, "block_size": 8},
    {"format": "bfp", "width": 2, "exponent_width": 2, "block_size": 5},  # scalar path
    {"format": "bfp", "width": 24, "exponent_width": 8, "block_size": 16},
    {"format": "bfp", "width": 5, "exponent_width": 1, "block_size": 64},
]


@pytest.mark.parametrize(
    "spec", SPECS, ids=lambda s: f"w{s['width']}e{s['exponent_width']}b{s['block_size']}"
)
def test_kernel_equals_the_reference_bit_for_bit(spec):
    fmt = make_format(spec)
    x = _hostile(3000, fmt.block_size, seed=fmt.block_size + fmt.width)
    got = cpu.cpu_quantize_blocks(x, fmt)
    want = fmt.quantize(x, -1)
    same = got.view(torch.int32) == want.view(torch.int32)
    assert same.all(), (int((~same).sum()), x[~same][:4], got[~same][:4], want[~same][:4])
    assert got[3].eq(0).all() and not got[3].signbit().any()  # -0.0 -> +0.0
    assert got[4, 0].item() == 0.0 and got[4, 0].signbit()  # -1e-30 -> -0.0
    assert got[0, 0].isnan() and got[1, -1].item() == float("inf")


@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_compile_backend_runs_the_kernel_for_bfp_on_float32(dim, monkeypatch):
    calls: list[tuple[int, ...]] = []
    inner = backends.cpu_quantize_blocks

    def counted(blocks, fmt):
        calls.append(tuple(blocks.shape))
        return inner(blocks, fmt)

    monkeypatch.setattr(backends, "cpu_quantize_blocks", counted)
    fmt = make_format({"format": "bfp", "width": 4, "block_size": 16})
    x = torch.randn(37, 70, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    y = fake_quantize(x, fmt, dim, "compile")
    assert calls and calls[0][1] == 16
    assert torch.equal(
        y.detach().view(torch.int32), fmt.quantize(x.detach(), dim).view(torch.int32)
    )
    y.backward(torch.ones_like(y))  # straight through
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("case", ["bf16", "mse", "env", "not_built", "other_format"])
def test_other_cases_keep_the_compiled_graph(case, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the C++ kernel ran")

    monkeypatch.setattr(backends, "cpu_quantize_blocks", refuse)
    spec = {"format": "bfp", "width": 4, "block_size": 16}
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    if case == "bf16":
        x = x.bfloat16()
    elif case == "mse":
        spec = {**spec, "scale": "mse"}
    elif case == "env":
        monkeypatch.setenv(cpu.ENV, "0")
    elif case == "not_built":
        monkeypatch.setattr(cpu, "load", lambda: False)
    else:
        spec = {"format": "mxfp8_e4m3"}
    fmt = make_format(spec)
    y = fake_quantize(x, fmt, -1, "compile")
    assert torch.equal(y, fmt.quantize(x, -1))


def test_the_op_checks_its_own_inputs():
    op = torch.ops.qat_cpu_formats.bfp_quantize
    x = torch.randn(4, 16)
    for args, words in (
        ((x.double(), 3, -127, 128), "float32 CPU tensor [blocks, B]"),
        ((x.reshape(64), 3, -127, 128), "float32 CPU tensor [blocks, B]"),
        ((x, 40, -127, 128), "format out of range (m_bits 40"),  # 2^40 steps: no float format
        ((x, 3, 5, 1), "exponents [5, 1]"),
    ):
        with pytest.raises(RuntimeError) as info:
            op(*args)
        message = str(info.value).strip()
        assert words in message and len(message.splitlines()) == 1, message


@pytest.fixture()
def recheck():
    """The kernels' first-use check runs again in the test (and after it, for the next)."""
    cpu.load.cache_clear()
    yield
    cpu.load.cache_clear()


def test_a_kernel_that_differs_from_the_reference_is_not_used(recheck, monkeypatch, caplog):
    # what a torch upgrade that changes the ATen vector code under the kernel would look like:
    # one value off by one ulp
    inner = cpu.cpu_quantize_blocks

    def off_by_one_ulp(blocks, fmt):
        out = inner(blocks, fmt)
        out.view(-1)[7] = torch.nextafter(out.view(-1)[7], torch.tensor(float("inf")))
        return out

    monkeypatch.setattr(cpu, "cpu_quantize_blocks", off_by_one_ulp)
    with caplog.at_level("WARNING", logger="qat.formats.kernels.cpu"):
        assert not cpu.load()
        fmt = make_format({"format": "bfp", "width": 4, "block_size": 16})
        x = torch.randn(8, 32)
        assert not cpu.cpu_supports(fmt, x)
        assert torch.equal(fake_quantize(x, fmt, -1, "compile"), fmt.quantize(x, -1))
        assert not cpu.load()  # cached: checked and warned once
    warnings = [r for r in caplog.records if "differs from the reference" in r.message]
    assert len(warnings) == 1 and "compiled graph runs instead" in warnings[0].message


# --- the build lock: a killed or stuck build never makes a later command wait forever -------


def _torch_like_load(loaded: list[str]):
    """cpp_extension.load's locking as torch 2.x does it (a FileBaton on the build folder's
    ``lock`` file, waited on for as long as that file exists), without compiling."""
    from torch.utils import cpp_extension
    from torch.utils.file_baton import FileBaton

    def load(name, sources, build_directory=None, **kwargs):
        directory = build_directory or cpp_extension._get_build_directory(name, False)
        baton = FileBaton(os.path.join(directory, "lock"))
        if baton.try_acquire():
            baton.release()
            loaded.append(name)
        else:
            baton.wait()

    return load


def _build_in_thread(seconds: float) -> list[bool]:
    """``build`` of the BFP kernel, uncached, in a thread given ``seconds`` to finish."""
    result: list[bool] = []
    worker = threading.Thread(
        target=lambda: result.append(cpu_build.build.__wrapped__("qat_bfp_cpu", cpu.SOURCE)),
        daemon=True,
    )
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "the build waited on a lock and never returned"
    return result


@pytest.fixture()
def own_extensions_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    return tmp_path


def test_a_lock_left_by_a_killed_build_is_taken_over(own_extensions_dir, monkeypatch, caplog):
    from torch.utils import cpp_extension

    loaded: list[str] = []
    monkeypatch.setattr(cpp_extension, "load", _torch_like_load(loaded))
    ext = cpu_build.extension_name("qat_bfp_cpu", cpu.SOURCE)
    folder = Path(cpp_extension._get_build_directory(ext, False))
    assert folder.is_relative_to(own_extensions_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lock").touch()  # torch's lock of a build killed half-way (kill -9, OOM)
    with caplog.at_level("WARNING", logger="qat.formats.kernels.cpu_build"):
        assert _build_in_thread(30) == [True]
    assert loaded == [ext] and not (folder / "lock").exists()
    assert "left by a build that was killed" in caplog.text


_HOLDER = """
import fcntl, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.seek(0); f.truncate(); f.write(str(os.getpid())); f.flush()
print("held", flush=True)
time.sleep(60)
"""


def _hold_build_lock(folder: Path) -> subprocess.Popen:
    """A live process that holds qat's build lock of ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder / cpu_build.LOCK_FILE)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_build_held_by_a_live_process_is_not_waited_for_past_the_timeout(
    own_extensions_dir, monkeypatch, caplog
):
    from torch.utils import cpp_extension

    loaded: list[str] = []
    monkeypatch.setattr(cpp_extension, "load", _torch_like_load(loaded))
    monkeypatch.setenv(cpu_build.TIMEOUT_ENV, "0.5")
    ext = cpu_build.extension_name("qat_bfp_cpu", cpu.SOURCE)
    holder = _hold_build_lock(cpu_build.build_directory(ext))
    try:
        with caplog.at_level("WARNING", logger="qat.formats.kernels.cpu_build"):
            assert _build_in_thread(30) == [False]  # the PyTorch path, after one warning
        assert not loaded
        (line,) = [r.message for r in caplog.records if "could not be built" in r.message]
        assert f"process {holder.pid} has held the build lock" in line
        assert "QAT_CPU_BUILD_TIMEOUT" in line
        # the holder is killed (kill -9): the system drops its lock, the next build runs
        holder.kill()
        holder.wait()
        assert _build_in_thread(30) == [True] and loaded == [ext]
    finally:
        holder.kill()
        holder.wait()
