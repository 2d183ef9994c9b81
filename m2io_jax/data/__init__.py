"""Data: the MRAMG-Bench reader (`mramg`), the embedded demo corpus (`demo`), the TFDS builder
(`tfds_builder`), train/validation/test splits (`splits`), candidate numbering and prompt context
(`prompts`), and the data/retrieval config (`config`).

Submodules are imported explicitly (e.g. `from m2io_jax.data import mramg`) so that reading jsonl does not
import tensorflow_datasets.
"""
