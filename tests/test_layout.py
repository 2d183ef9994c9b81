"""The package's imports run one way (the floors of DESIGN.md's layout), checked by reading the source.

Every import of `m2io_jax` is read with `ast`, nothing is imported: module-level imports, imports inside
functions, relative imports, and module paths written as strings in files that call `importlib.import_module`
(dispatch tables such as `models/registry.py`'s `_MODULES`). Each import is mapped to its unit, a subpackage or
top-level module of `m2io_jax`, and the unit graph is checked against `FLOORS`:
  - a unit imports only from its own floor or a lower one;
  - `inserter` (the M2IO task) and `rl` (generic GRPO) never import each other;
  - `rl` imports nothing from `data`, `retrieval`, `eval` or `inserter` (the entry point wires the task in);
  - units form no cycle (same-floor units may import each other one way only);
  - every unit has a floor: a new top-level module must be placed here first.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "m2io_jax"

# Lowest first. Entry points are the `python -m m2io_jax.<name>` commands and the benchmarks.
FLOORS: dict[str, int] = {
    "buckets": 0, "sharding": 0, "cli": 0, "chips": 0,  # chips: TPU generations' peak FLOP/s, HBM, bandwidth
    "data": 1,
    "models": 2,
    "retrieval": 3, "sampling": 3, "eval": 3, "flops": 3,  # flops: analytic FLOPs of the models' programs
    "inserter": 4, "rl": 4,
    "train": 5, "answer": 5, "evaluate": 5, "export": 5, "bench": 5,
    "train_config": 5,  # train's default config: wires the data, inserter and rl sections together
    "run_log": 5, "fit": 5,  # train's metrics fan-out (TensorBoard) and its memory check before step 0
    "profiling": 5,  # train's jax.profiler trace and per-step MFU / roofline figures
    "generator": 5, "train_generator": 5, "systems": 5, "render": 5,  # answer generator, systems, answer pages
    "experiments": 5,
}
NEVER_EACH_OTHER = ("inserter", "rl")
RL_FORBIDDEN = frozenset({"data", "retrieval", "eval", "inserter"})
_MODULE_PATH = re.compile(rf"{PACKAGE}(\.[A-Za-z_]\w*)+")


@dataclasses.dataclass(frozen=True)
class Import:
    """One import of a package module: where it is written and which unit it reaches."""
    file: str  # path relative to the directory holding the package, e.g. "m2io_jax/data/prompts.py"
    line: int
    source: str  # importing unit ("" for the package root's __init__.py)
    module: str  # dotted module imported, e.g. "m2io_jax.retrieval.chunking"

    @property
    def target(self) -> str:
        return self.module.split(".")[1] if "." in self.module else ""

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def units_of(package_dir: Path) -> list[str]:
    """Top-level modules and subpackages of the package: the units that floors are given to."""
    units = [p.stem for p in package_dir.glob("*.py") if p.name != "__init__.py"]
    units += [p.name for p in package_dir.iterdir() if p.is_dir() and (p / "__init__.py").is_file()]
    return sorted(units)


def _module_of(path: Path, package_dir: Path) -> list[str]:
    """Dotted name parts of the module in `path` (a package's __init__.py names the package)."""
    parts = [PACKAGE, *path.relative_to(package_dir).with_suffix("").parts]
    return parts[:-1] if parts[-1] == "__init__" else parts


def _docstring_nodes(tree: ast.AST) -> set[int]:
    """ids of the docstring constants in `tree`: prose that may mention module paths without importing them."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _calls_import_module(tree: ast.AST) -> bool:
    """Whether the module imports by name at run time, so that its module-path strings are imports."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                return True
    return False


def modules_of(package_dir: Path) -> set[str]:
    """Dotted names of every module and subpackage under `package_dir`."""
    return {".".join(_module_of(path, package_dir)) for path in package_dir.rglob("*.py")}


def imported_modules(path: Path, package_dir: Path, modules: set[str]) -> Iterator[tuple[int, str]]:
    """(line, dotted module) for every package module that the file at `path` imports or names for importlib."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module_parts = _module_of(path, package_dir)
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = module_parts if is_package else module_parts[:-1]
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                # `from m2io_jax.models import qwen2` imports the module qwen2; other names are attributes of `base`.
                submodule = f"{base}.{alias.name}"
                yield node.lineno, submodule if submodule in modules else base
    if _calls_import_module(tree):
        docstrings = _docstring_nodes(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                    and _MODULE_PATH.fullmatch(node.value)):
                yield node.lineno, node.value


def collect_imports(package_dir: Path) -> list[Import]:
    """Every import of a package module written anywhere in the package under `package_dir`."""
    modules = modules_of(package_dir)
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir).parts
        source = "" if parts == ("__init__.py",) else Path(parts[0]).stem
        file = str(path.relative_to(package_dir.parent))
        for line, module in imported_modules(path, package_dir, modules):
            found.append(Import(file, line, source, module))
    return found


def _strongly_connected(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of `graph` that hold more than one node."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def check_package(package_dir: Path, floors: Mapping[str, int] = FLOORS) -> list[str]:
    """Violations of the floors by the package under `package_dir`, each naming file:line; empty when clean."""
    violations = []
    prefix = package_dir.name
    for unit in units_of(package_dir):
        if unit not in floors:
            violations.append(f"{prefix}/{unit}: top-level module or subpackage {unit!r} has no floor; give it one "
                              f"in FLOORS of tests/test_layout.py (and in DESIGN.md's layout)")
    imports = [i for i in collect_imports(package_dir) if i.target and i.target != i.source]
    graph: dict[str, set[str]] = {}
    first_edge: dict[tuple[str, str], Import] = {}
    for imp in imports:
        if imp.source == "":
            violations.append(f"{imp.where}: the package root imports {imp.module}; keep m2io_jax/__init__.py free of "
                              f"imports so that importing a low floor does not load higher ones")
            continue
        if imp.target not in floors or imp.source not in floors:
            continue
        graph.setdefault(imp.source, set()).add(imp.target)
        first_edge.setdefault((imp.source, imp.target), imp)
        if floors[imp.target] > floors[imp.source]:
            violations.append(f"{imp.where}: {imp.source} (floor {floors[imp.source]}) imports {imp.module} "
                              f"(floor {floors[imp.target]}); a module imports only from its own floor or below")
        if {imp.source, imp.target} == set(NEVER_EACH_OTHER):
            violations.append(f"{imp.where}: {imp.source} imports {imp.module}; inserter and rl never import each "
                              f"other (the entry point wires the task into the trainer)")
        if imp.source == "rl" and imp.target in RL_FORBIDDEN:
            violations.append(f"{imp.where}: rl imports {imp.module}; rl imports nothing from "
                              f"{', '.join(sorted(RL_FORBIDDEN))}")
    for component in _strongly_connected(graph):
        members = set(component)
        edges = sorted(f"{a} -> {b} at {first_edge[a, b].where}"
                       for a in component for b in graph[a] if b in members)
        violations.append(f"package cycle between {', '.join(component)}: {'; '.join(edges)}")
    return violations


def test_package_imports_respect_the_floors():
    package_dir = ROOT / PACKAGE
    imports = collect_imports(package_dir)
    edges = {(i.source, i.target) for i in imports}
    # The walk reads module-level, function-level and importlib-table imports of the real tree.
    assert ("models", "sharding") in edges and ("evaluate", "eval") in edges, sorted(edges)
    assert any(i.module == "m2io_jax.models.qwen2_hf" and i.file.endswith("registry.py") for i in imports)
    violations = check_package(package_dir)
    assert not violations, "import floor violations:\n" + "\n".join(violations)


def _write_tree(root: Path, files: Mapping[str, str]) -> Path:
    """Writes a fake `m2io_jax` package under `root` (every unit of FLOORS as a subpackage, plus `files`)."""
    package_dir = root / PACKAGE
    package_dir.mkdir()
    (package_dir / "__init__.py").write_text("")
    for unit in FLOORS:
        (package_dir / unit).mkdir()
        (package_dir / unit / "__init__.py").write_text("")
    for name, text in files.items():
        path = package_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package_dir


ALLOWED = {
    "models/qwen2.py": "from m2io_jax.sharding import constrain\nfrom m2io_jax import buckets\n",
    "sampling/api.py": "import m2io_jax.models.qwen2\nfrom . import layout\nfrom .layout import plan\n",
    "sampling/layout.py": "def plan():\n    from m2io_jax.models import qwen2\n",
    "retrieval/recall.py": "from m2io_jax.eval import metrics\nfrom ..data import mramg\n",
    "rl/grpo.py": "from m2io_jax.sampling import api\nfrom m2io_jax.models import qwen2\n",
    "inserter/rewards.py": "from m2io_jax.eval import metrics\n",
    "train.py": "from m2io_jax.inserter import rewards\nfrom m2io_jax.rl import grpo\n",
    "models/registry.py": ('"""Names m2io_jax.retrieval.index in its docstring only."""\nimport importlib\n'
                           '_MODULES = {"qwen2": "m2io_jax.models.qwen2"}\n'
                           'def load(kind):\n    return importlib.import_module(_MODULES[kind])\n'),
}

PLANTED = {
    "upward": ({"data/prompts.py": "import os\nfrom m2io_jax.retrieval.chunking import Chunk\n"},
               "m2io_jax/data/prompts.py:2: data (floor 1) imports m2io_jax.retrieval.chunking (floor 3)"),
    "upward_relative": ({"data/prompts.py": "from ..retrieval import chunking\n"},
                        "m2io_jax/data/prompts.py:1: data (floor 1) imports m2io_jax.retrieval (floor 3)"),
    "upward_via_package_root": ({"models/hf.py": "from m2io_jax import sampling\n"},
                                "m2io_jax/models/hf.py:1: models (floor 2) imports m2io_jax.sampling (floor 3)"),
    "function_level": ({"models/qwen2.py": "def f():\n    if True:\n        from m2io_jax.sampling import api\n"},
                       "m2io_jax/models/qwen2.py:3: models (floor 2) imports m2io_jax.sampling"),
    "importlib_table": ({"models/registry.py": ('import importlib\n_MODULES = {\n    "a": "m2io_jax.models.qwen2",\n'
                                                '    "b": "m2io_jax.retrieval.index",\n}\n'
                                                'def load(k):\n    return importlib.import_module(_MODULES[k])\n')},
                        "m2io_jax/models/registry.py:4: models (floor 2) imports m2io_jax.retrieval.index"),
    "inserter_imports_rl": ({"inserter/rewards.py": "from m2io_jax.rl import grpo\n"},
                            "m2io_jax/inserter/rewards.py:1: inserter imports m2io_jax.rl.grpo; inserter and rl never"),
    "rl_imports_inserter": ({"rl/grpo.py": "import m2io_jax.inserter.rewards\n"},
                            "m2io_jax/rl/grpo.py:1: rl imports m2io_jax.inserter.rewards; inserter and rl never"),
    "rl_imports_data": ({"rl/grpo.py": "\nfrom m2io_jax.data import mramg\n"},
                        "m2io_jax/rl/grpo.py:2: rl imports m2io_jax.data; rl imports nothing from data"),
    "same_floor_cycle": ({"retrieval/recall.py": "from m2io_jax.eval import metrics\n",
                          "eval/metrics.py": "x = 1\n\ndef f():\n    from m2io_jax.retrieval import recall\n"},
                         "package cycle between eval, retrieval: eval -> retrieval at m2io_jax/eval/metrics.py:4; "
                         "retrieval -> eval at m2io_jax/retrieval/recall.py:1"),
    "unknown_unit": ({"serve.py": "x = 1\n"}, "m2io_jax/serve: top-level module or subpackage 'serve' has no floor"),
    "root_imports": ({"__init__.py": "from m2io_jax.models import from_pretrained\n"},
                     "m2io_jax/__init__.py:1: the package root imports m2io_jax.models"),
}


def test_checker_passes_a_tree_that_keeps_the_floors(tmp_path):
    package_dir = _write_tree(tmp_path, ALLOWED)
    assert len(collect_imports(package_dir)) == 14
    assert check_package(package_dir) == []


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_checker_reports_a_planted_violation(tmp_path, case):
    files, expected = PLANTED[case]
    violations = check_package(_write_tree(tmp_path, {**ALLOWED, **files}))
    assert any(v.startswith(expected) for v in violations), (expected, violations)


def test_real_tree_violation_is_reported_with_its_real_path(tmp_path):
    """The checker sees the real package: copying it and planting one upward import adds exactly that violation."""
    real = check_package(ROOT / PACKAGE)
    copy = tmp_path / PACKAGE
    for path in (ROOT / PACKAGE).rglob("*.py"):
        target = copy / path.relative_to(ROOT / PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text(encoding="utf-8"))
    with open(copy / "buckets.py", "a", encoding="utf-8") as f:
        f.write("\n\ndef _planted():\n    from m2io_jax.models import registry\n")
    lines = (copy / "buckets.py").read_text(encoding="utf-8").count("\n")
    added = set(check_package(copy)) - set(real)
    assert len([v for v in added if v.startswith(f"m2io_jax/buckets.py:{lines}: buckets (floor 0) imports "
                                                 "m2io_jax.models.registry (floor 2)")]) == 1, added

