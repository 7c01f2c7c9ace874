"""Seed trials from a ``qat sensitivity`` table: mixes that lower the least sensitive units
first, enqueued before the sampler's own proposals."""

from __future__ import annotations

from typing import Any

from qat.analysis.search.space import Space
from qat.analysis.search.spec import SearchError, read_sensitivity


def seed_mixes(space: Space, sensitivity_csv: str, n: int) -> list[dict[str, Any]]:
    """Sensitivity-ordered mixes: the k least sensitive units at their lowest choices and the
    rest at the recipe's, for ``n`` budgets k = ceil(N/n), ceil(2N/n), ..., N."""
    ranks = read_sensitivity(sensitivity_csv)
    names = [u.name for u in space.units]
    missing = [u for u in names if u not in ranks]
    if missing:
        raise SearchError(
            f"search.sensitivity: {sensitivity_csv!r} does not cover unit "
            f"{missing[0]} of this model and granularity; "
            "rerun qat sensitivity with the same recipe"
        )
    order = sorted(names, key=lambda u: -ranks[u])  # least sensitive (last rank) first
    low, keep = space.extreme(low=True), space.base_choice()
    mixes = []
    for i in range(1, n + 1):
        k = -(-i * len(order) // n)  # ceil: the last mix lowers every unit
        per_unit = {u: (low if j < k else keep) for j, u in enumerate(order)}
        mixes.append(space.params_for(per_unit))
    return mixes
