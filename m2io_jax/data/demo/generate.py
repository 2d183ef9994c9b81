"""Regenerates the embedded demo corpus (see `m2io_jax.data.demo.build`); two runs write the same bytes.

    python -m m2io_jax.data.demo.generate [--out DIR] [--scale=1]     (default: m2io_jax/data/demo/corpus)

`--scale=2` or `3` writes a corpus that many times larger (`build.generate`); only scale 1 is committed.
"""

from __future__ import annotations

from typing import Sequence

from absl import flags

from m2io_jax import cli
from m2io_jax.data.demo import CORPUS_DIR, build

_OUT = flags.DEFINE_string("out", CORPUS_DIR, "output directory (MRAMG layout)", allow_override=True)
_SCALE = flags.DEFINE_integer("scale", 1, f"corpus size multiplier, 1..{build.MAX_SCALE}")


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    names = build.generate(_OUT.value, _SCALE.value)
    print(f"wrote {', '.join(names)} to {_OUT.value}")


if __name__ == "__main__":
    cli.run(main)
