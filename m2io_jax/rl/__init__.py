"""Generic reinforcement learning for the policies: GRPO math (`grpo`), the optimizer (`optimizer`) and their
default configs (`config`). Task-agnostic: imports nothing from data, retrieval, eval or inserter."""
