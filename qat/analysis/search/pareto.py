"""The Pareto front of finished trials (accuracy up, bits down) and the point chosen from it."""

from __future__ import annotations

from typing import Any


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows no other row beats on both accuracy (higher) and bits (lower); sorted by bits."""
    front = []
    for r in rows:
        dominated = any(
            o["accuracy"] >= r["accuracy"]
            and o["bits"] <= r["bits"]
            and (o["accuracy"] > r["accuracy"] or o["bits"] < r["bits"])
            for o in rows
        )
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: (r["bits"], -r["accuracy"]))


def choose(rows: list[dict[str, Any]], max_bits: float | None) -> dict[str, Any] | None:
    """The most accurate row within the constraint (fewer bits break ties)."""
    ok = [r for r in rows if max_bits is None or r["bits"] <= max_bits + 1e-9]
    return max(ok, key=lambda r: (r["accuracy"], -r["bits"])) if ok else None
