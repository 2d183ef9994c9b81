"""Data: the MRAMG-Bench reader (`mramg`), the embedded demo corpus (`demo`), the TFDS builder
(`tfds_builder`), train/validation/test splits (`splits`), sentence splitting and image markers (`sentences`),
and the package's default data, retrieval and candidate settings (`config`). Data imports nothing above it.

Submodules are imported explicitly (e.g. `from m2io_jax.data import mramg`) so that reading jsonl does not
import tensorflow_datasets.
"""
