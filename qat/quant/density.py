"""Memory density: bits per element per layer and for the whole model, vs fp32 and int8.

A quantised linear's weight costs its format's ``bits_per_element`` (shared scales included);
everything else (embeddings, norms, biases, the float head) costs its dtype's width. Two
totals are reported because both are quoted: over the quantised weights only (the paper's
"6-bit BFP = 6.5 bits, 4.9x vs fp32") and over every parameter of the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from qat.quant.modules import QuantConv1D, QuantLinear


@dataclasses.dataclass
class LayerDensity:
    name: str
    params: int  # weight elements
    weight_format: str
    weight_bits: float
    activation_format: str
    activation_bits: float


@dataclasses.dataclass
class DensityReport:
    layers: list[LayerDensity]
    quantized_params: int
    quantized_bits: float  # total bits of the quantised weights
    total_params: int
    total_bits: float  # total bits of every parameter

    @property
    def quantized_bits_per_element(self) -> float:
        return self.quantized_bits / self.quantized_params if self.quantized_params else 0.0

    @property
    def model_bits_per_element(self) -> float:
        return self.total_bits / self.total_params if self.total_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        q, m = self.quantized_bits_per_element, self.model_bits_per_element
        return {
            "quantized_linears": {
                "params": self.quantized_params,
                "bits_per_element": q,
                "density_vs_fp32": _ratio(32, q),
                "density_vs_int8": _ratio(8, q),
            },
            "model": {
                "params": self.total_params,
                "bits_per_element": m,
                "density_vs_fp32": _ratio(32, m),
                "density_vs_int8": _ratio(8, m),
                "bytes": self.total_bits / 8,
            },
            "layers": [dataclasses.asdict(x) for x in self.layers],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DensityReport:
        """The report ``to_dict`` wrote (for printing one read back from results)."""
        q, m = d["quantized_linears"], d["model"]
        return cls(
            [LayerDensity(**x) for x in d["layers"]],
            q["params"],
            q["bits_per_element"] * q["params"],
            m["params"],
            m["bytes"] * 8,
        )

    def format(self, per_layer: bool = True) -> str:
        """A plain-text table for the console."""
        lines = []
        if per_layer and self.layers:
            w = max(len(x.name) for x in self.layers)
            lines.append(
                f"{'layer':<{w}}  {'params':>9}  {'weight':<28} {'W bits':>6}  {'A bits':>6}"
            )
            for x in self.layers:
                lines.append(
                    f"{x.name:<{w}}  {x.params:>9}  {x.weight_format:<28} "
                    f"{x.weight_bits:>6.3f}  {x.activation_bits:>6.3f}"
                )
        q, m = self.quantized_bits_per_element, self.model_bits_per_element
        lines.append(
            f"quantised weights: {self.quantized_params} params, {q:.3f} bits/element, "
            f"density {_ratio(32, q):.2f}x vs fp32, {_ratio(8, q):.2f}x vs int8"
        )
        lines.append(
            f"whole model:       {self.total_params} params, {m:.3f} bits/element, "
            f"density {_ratio(32, m):.2f}x vs fp32, {_ratio(8, m):.2f}x vs int8, "
            f"{self.total_bits / 8 / 2**20:.2f} MiB"
        )
        return "\n".join(lines)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def _dtype_bits(p: nn.Parameter) -> int:
    return p.element_size() * 8


def density_report(model: nn.Module) -> DensityReport:
    """Bits per element of every quantised linear and of the whole model (shared params once)."""
    layers: list[LayerDensity] = []
    quant_weight_ids: dict[int, float] = {}
    for name, m in model.named_modules():
        if not isinstance(m, (QuantLinear, QuantConv1D)):
            continue
        wq, aq = m.weight_quantizer, m.activation_quantizer
        wbits = wq.fmt.bits_per_element if wq is not None else float(_dtype_bits(m.weight))
        abits = aq.fmt.bits_per_element if aq is not None else 32.0
        layers.append(
            LayerDensity(
                name=name,
                params=m.weight.numel(),
                weight_format=str(wq.fmt) if wq is not None else str(m.weight.dtype).split(".")[-1],
                weight_bits=wbits,
                activation_format=str(aq.fmt) if aq is not None else "float",
                activation_bits=abits,
            )
        )
        if wq is not None:
            quant_weight_ids[id(m.weight)] = wbits
    qbits = 0.0
    qparams = 0
    total_params, total_bits = 0, 0.0
    seen: set[int] = set()
    for p in model.parameters():  # parameters() yields tied parameters once
        if id(p) in seen:
            continue
        seen.add(id(p))
        total_params += p.numel()
        bits = quant_weight_ids.get(id(p))
        if bits is not None:
            qparams += p.numel()
            qbits += bits * p.numel()
            total_bits += bits * p.numel()
        else:
            total_bits += _dtype_bits(p) * p.numel()
    return DensityReport(layers, qparams, qbits, total_params, total_bits)
