"""Retrieval on MRAMG-Bench (all six datasets, MRAMG's recipe: 256-token chunks, top 10), from a local download.

    python -m m2io_jax.retrieval.recall --config=configs/mramg.py:/path/to/MRAMG-Bench [--dataset recipe]

The text after `:` is the download directory (the default, `MRAMG-Bench`, is where
`huggingface-cli download MRAMG/MRAMG-Bench --repo-type dataset --local-dir MRAMG-Bench` puts it).
"""

import ml_collections

from m2io_jax.data import config as data_config
from m2io_jax.data import mramg


def get_config(data_dir: str = "MRAMG-Bench") -> ml_collections.ConfigDict:
    c = data_config.get_config()
    c.data_dir = data_dir
    c.datasets = mramg.DATASETS
    return c
