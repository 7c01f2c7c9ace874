"""Fused Triton quantisers vs the reference vs the copy-bandwidth floor, on one GPU.

    python bench/kernel_speed.py [--size 4096] [--iters 50] [--json PATH]

For a ``size x size`` tensor in bfloat16 and float32, blocked along the last and the first dim,
and every format with a kernel (``supports_triton``), times with CUDA events: the kernel
(``triton_fake_quantize``), the reference (``fmt.quantize``) and the floor, the time of
``x.clone()`` (one read and one write, the least any fake-quantiser must move). Prints a table
with the kernel's ratio to the floor and whether its output equals the reference bit for bit.
Without CUDA it says that kernels need a GPU and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import torch

from qat.formats import FORMATS, Format, make_format
from qat.formats.kernels import supports_triton, triton_available, triton_fake_quantize

EXTRA_SPECS = [{"format": "bfp", "width": w} for w in (8, 6, 3)]


def kernel_formats() -> list[Format]:
    """Every registered format (defaults) that has a kernel, plus a few more BFP widths."""
    out = []
    for spec in [{"format": name} for name in sorted(FORMATS)] + EXTRA_SPECS:
        try:
            fmt = make_format(spec)
        except Exception:  # a format that needs parameters (e.g. a codebook file): skip it
            continue
        if supports_triton(fmt) and fmt not in out:
            out.append(fmt)
    return out


def time_ms(fn: Callable[[], object], iters: int) -> float:
    """Mean milliseconds per call, measured with CUDA events after a warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    iv = torch.int32 if a.dtype == torch.float32 else torch.int16
    return torch.equal(a.view(iv), b.view(iv))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4096, help="the tensor is size x size")
    ap.add_argument("--iters", type=int, default=50, help="timed calls per measurement")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernel_speed.py: the Triton kernels need a CUDA GPU; none here, nothing timed")
        return 0
    if not triton_available():
        print("bench/kernel_speed.py: triton is not installed; nothing timed")
        return 0
    dev = torch.cuda.get_device_name()
    print(f"{dev}, {args.size}x{args.size}, {args.iters} calls per time")
    head = (
        f"{'format':<12} {'dtype':<9} {'dim':>3} {'kernel ms':>10} {'ref ms':>9} "
        f"{'floor ms':>9} {'kern/floor':>10} {'ref/kern':>9} {'GB/s':>7}  exact"
    )
    print(head)
    print("-" * len(head))
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(args.size, args.size, device="cuda", generator=gen).to(dtype)
        nbytes = 2 * x.numel() * x.element_size()  # one read + one write
        floor = time_ms(x.clone, args.iters)
        for fmt in kernel_formats():
            for dim in (-1, 0):
                kern = time_ms(lambda x=x, f=fmt, d=dim: triton_fake_quantize(x, f, d), args.iters)
                ref = time_ms(lambda x=x, f=fmt, d=dim: f.quantize(x, d), max(3, args.iters // 5))
                exact = bits_equal(triton_fake_quantize(x, fmt, dim), fmt.quantize(x, dim))
                row = {
                    "format": str(fmt),
                    "name": fmt.name,
                    "dtype": str(dtype)[6:],
                    "dim": dim,
                    "kernel_ms": kern,
                    "reference_ms": ref,
                    "floor_ms": floor,
                    "kernel_over_floor": kern / floor,
                    "reference_over_kernel": ref / kern,
                    "kernel_gbps": nbytes / kern / 1e6,
                    "exact": exact,
                }
                rows.append(row)
                print(
                    f"{fmt.name:<12} {row['dtype']:<9} {dim:>3} {kern:>10.4f} {ref:>9.4f} "
                    f"{floor:>9.4f} {kern / floor:>10.2f} {ref / kern:>9.1f} "
                    f"{row['kernel_gbps']:>7.0f}  {'yes' if exact else 'NO'}"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev, "size": args.size, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
