"""The M2IO task: what the inserter sees and produces (candidate images and context in `candidates`, the
prompt, output formats, rewards, baselines). It imports retrieval, models and data below it, never `m2io_jax.rl`.
Submodules are imported explicitly (e.g. `from m2io_jax.inserter import candidates`).
"""
