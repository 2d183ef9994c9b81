"""The M2IO task: what the inserter sees and produces. `candidates` numbers a question's candidate images and
builds its context. The inserter imports retrieval, models and data below it, and never `m2io_jax.rl`.
"""
