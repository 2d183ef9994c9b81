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
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # TPU-topology compiles in several processes at once

import jax

_CACHE_DIR = os.environ.get("M2IO_JAX_CACHE", os.path.expanduser("~/.cache/m2io_jax/jax_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import pytest  # noqa: E402

# Tiny Qwen2 shapes covering tied/untied heads, GQA ratio 1 and > 1, head_dim != hidden/heads, rope theta.
TINY_QWEN2 = {
    "tied_gqa": dict(vocab_size=512, hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
    "untied_mha": dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, rope_theta=1e4),
    "wide_head_dim": dict(vocab_size=256, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                          num_attention_heads=6, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
                          rope_theta=5e5),
}


def build_hf_qwen2(directory, seed: int = 0, init_std: float = 0.1, **shape):
    """Builds a random transformers Qwen2ForCausalLM, saves it to `directory` and returns the torch model."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(max_position_embeddings=512, rms_norm_eps=1e-6, **shape)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, init_std)
    model.save_pretrained(str(directory))
    return model


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """name -> (checkpoint dir, torch model) for every TINY_QWEN2 shape, built once per session."""
    out = {}
    for i, (name, shape) in enumerate(TINY_QWEN2.items()):
        directory = tmp_path_factory.mktemp(f"qwen2_{name}")
        out[name] = (str(directory), build_hf_qwen2(directory, seed=i, **shape))
    return out


def left_padded_batch(vocab_size: int, lengths, seed: int = 0):
    """input_ids [B, T] with left padding (pad id 0), attention_mask [B, T] and HF-style position_ids [B, T]."""
    import numpy as np

    rng = np.random.RandomState(seed)
    t = max(lengths)
    ids = np.zeros((len(lengths), t), np.int32)
    mask = np.zeros((len(lengths), t), np.int32)
    for row, n in enumerate(lengths):
        ids[row, t - n:] = rng.randint(1, vocab_size, n)
        mask[row, t - n:] = 1
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    return ids, mask, positions


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops jax's in-memory compilation caches after each test module.

    One process compiles over a thousand programs in this suite; XLA:CPU keeps each executable's machine code
    in its own memory mappings, and the process runs out of them (LLVM "Unable to allocate section memory",
    vm.max_map_count) unless executables nobody uses any more are released. Later modules reload what they need
    from the persistent cache on disk.
    """
    yield
    jax.clear_caches()
