"""The one interface between causal language models and the code that samples from or trains them.

`Qwen2ForCausalLM` and `Qwen2_5_VLForConditionalGeneration` both implement `CausalLM`; the sampler and the
GRPO trainer use nothing else of a model. Its pieces:

- host side (numpy, before anything compiles): `prepare_prompts` validates prompts (and a VL model's images),
  left-pads them and computes positions, the position after the prompt (M-RoPE deltas included), the
  image-token index and the vision layout, as one `PreparedInputs`;
- device side: `encode_vision` (features once per prompt batch, passed back into every later pass),
  `prefill` (prompt -> last-token logits and the shared `PrefixCache`), `decode_step` (G rows per prompt
  against that prefix and their own `SuffixCache`), `completion_logprobs` (GRPO's log-prob pass: G
  completions of one prompt, the prompt run once).

Rows are left-padded, so the last column of every prompt is its last real token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class PreparedInputs:
    """A left-padded prompt batch as every device program takes it (numpy on the host, arrays under jit)."""

    ids: Any  # [B, P] int32
    mask: Any  # [B, P] int32, 0 on left padding
    positions: Any  # [B, P] (RoPE) or [3, B, P] (M-RoPE) int32
    next_position: Any  # [B] int32: position of the first token after the prompt (M-RoPE deltas included)
    image_index: Any = None  # [B, P] int32: vision feature row of each image token, -1 elsewhere; None for text
    vision: Any = None  # the vision tower's inputs for all images of the batch (VisionInputs), or None


@struct.dataclass
class PrefixCache:
    """Keys and values of the prompts, computed once and shared by the G rows of each prompt."""

    k: jax.Array  # [L, B, P, KV, hd]
    v: jax.Array  # [L, B, P, KV, hd]
    mask: jax.Array  # [B, P] bool, False on left padding
    next_position: jax.Array  # [B] int32: position of the first token after the prompt


@struct.dataclass
class SuffixCache:
    """Keys and values of the tokens each of the G rows of a prompt generated itself."""

    k: jax.Array  # [L, B, G, N, KV, hd]
    v: jax.Array  # [L, B, G, N, KV, hd]


class CausalLM(Protocol):
    """What the sampler and the trainer need of a model (module docstring)."""

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model embeds and predicts."""

    @property
    def max_length(self) -> int:
        """Most positions (prompt + generated tokens) one row may hold."""

    @property
    def vision_parameters(self) -> str | None:
        """The "/"-joined parameter path prefix of the vision tower (e.g. "visual"), None for a text model:
        a trainer that leaves it trainable recomputes the features inside its loss so gradients reach it."""

    def prepare_prompts(self, prompts: Sequence[Sequence[int]], images: Sequence[Any] | None, *, rows: int,
                        length: int) -> PreparedInputs:
        """Host side: left-pads `prompts` to [rows, length] (rows past the prompts: one-token dummies).

        `images`: per prompt, a processor output with `pixel_values` and `image_grid_thw`, or None; a text
        model raises when any is given, a VL model when a prompt's image tokens and its images' feature count
        differ (both errors name the prompt index).
        """

    def placeholder_prompts(self, batch_size: int, prompt_length: int, image_grid_thw: Any | None,
                            ) -> tuple[list[list[int]], list[Any] | None]:
        """Prompts and images (zero pixels) of these sizes, whose prepared inputs have the shapes of real ones
        (for compiling ahead of time). A text model raises when `image_grid_thw` is given."""

    def encode_vision(self, inputs: PreparedInputs) -> jax.Array | None:
        """Vision features [F, D] of the batch's images, or None without images. Compute once, pass back in."""

    def prefill(self, inputs: PreparedInputs, vision_features: jax.Array | None = None,
                ) -> tuple[jax.Array, PrefixCache]:
        """Runs the prompts once: logits of the next token [B, V] float32 and the prompts' `PrefixCache`.

        `vision_features` None with images in `inputs`: the vision tower runs here.
        """

    def init_suffix_cache(self, batch_size: int, num_samples: int, length: int) -> SuffixCache:
        """An empty `SuffixCache` for `num_samples` rows of `length` tokens per prompt."""

    def decode_step(self, tokens: jax.Array, prefix: PrefixCache, suffix: SuffixCache, slot: jax.Array, *,
                    span: int) -> tuple[jax.Array, SuffixCache]:
        """Feeds tokens [B, G] at suffix slot `slot` (a traced int32 scalar): writes their keys and values and
        returns the next-token logits [B, G, V] float32 with the updated cache. Attention reads the prefix and
        the first `span` (static) suffix slots, of which slots <= `slot` are visible."""

    def completion_logprobs(self, inputs: PreparedInputs, completions: jax.Array,
                            vision_features: jax.Array | None = None, *, temperature: float = 1.0,
                            suppress_tokens: Sequence[int] = ()) -> jax.Array:
        """log softmax(logits / temperature) of each completion token given its prompt and the completion's
        earlier tokens: completions [B, G, N] -> [B, G, N] float32. Each prompt runs once; its G completions
        attend to its keys and values with exact causal attention. Differentiable in the parameters.
        `suppress_tokens` are masked before the log-softmax (`suppress_logits`), as the sampler masks them."""


def suppress_logits(logits: jax.Array, tokens: Sequence[int]) -> jax.Array:
    """logits [..., V] with the columns of `tokens` set to -inf: never sampled, and left out of the softmax.

    The sampler and `completion_logprobs` both apply it, so sampled and trained log-probs compare like with like.
    """
    if not tokens:
        return logits
    return logits.at[..., jnp.asarray(tuple(tokens), jnp.int32)].set(-jnp.inf)


def left_pad(prompts: Sequence[Sequence[int]], rows: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """ids and mask [rows, length] int32: prompts right-aligned; rows past the prompts hold one token (id 0).

    Raises naming the prompt when one is longer than `length`.
    """
    if len(prompts) > rows:
        raise ValueError(f"{len(prompts)} prompts do not fit {rows} rows")
    ids = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), np.int32)
    for i, prompt in enumerate(prompts):
        if len(prompt) > length:
            raise ValueError(f"prompts[{i}] has {len(prompt)} tokens, more than the padded length {length}")
        ids[i, length - len(prompt):] = prompt
        mask[i, length - len(prompt):] = 1
    mask[len(prompts):, -1] = 1
    return ids, mask
