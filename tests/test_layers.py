"""The house rule of docs/architecture.md: imports only go down.

Every ``import qat...`` in the package (module level or inside a function) is checked against
the layer order below; the middle layers (training, export, analysis) may not import each other.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "qat"

# lowest first; a module may import its own layer's package or any lower layer
LAYERS: list[set[str]] = [
    {"errors"},
    {"files"},  # the rules of what qat writes: output files and folders, atomic writes
    {"formats"},
    {"models"},
    {"quant"},
    {"tasks"},
    {"runs"},
    {"training", "export", "analysis"},  # peers: none imports another
    # other libraries given qat's behaviour (TRL, lm-eval); measuring a model or an export;
    # exporting one (a source resolved by runs/, written by export/)
    {"integrations", "evaluation", "exporting"},
    {"cli"},
    {"startup"},  # what ``import qat`` registers with transformers (by module name, lazily)
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
    units = {
        _unit("qat." + ".".join(p.relative_to(ROOT).with_suffix("").parts)) for p in _modules()
    }
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


# --- no import circles ----------------------------------------------------------------------


def _name(path: Path) -> str:
    """``qat/quant/ste.py`` -> ``qat.quant.ste``; ``qat/quant/__init__.py`` -> ``qat.quant``."""
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """Line numbers of imports under ``if TYPE_CHECKING:``: never executed, so no circle."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            lines |= {
                n.lineno
                for stmt in node.body
                for n in ast.walk(stmt)
                if isinstance(n, (ast.Import, ast.ImportFrom))
            }
    return lines


def _import_graph() -> dict[str, set[str]]:
    """Module -> the qat modules it imports, at module level or inside a function.
    ``from qat.a import b`` points at ``qat.a.b`` when that is a module, else at ``qat.a``."""
    modules = {_name(p): p for p in _modules()}
    graph: dict[str, set[str]] = {}
    for me, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_only(tree)
        targets: set[str] = set()
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.split(".")[0] == "qat"}
            elif (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and node.module
                and node.module.split(".")[0] == "qat"
            ):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    targets.add(sub if sub in modules else node.module)
        graph[me] = {t for t in targets if t in modules and t != me}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as its path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt, path)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_the_cycle_finder_reports_the_circle_path():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circle_among_qat_modules():
    graph = _import_graph()
    assert "qat.training.trainer" in graph["qat.training.causal_lm"]  # inside a function
    cycle = _cycle(graph)
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


# A module past this many lines (as `ruff format` lays it out) does more than one job, unless
# its docstring says why it may not be split: "one module, one job" (#20).
MAX_LINES = 450


def test_no_module_is_too_long_without_a_reason():
    long = []
    for path in _modules():
        lines = path.read_text().count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and "one module because" not in doc:
            long.append(f"{path.relative_to(ROOT.parent)} ({lines} lines)")
    assert not long, f"split these or say in the docstring why not: {long}"


def test_no_module_cites_a_file_outside_the_repository():
    """METHODS.md lives in ../shared, not in the repository: a module or page cites the paper."""
    pages = [*ROOT.rglob("*.py"), *(ROOT.parent / "docs").rglob("*.md")]
    citing = [str(p.relative_to(ROOT.parent)) for p in pages if "METHODS.md" in p.read_text()]
    assert citing == []


# A function past this many lines does several jobs; qat/quant's are split into named steps
# (quantize_model is a list of them). Triton kernels are one body the compiler sees whole.
MAX_FUNCTION_LINES = 60
TRITON_KERNELS = {"flash_forward_kernel", "flash_backward_dq_kernel", "flash_backward_dkv_kernel"}


def _functions(folder: Path):
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path, node


def test_no_quant_function_is_longer_than_60_lines():
    long, kernels = [], set()
    for path, fn in _functions(ROOT / "quant"):
        if fn.name in TRITON_KERNELS and any(
            "triton.jit" in ast.unparse(d) for d in fn.decorator_list
        ):
            kernels.add(fn.name)
        elif fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES:
            long.append(f"{path.relative_to(ROOT.parent)}:{fn.lineno} {fn.name}")
    assert not long, f"split these into named steps (<= {MAX_FUNCTION_LINES} lines): {long}"
    assert kernels == TRITON_KERNELS, "the allow-list names Triton kernels that no longer exist"


def test_quantize_model_is_a_short_list_of_steps():
    (fn,) = [f for p, f in _functions(ROOT / "quant") if f.name == "quantize_model"]
    assert fn.end_lineno - fn.lineno + 1 <= 40


# --- each rule written once (docs/REVIEW.md change 8) ----------------------------------------


def _sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT.parent)): p.read_text() for p in _modules()}


@pytest.mark.parametrize(
    "pattern, home",
    [
        (r"def is_causal_lm\(", "qat/models.py"),
        (r"def fits_positions\(", "qat/models.py"),  # max_length, block_size, --chunk_size
        (r"position_limit\(", "qat/models.py"),
        (r"def _?looks_local\(", "qat/models.py"),  # "is this a path, not a Hub id"
        (r"\bGGML_TYPES\b", "qat/export/ggml_blocks.py"),  # the one GGML type check
        (r"def refuse_rotation\(", "qat/export/engines.py"),
        (r"def check_section\(", "qat/errors.py"),  # beside check_one_of
        (r"\bHEAD_NAMES =", "qat/quant/config.py"),
    ],
)
def test_a_rule_lives_in_one_module(pattern: str, home: str):
    where = sorted(path for path, text in _sources().items() if re.search(pattern, text))
    assert where == [home]


def test_unused_import_waivers_are_side_effect_imports():
    """``noqa: F401`` outside ``__init__`` files only on ``import x`` run for its effect (a
    registration, an availability check), never on a re-export (``from x import y``)."""
    bad = [
        f"{path}: {line.strip()}"
        for path, text in _sources().items()
        if not path.endswith("__init__.py")
        for line in text.splitlines()
        if "noqa: F401" in line and not line.lstrip().startswith("import ")
    ]
    assert bad == []


def test_the_front_door_is_the_list_of_names():
    """``qat/__init__.py`` names the public API; what ``import qat`` registers is qat/startup.py."""
    assert (ROOT / "__init__.py").read_text().count("\n") <= 80


# --- quant/ in three packages (docs/REVIEW.md change 4) ---------------------------------------


def test_quant_holds_the_quantised_modules_and_three_packages():
    """Quantised modules directly in quant/; attention, weight transforms and QDEC each a
    package of their own (no ``qdec_*`` module)."""
    quant = ROOT / "quant"
    assert len(list(quant.glob("*.py"))) <= 11
    packages = sorted(p.name for p in quant.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["attention", "qdec", "transforms"]
    assert [p.name for p in ROOT.rglob("qdec_*.py")] == []
    assert (quant / "attention" / "csrc" / "block_attention_cpu.cpp").is_file()


def test_quant_does_not_import_the_model_loader():
    loaders = [
        f"{path.relative_to(ROOT.parent)}:{line}"
        for path in (ROOT / "quant").rglob("*.py")
        for line, target in _imports(path)
        if target == "qat.models" or target.startswith("qat.models.")
    ]
    assert loaders == []


# --- every name imported from the module that defines it (docs/REVIEW.md changes 4, 5) ------


def _borrowed(tree: ast.Module) -> set[str]:
    """Names a module binds only by importing them from another qat module (not defining them)."""
    defined, borrowed = set(), set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qat."):
            borrowed |= {a.asname or a.name for a in node.names}
    return borrowed - defined


def test_every_name_is_imported_from_the_module_that_defines_it():
    """No façade: ``from qat.a.b import n`` where ``qat.a.b`` only imports ``n`` itself names
    the wrong module (a package's ``__init__`` is its namespace, and may)."""
    modules = {_name(p): p for p in _modules() if p.name != "__init__.py"}
    borrowed = {m: _borrowed(ast.parse(p.read_text())) for m, p in modules.items()}
    files = [
        *_modules(),
        *(ROOT.parent / "tests").glob("*.py"),
        *(ROOT.parent / "bench").glob("*.py"),
    ]
    bad = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in borrowed:
                names = [a.name for a in node.names if a.name in borrowed[node.module]]
                bad += [f"{path.relative_to(ROOT.parent)}:{node.lineno}: {n}" for n in names]
    assert bad == []


# --- file rules on the ground floor (docs/REVIEW.md change 5) ---------------------------------


@pytest.mark.parametrize("path", sorted((ROOT / "export").glob("*.py")), ids=lambda p: p.name)
def test_export_does_not_import_runs(path: Path):
    """The writers take a loaded model; resolving and loading a source is qat/exporting.py's."""
    assert [f"line {line}: {t}" for line, t in _imports(path) if t.startswith("qat.runs")] == []


def test_the_file_rules_live_on_the_ground_floor():
    """Output files and folders, export destinations and atomic writes: qat/files.py, which
    imports nothing of qat but its errors."""
    assert {t for _, t in _imports(ROOT / "files.py")} == {"qat.errors"}
    folders = (ROOT / "runs" / "folders.py").read_text()
    assert "def write_atomically" not in folders and "def check_destination" not in folders
    assert folders.count("\n") <= 300


# --- dependencies in the header (docs/REVIEW.md change 3) -------------------------------------

# Where a library module may still import qat inside a function, and why. Commands (qat/cli)
# import inside main() so that --help stays torch-free; qat/__init__.py loads names lazily.
IN_FUNCTION_FILES = {
    # run by qat.startup's hook inside transformers' own import (quantizers, modeling_utils):
    # qat's model code (torch, the quantised modules) loads only when a packed model does
    "export/hf_quantizer.py",
    # copied into every packed export, where it must load without qat installed
    "export/modeling_qat_packed.py",
}
IN_FUNCTION_TARGETS = {
    "qat.formats.kernels",  # imports triton and registers its ops (an optional extra)
    "qat.quant.attention.flash_kernels",  # Triton kernels: imports triton
}


def _in_function_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    found += [(node.lineno, a.name) for a in node.names if a.name.startswith("qat")]
                elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qat"):
                    found.append((node.lineno, node.module))
    return sorted(set(found))


@pytest.mark.parametrize(
    "path",
    [p for p in _modules() if p.relative_to(ROOT).parts[0] not in ("cli", "__init__.py")],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_library_modules_import_qat_in_their_header(path: Path):
    """A library module's qat dependencies are at its top, where a reader (and the layer and
    circle checks above) see them; the graph is acyclic, so no import needs to hide."""
    if str(path.relative_to(ROOT)) in IN_FUNCTION_FILES:
        return
    hidden = [
        f"line {n}: {t}" for n, t in _in_function_imports(path) if t not in IN_FUNCTION_TARGETS
    ]
    assert hidden == [], f"{path.relative_to(ROOT.parent)}: move to the header: {hidden}"


def test_the_in_function_check_sees_an_import_in_a_function(tmp_path: Path):
    f = tmp_path / "m.py"
    f.write_text("import qat.errors\n\ndef g():\n    from qat.models import x\n    return x\n")
    assert _in_function_imports(f) == [(4, "qat.models")]
