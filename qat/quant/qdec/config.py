"""QDEC's settings: the ``qdec:`` recipe section as ``QDECConfig``, and ``QDECError``.

The method itself is described in ``qat.quant.qdec.apply``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qat.errors import check_one_of, check_section
from qat.quant.config import QuantConfigError

RESIDUAL_DEVICES = ("cpu", "same")
PREFILL_RULES = ("step", "token")


class QDECError(QuantConfigError):
    """An invalid ``qdec:`` setting or a model QDEC cannot serve; one line naming the key."""


@dataclasses.dataclass
class QDECConfig:
    """``qdec: {k_chunk: 32, residual_bits: 4, residual_device: cpu, prefill: null}``.

    ``prefill`` null means: ``token`` in ``qat perplexity``, ``step`` elsewhere (see the
    module docstring).
    """

    k_chunk: int = 32
    residual_bits: int = 4
    residual_device: str = "cpu"
    prefill: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        k = self.k_chunk
        if isinstance(k, float) and k.is_integer():
            self.k_chunk = k = int(k)  # YAML / CLI "32.0"
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise QDECError(
                f"qdec.k_chunk must be an integer >= 0 (channels per 1024 inputs), got {k!r}"
            )
        b = self.residual_bits
        if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8:
            raise QDECError(f"qdec.residual_bits must be an integer in 2..8, got {b!r}")
        check_one_of("qdec.residual_device", self.residual_device, RESIDUAL_DEVICES, QDECError)
        if self.prefill is not None and self.prefill not in PREFILL_RULES:
            raise QDECError(
                f"qdec.prefill must be one of {', '.join(PREFILL_RULES)} or null; "
                f"got {self.prefill!r}"
            )

    @classmethod
    def from_dict(cls, d: Any) -> QDECConfig | None:
        """From a recipe's ``qdec:`` mapping; ``None`` (no QDEC) passes through."""
        if d is None or isinstance(d, QDECConfig):
            return d
        check_section(d, cls, "qdec", QDECError)
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
