"""Retrieval: sentence-aware chunking with image tracking (`chunking`), the ScaNN index (`index`), the corpus
retriever (`retriever`) and the recall command (`python -m m2io_jax.retrieval.recall`).

Submodules are imported explicitly, so that chunking does not import ScaNN or the encoder.
"""
