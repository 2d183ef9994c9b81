"""Package-level guarantees: the runtime never imports torch, and `pip install .` does not pull it in."""

import os
import pkgutil
import re
import subprocess
import sys
import tomllib

import m2io_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def runtime_modules() -> list[str]:
    """Every module of the package except the benchmarks (which may import their torch peers)."""
    found = pkgutil.walk_packages(m2io_jax.__path__, prefix="m2io_jax.")
    return sorted(m.name for m in found if not m.name.startswith("m2io_jax.bench") and not m.name.endswith("__main__"))


def test_no_runtime_module_imports_torch():
    modules = runtime_modules()
    assert "m2io_jax.models.qwen2" in modules and "m2io_jax.sharding" in modules
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "assert not loaded, loaded\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-c", code], env={**env, "JAX_PLATFORMS": "cpu"}, cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_runtime_dependencies_exclude_torch():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    names = {re.split(r"[=<>!~\[; ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    assert "jax" in names
    assert "jinja2" in names  # chat templates; transformers does not declare it (tests/test_runtime_install.py)
    assert not names & {"torch", "torchvision", "tensorflow", "tensorflow-cpu", "sentence-transformers"}, names
    assert "torch==2.13.0" in project["optional-dependencies"]["test"]
