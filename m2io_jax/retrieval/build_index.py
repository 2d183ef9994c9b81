"""Builds the retrieval index of a corpus ahead of time: chunks and their ScaNN index, one folder per dataset.

    python -m m2io_jax.retrieval.build_index --out=DIR                                   # the demo corpus
    python -m m2io_jax.retrieval.build_index --config=configs/tiny.py --out=RUN/index    # a run's data section
    python -m m2io_jax.retrieval.build_index --config=configs/mramg.py:/data/MRAMG --out=DIR [--dataset=recipe]

`--config` is a data config (`m2io_jax/data/config.py`, the default) or any config with a `data` section (the
training configs: `configs/tiny.py`); the data settings read are `data_dir` / `source` / `tfds_dir` (where the
documents come from), `datasets`, `chunk.max_tokens`, `retrieval.encoder_path`, `retrieval.batch_size` and
`retrieval.index`. The folders it writes are `m2io_jax.retrieval.index_cache`'s (`DIR/{dataset}/`).

`python -m m2io_jax.answer` and `python -m m2io_jax.evaluate --system` load the index from `{workdir}/index` when
it is present and matches the corpus and settings, and otherwise build it and cache it there
(`index_cache.load_or_build`); building it with this command first (`--out={workdir}/index`) is optional and
saves the first question's wait.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from absl import flags

from m2io_jax import cli
from m2io_jax.data import config as data_config
from m2io_jax.models import sentence_encoder
from m2io_jax.retrieval import index_cache

# allow_override: other commands define --out and --dataset too; the commands may be imported into one process
# (only the running command's flags are parsed)
_OUT = flags.DEFINE_string("out", None, "directory to write the index to, one folder per dataset (required)",
                           allow_override=True)
_DATASET = flags.DEFINE_string("dataset", None, "index only this dataset (default: each of config.datasets)",
                               allow_override=True)
_CONFIG = cli.define_config(data_config, "a data config, or a config with a data section (default: "
                                         "m2io_jax/data/config.py)")


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    cli.require(_OUT)
    data = index_cache.data_section(_CONFIG.value)
    names = [_DATASET.value] if _DATASET.value else list(data.datasets)
    encoder = sentence_encoder.load_encoder(data.retrieval.encoder_path)
    for name in names:
        start = time.perf_counter()
        documents = index_cache.corpus_documents(data, name)
        retriever = index_cache.build(_OUT.value, name, documents, data, encoder)
        print(f"{name}: {len(documents)} documents, {len(retriever.chunks)} chunks, indexed in "
              f"{time.perf_counter() - start:.1f} s -> {os.path.join(_OUT.value, name)}", flush=True)


if __name__ == "__main__":
    cli.run(main)
