"""Retrieval on the embedded demo corpus: the package default (`m2io_jax/data/config.py`), named as an
experiment so that runs record which config they used; copy it to start a new experiment.

    python -m m2io_jax.retrieval.recall --config=configs/demo.py
    python -m m2io_jax.retrieval.recall --config=configs/demo.py --config.chunk.max_tokens=128
"""

import ml_collections

from m2io_jax.data import config as data_config


def get_config() -> ml_collections.ConfigDict:
    return data_config.get_config()
