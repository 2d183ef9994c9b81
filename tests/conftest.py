"""Test session setup: 8 fake CPU devices, offline Hugging Face, a persistent JAX compilation cache.

Everything here runs before jax is imported by any test module.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ.get("M2IO_JAX_CACHE", os.path.expanduser("~/.cache/m2io_jax/jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
