"""Per-layer statistics of weights and activations, SQNR, plots, density.

For every linear layer (quantised or not): variance, max |x|, kurtosis (Pearson; 3 for a
Gaussian) of its weight and of its input activations over a few batches of the task's
validation text, and the SQNR ``10 log10(sum x^2 / sum (x - Q(x))^2)`` (``qat.quant.sqnr``) of
its configured weight and activation formats. The forward pass runs with every quantiser off,
so each layer's inputs are the float ones and each SQNR measures that layer's quantiser alone
(not the error accumulated upstream). Writes ``layers.csv``, ``variance_vs_depth.png`` (the
seed paper's figure: variance grows with depth, the reason block scaling is needed) and
``sqnr.png``.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qat.errors import UsageError
from qat.files import check_output_folder
from qat.quant.sqnr import error_sums, sqnr_db_value
from qat.quant.ste import FakeQuantizer
from qat.runs.build import resolve
from qat.runs.entry import load_for_command
from qat.tasks.glue import get_task, glue_splits

if TYPE_CHECKING:  # torch loads on use
    from torch import Tensor, nn

COLUMNS = [
    "layer",
    "depth",
    "tensor",
    "numel",
    "mean",
    "variance",
    "abs_max",
    "kurtosis",
    "format",
    "bits_per_element",
    "sqnr_db",
]
_DEPTH = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")


class Moments:
    """Running float64 sums for mean, variance, kurtosis, max and quantisation error.

    The sums stay tensors on the data's device until ``row`` (no host sync per batch)."""

    def __init__(self) -> None:
        self.n = 0
        self.s: list[Any] = [0.0, 0.0, 0.0, 0.0]
        self.abs_max: Any = 0.0
        self.err: Any = 0.0

    def add(self, x: Tensor, q: Tensor | None) -> None:
        x64 = x.detach().double().reshape(-1)
        if x64.numel() == 0:
            return
        self.n += x64.numel()
        p = x64
        for i in range(4):
            self.s[i] = self.s[i] + p.sum()
            p = p * x64
        m = x64.abs().max()
        self.abs_max = m if isinstance(self.abs_max, float) else self.abs_max.maximum(m)
        if q is not None:
            self.err = self.err + error_sums(x64, q.reshape(-1))[1]

    def row(self, with_sqnr: bool) -> dict[str, float]:
        n = max(self.n, 1)
        self.s = [float(s) for s in self.s]
        self.abs_max, self.err = float(self.abs_max), float(self.err)
        m1, m2, m3, m4 = (s / n for s in self.s)
        var = max(m2 - m1 * m1, 0.0)
        c4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1**4
        kurt = c4 / var**2 if var > 0 else float("nan")
        sqnr = float("nan")
        if with_sqnr:
            sqnr = sqnr_db_value(self.s[1], self.err)
        return {
            "numel": self.n,
            "mean": m1,
            "variance": var,
            "abs_max": self.abs_max,
            "kurtosis": kurt,
            "sqnr_db": sqnr,
        }


def layer_depth(name: str) -> int:
    """Transformer block index from a module name (``...layer.3...``); -1 outside blocks."""
    m = _DEPTH.search(f".{name}.")
    return int(m.group(1)) if m else -1


def _linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def _set_quantizers(model: nn.Module, enabled: bool) -> None:

    for m in model.modules():
        if isinstance(m, FakeQuantizer):
            m.enabled = enabled


def profile_model(model: nn.Module, batches: list[dict[str, Tensor]]) -> list[dict[str, Any]]:
    """Statistics rows (one per linear weight and one per linear input) over ``batches``."""
    import torch
    from tqdm.auto import tqdm

    layers = _linears(model)
    acts = {name: Moments() for name, _ in layers}
    hooks = []
    for name, mod in layers:
        aq = getattr(mod, "activation_quantizer", None)

        def hook(module, args, name=name, aq=aq):
            x = args[0]
            if aq is None:
                acts[name].add(x, None)
            else:  # what the quantiser sees: the input rotated, if the layer rotates
                acts[name].add(*aq.error_pair(x))

        hooks.append(mod.register_forward_pre_hook(hook))
    _set_quantizers(model, False)
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="profile", unit="batch"):
                model(**batch)
    finally:
        _set_quantizers(model, True)
        for h in hooks:
            h.remove()
    rows = []
    for name, mod in layers:
        wq, aq = getattr(mod, "weight_quantizer", None), getattr(mod, "activation_quantizer", None)
        wm = Moments()
        with torch.no_grad():
            if wq is None:
                wm.add(mod.weight, None)
            else:
                wm.add(*wq.error_pair(mod.weight))
        for kind, mom, q in (("weight", wm, wq), ("activation", acts[name], aq)):
            rows.append(
                {
                    "layer": name,
                    "depth": layer_depth(name),
                    "tensor": kind,
                    "format": str(q.fmt) if q is not None else "float",
                    "bits_per_element": q.fmt.bits_per_element if q is not None else "",
                    **mom.row(q is not None),
                }
            )
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


def plot(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """``variance_vs_depth.png`` (mean per block, log scale) and ``sqnr.png`` (per layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, marker in (("weight", "o"), ("activation", "s")):
        by_depth: dict[int, list[float]] = {}
        for r in rows:
            if r["tensor"] == kind and r["depth"] >= 0:
                by_depth.setdefault(r["depth"], []).append(r["variance"])
        xs = sorted(by_depth)
        ax.plot(
            xs,
            [sum(by_depth[d]) / len(by_depth[d]) for d in xs],
            marker=marker,
            label=f"{kind}s (mean over the block's linears)",
        )
    ax.set(
        xlabel="layer depth",
        ylabel="variance",
        yscale="log",
        title="Variance of linear-layer weights and inputs vs depth",
    )
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "variance_vs_depth.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(7, len(rows) * 0.08), 4))
    for kind in ("weight", "activation"):
        sel = [
            (i, r["sqnr_db"])
            for i, r in enumerate(r for r in rows if r["tensor"] == kind)
            if math.isfinite(r["sqnr_db"])
        ]
        if sel:
            ax.plot([i for i, _ in sel], [s for _, s in sel], marker=".", label=kind)
    ax.set(
        xlabel="linear layer (model order)",
        ylabel="SQNR (dB)",
        title="Per-layer SQNR under the configured formats",
    )
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "sqnr.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def profile(
    source: Any,
    overrides: Any = (),
    *,
    num_batches: int = 4,
    batch_size: int = 8,
    output_dir: str | Path | None = None,
    device: Any = None,
) -> dict[str, Any]:
    """Profile ``source`` (a recipe or a run / checkpoint folder) on ``num_batches`` batches of
    its GLUE task's first validation split, as ``qat profile`` does: ``layers.csv`` and the
    plots in ``output_dir`` (default ``<output_dir>/profile``). Returns the csv and plot paths,
    the rows and the density report (as a dict)."""
    from transformers import DataCollatorWithPadding

    if num_batches < 1 or batch_size < 1:
        raise UsageError("--num_batches and --batch_size must be >= 1")
    if output_dir is not None:
        check_output_folder(output_dir)
    src = resolve(source, overrides)
    if src.recipe is None:
        raise UsageError(
            f"{src.args.model_name_or_path!r} is a model, not a recipe or run folder: the "
            "profile runs the recipe task's validation text"
        )
    args = src.args
    out = check_output_folder(
        Path(args.output_dir) / "profile" if output_dir is None else output_dir
    )
    task = get_task(args.task_name)
    split = task.validation_splits[0]
    raw = glue_splits(task, args.data_dir, (split,), eval_samples=num_batches * batch_size)
    loaded = load_for_command(src, device=device)
    data = raw.tokenize(loaded.tokenizer, args.max_length)[split].remove_columns("label")
    collate = DataCollatorWithPadding(loaded.tokenizer)
    batches = [
        {k: v.to(loaded.device) for k, v in collate([data[i] for i in rows]).items()}
        for rows in (
            range(s, min(s + batch_size, len(data))) for s in range(0, len(data), batch_size)
        )
    ]
    rows = profile_model(loaded.model, batches)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "layers.csv")
    return {
        "csv": out / "layers.csv",
        "plots": plot(rows, out),
        "rows": rows,
        "density": loaded.density().to_dict(),
    }
