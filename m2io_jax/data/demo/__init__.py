"""The embedded demo corpus: three small MRAMG-layout datasets built by `build.py` (see its docstring; command:
`python -m m2io_jax.data.demo.generate`)."""

import os

CORPUS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
DEMO_DATASETS = ("demo_web", "demo_recipe", "demo_manual")


def demo_root() -> str:
    """The directory holding the demo corpus in the MRAMG layout (generated into it on first use if absent)."""
    if not all(os.path.isfile(os.path.join(CORPUS_DIR, f"{n}_mqa.jsonl")) for n in DEMO_DATASETS):
        from m2io_jax.data.demo.build import generate

        generate(CORPUS_DIR)
    return CORPUS_DIR
