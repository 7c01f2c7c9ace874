"""The house rule of docs/architecture.md: imports only go down.

Every ``import qat...`` in the package (module level or inside a function) is checked against
the layer order below; the middle layers (training, export, analysis) may not import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "qat"

# lowest first; a module may import its own layer's package or any lower layer
LAYERS: list[set[str]] = [
    {"errors"},
    {"formats"},
    {"models"},
    {"quant"},
    {"tasks"},
    {"runs"},
    {"training", "export", "analysis"},  # peers: none imports another
    {"integrations"},  # other trainers (TRL) given qat's behaviour
    {"cli"},
    {"__init__", "train"},  # the lazy package namespace and the accelerate launch script
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _unit(module: str) -> str:
    """``qat.quant.ste`` -> ``quant``; ``qat`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "qat"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "qat":  # from qat import models -> qat.models
                found += [(node.lineno, f"qat.{a.name}") for a in node.names]
            elif node.module.startswith("qat."):
                found.append((node.lineno, node.module))
    return found


def _modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_is_in_a_layer():
    units = {_unit("qat." + ".".join(p.relative_to(ROOT).with_suffix("").parts))
             for p in _modules()}
    assert units <= set(RANK), f"modules outside any layer: {sorted(units - set(RANK))}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_go_down(path: Path):
    me = _unit("qat." + ".".join(path.relative_to(ROOT).with_suffix("").parts))
    bad = []
    for line, target in _imports(path):
        other = _unit(target)
        if other == me or other not in RANK:
            continue
        if RANK[other] > RANK[me] or RANK[other] == RANK[me]:
            bad.append(f"line {line}: {target} ({other} is not below {me})")
    assert not bad, f"{path.relative_to(ROOT.parent)} imports upward or sideways: {bad}"
