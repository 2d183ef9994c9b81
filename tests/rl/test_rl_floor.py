"""`m2io_jax.rl` is generic: no module of it imports the task side (data, retrieval, eval, inserter) or an
entry point."""

import ast
import pathlib

import m2io_jax.rl

FORBIDDEN = ("data", "retrieval", "eval", "inserter", "train", "answer", "evaluate", "export", "bench")


def imported_modules(path: pathlib.Path) -> set[str]:
    """Absolute names of every module imported by the file (relative imports resolved against m2io_jax.rl)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = "m2io_jax.rl".split(".")[: 2 - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            names.update(f"{base}.{alias.name}" for alias in node.names)
            names.add(base)
    return names


def test_rl_imports_nothing_from_the_task_side():
    files = sorted(pathlib.Path(m2io_jax.rl.__file__).parent.glob("*.py"))
    assert {f.name for f in files} >= {"grpo.py", "optimizer.py", "config.py"}
    offending = {f.name: sorted(n for n in imported_modules(f) if n.split(".")[:2] in
                                [["m2io_jax", name] for name in FORBIDDEN])
                 for f in files}
    assert not any(offending.values()), offending
