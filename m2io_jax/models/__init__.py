"""Model zoo: Flax NNX ports of the Hugging Face architectures m2io_jax uses.

`from_pretrained(path)` reads `config.json` in a local Hugging Face checkpoint directory and returns the model
for its `model_type`; `save_pretrained(model, path)` writes a directory that transformers loads back.
"""

from m2io_jax.models.registry import from_pretrained, save_pretrained, supported_model_types

__all__ = ["from_pretrained", "save_pretrained", "supported_model_types"]
