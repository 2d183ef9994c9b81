"""Analytic FLOPs of our models' device programs, from their configs alone (no model, no compilation).

What MFU divides by (the compile report `m2io_jax.bench.aot`, the profiler's per-step MFU) and what XLA's
`cost_analysis` is checked against. Only matmuls count (2 FLOPs per multiply-add); norms, rotary, softmax and
the loss are a fraction of a percent at our sizes.

Notation (Qwen2 decoder, `Qwen2Config`): L layers, width D, MLP width F, H query heads and KV key/value heads of
size hd, vocabulary V.

  linear, per token        2 L (2 D H hd + 2 D KV hd + 3 D F)       (q and o; k and v; gate, up and down)
  attention, per pair      4 L H hd                                 (q.k scores and probs.v, per query-key pair)
  LM head, per token       2 D V                                    (only where logits are computed)

Attention counts the pairs our XLA path computes: every query against every key slot of its rows (the causal and
padding masks are applied to dense scores), so a T-token causal forward costs T^2 pairs, not T (T + 1) / 2.

Programs (B prompts of P tokens, G samples each of N tokens, M = B G completion rows):

  prefill                  B P linear + B P^2 pairs + B LM-head rows (the last prompt token)
  decode step              M linear + M (P + S) pairs + M LM-head rows, S the suffix slots read (the stage span)
  completion log-probs     prefill + M N linear + M N (P + N) pairs + M (N - 1) LM-head rows  (prompt once, then
                           the completions against the prompt's keys and their own: the trainer's log-prob pass)
  GRPO update              forward x (1 + backward + recompute), per part (linear, attention, LM head):
                           backward 2 for trained weights (dX and dW), 1 for frozen weights (LoRA: dX only) and for
                           attention 2 (both operands of both products); recompute 1 for what the remat policy does
                           not save ("full": all layers; "save_dots": attention, whose batched dots are not saved;
                           the LM head's chunks are always rematerialised). Full fine-tuning without remat is the
                           textbook 3x forward.
  GRPO step (device)       rollout (prefill + N decode steps) + reference log-probs + old log-probs when
                           num_iterations > 1 + update.

Qwen2.5-VL's vision tower (`VisionConfig`: depth blocks of width d, MLP width f, patch row of p values, merge
unit u = 4 patches), per image of n patches in w windows of at most window_len (`wl`) patches:

  patch embedding          2 p d n
  blocks, linear           depth x 2 (4 d^2 + 3 d f) n
  window attention         (depth - full blocks) x 4 d wl^2 w      (each window padded to wl slots)
  full attention           full blocks x 4 d (w wl)^2              (an image's windows in one padded row)
  merger                   2 ((u d)^2 + u d D) n / u
The tower's forward runs once per step outside the update (features are passed in) unless the tower trains;
then each update recomputes it and adds its backward (2x) and remat.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from m2io_jax.models.qwen2 import Qwen2Config
from m2io_jax.models.qwen2_5_vl_config import Qwen2_5_VLConfig, VisionConfig
from m2io_jax.sampling.programs import decode_stages


@dataclasses.dataclass(frozen=True)
class Parts:
    """FLOPs of one program split by kind, so that backward and recompute multipliers apply per kind."""

    linear: float = 0.0  # weight matmuls of the decoder layers (and the vision blocks, patch embedding, merger)
    attention: float = 0.0  # q.k and probs.v
    head: float = 0.0  # the LM head

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.head

    def __add__(self, other: Parts) -> Parts:
        return Parts(self.linear + other.linear, self.attention + other.attention, self.head + other.head)

    def scaled(self, factor: float) -> Parts:
        return Parts(self.linear * factor, self.attention * factor, self.head * factor)


def linear_per_token(c: Qwen2Config) -> float:
    """2 L (2 D H hd + 2 D KV hd + 3 D F): every decoder layer's weight matmuls for one token."""
    d, h, kv, hd, f = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
    return 2.0 * c.num_hidden_layers * (2 * d * h * hd + 2 * d * kv * hd + 3 * d * f)


def attention_per_pair(c: Qwen2Config) -> float:
    """4 L H hd: scores and weighted values of one query-key pair in every layer."""
    return 4.0 * c.num_hidden_layers * c.num_attention_heads * c.head_dim


def head_per_token(c: Qwen2Config) -> float:
    """2 D V: the LM head for one token's logits."""
    return 2.0 * c.hidden_size * c.vocab_size


def text_config(config: Qwen2Config | Qwen2_5_VLConfig) -> Qwen2Config:
    """The decoder's config of a text model or of a Qwen2.5-VL model."""
    return config.text if isinstance(config, Qwen2_5_VLConfig) else config


def prefill(config: Qwen2Config | Qwen2_5_VLConfig, batch: int, prompt_length: int) -> Parts:
    """The sampler's prefill: B P linear + B P^2 pairs + B LM-head rows (image tokens count as prompt tokens)."""
    c = text_config(config)
    tokens = batch * prompt_length
    return Parts(linear_per_token(c) * tokens, attention_per_pair(c) * tokens * prompt_length,
                 head_per_token(c) * batch)


def decode_step(config: Qwen2Config | Qwen2_5_VLConfig, batch: int, num_samples: int, prompt_length: int,
                span: int) -> Parts:
    """One decode step of B x G rows whose KV cache holds P prompt slots and `span` suffix slots:
    M linear + M (P + span) pairs + M LM-head rows."""
    c = text_config(config)
    rows = batch * num_samples
    return Parts(linear_per_token(c) * rows, attention_per_pair(c) * rows * (prompt_length + span),
                 head_per_token(c) * rows)


def completion_logprobs(config: Qwen2Config | Qwen2_5_VLConfig, batch: int, num_samples: int, prompt_length: int,
                        completion_length: int) -> Parts:
    """The trainer's log-prob forward (prompt once, G completions of N tokens each against it), vision excluded:
    prefill + M N linear + M N (P + N) pairs + M (N - 1) LM-head rows."""
    c = text_config(config)
    tokens = batch * num_samples * completion_length
    completions = Parts(linear_per_token(c) * tokens,
                        attention_per_pair(c) * tokens * (prompt_length + completion_length),
                        head_per_token(c) * batch * num_samples * (completion_length - 1))
    return prefill(c, batch, prompt_length) + completions


def vision_forward(v: VisionConfig, grids: Sequence[tuple[int, int, int]]) -> Parts:
    """The vision tower on images of patch grids (t, h, w), as `image_grid_thw` gives them (formula: module
    docstring). The merger's output projection is counted as linear; the tower has no LM head."""
    d, f, u = v.hidden_size, v.intermediate_size, v.merge_unit
    full = len(v.fullatt_block_indexes)
    linear = attention = 0.0
    for t, h, w in grids:
        patches = t * h * w
        units = v.window_units
        windows = t * math.ceil(h // v.spatial_merge_size / units) * math.ceil(w // v.spatial_merge_size / units)
        linear += 2.0 * v.patch_dim * d * patches + v.depth * 2.0 * (4 * d * d + 3 * d * f) * patches
        linear += 2.0 * ((u * d) ** 2 + u * d * v.out_hidden_size) * patches / u
        attention += (v.depth - full) * 4.0 * d * v.window_len ** 2 * windows
        attention += full * 4.0 * d * (windows * v.window_len) ** 2
    return Parts(linear=linear, attention=attention)


def backward_and_recompute(forward: Parts, *, remat: str, trained_weights: bool) -> Parts:
    """The FLOPs a backward pass adds to `forward` (module docstring): backward 2x for trained weights, 1x for
    frozen ones, 2x for attention; plus the forward parts that `remat` recomputes (the LM head always)."""
    weight_backward = 2.0 if trained_weights else 1.0
    recompute = {"none": Parts(head=1.0), "save_dots": Parts(attention=1.0, head=1.0),
                 "full": Parts(1.0, 1.0, 1.0)}
    if remat not in recompute:
        raise ValueError(f"remat={remat!r}; expected one of {sorted(recompute)}")
    r = recompute[remat]
    return Parts(forward.linear * (weight_backward + r.linear), forward.attention * (2.0 + r.attention),
                 forward.head * (weight_backward + r.head))


def grpo_update(config: Qwen2Config | Qwen2_5_VLConfig, batch: int, num_samples: int, prompt_length: int,
                completion_length: int, *, lora: bool = False, train_vision: bool = False,
                grids: Sequence[tuple[int, int, int]] = ()) -> Parts:
    """One GRPO update over B prompts (all micro-batches together): the log-prob forward, its backward and remat
    recompute; with `train_vision` (full fine-tuning of a VL model whose tower trains) the tower's forward and
    backward on the prompts' images `grids` too. LoRA: base weights frozen (adapter FLOPs are negligible)."""
    c = text_config(config)
    forward = completion_logprobs(c, batch, num_samples, prompt_length, completion_length)
    total = forward + backward_and_recompute(forward, remat=c.remat, trained_weights=not lora)
    if train_vision and isinstance(config, Qwen2_5_VLConfig) and grids:
        tower = vision_forward(config.vision, grids)
        total = total + tower + backward_and_recompute(tower, remat=config.vision.remat, trained_weights=True)
    return total


def rollout(config: Qwen2Config | Qwen2_5_VLConfig, batch: int, num_samples: int, prompt_length: int,
            completion_length: int, spans: Sequence[int] | None = None) -> Parts:
    """The sampler: prefill, then N - 1 decode steps (the first token comes from the prefill). Decode step k
    (1 <= k < N) reads the smallest of `spans` that is >= k suffix slots (default: the sampler's
    `decode_stages(N)`)."""
    spans = sorted(spans or decode_stages(completion_length))
    total = prefill(config, batch, prompt_length)
    for step in range(1, completion_length):
        span = next((s for s in spans if s >= step), spans[-1])
        total = total + decode_step(config, batch, num_samples, prompt_length, span)
    return total


def grpo_step(config: Qwen2Config | Qwen2_5_VLConfig, batch: int, num_samples: int, prompt_length: int,
              completion_length: int, *, beta: float, num_iterations: int = 1, lora: bool = False,
              train_vision: bool = False, grids: Sequence[tuple[int, int, int]] = (),
              spans: Sequence[int] | None = None) -> dict[str, Parts]:
    """A whole GRPO step's device programs by name: "vision" (the tower once, when the model has images),
    "rollout", "reference_logprobs" (beta != 0), "old_logprobs" (num_iterations > 1) and "update" (per
    iteration, times num_iterations)."""
    programs: dict[str, Parts] = {}
    if isinstance(config, Qwen2_5_VLConfig) and grids:
        programs["vision"] = vision_forward(config.vision, grids)
    programs["rollout"] = rollout(config, batch, num_samples, prompt_length, completion_length, spans)
    forward = completion_logprobs(config, batch, num_samples, prompt_length, completion_length)
    if beta != 0.0:
        programs["reference_logprobs"] = forward
    if num_iterations > 1:
        programs["old_logprobs"] = forward
    programs["update"] = grpo_update(config, batch, num_samples, prompt_length, completion_length, lora=lora,
                                     train_vision=train_vision, grids=grids).scaled(num_iterations)
    return programs
