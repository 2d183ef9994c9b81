"""Batched KV-cache sampler with shared-prefix group sampling (GRPO's "prefill once, sample G").

One module per concern:
  tokens    token selection (`filter_logits`, `choose_tokens`, `row_keys`), usable on its own;
  programs  the device programs (prefill, decode loop) over the `CausalLM` model protocol;
  requests  host-side validation, `Buckets` and the row layout of a request;
  layout    parameters and rows on a mesh (`sampling_rules`, `sampling_params`);
  compiles  counts of real compilations (`compile_count`, `compile_counts`);
  sampler   the entry points `generate`, `generate_prepared`, `generate_repeated`, `precompile`.
"""

from m2io_jax.sampling.compiles import compile_count, compile_counts
from m2io_jax.sampling.layout import sampling_params, sampling_rules
from m2io_jax.sampling.programs import decode_stages
from m2io_jax.sampling.requests import DEFAULT_BUCKETS, Buckets, SampleOutput
from m2io_jax.sampling.sampler import generate, generate_prepared, generate_repeated, precompile
from m2io_jax.sampling.tokens import choose_tokens, filter_logits, row_keys

__all__ = [
    "DEFAULT_BUCKETS", "Buckets", "SampleOutput", "choose_tokens", "compile_count", "compile_counts",
    "decode_stages", "filter_logits", "generate", "generate_prepared", "generate_repeated", "precompile", "row_keys",
    "sampling_params", "sampling_rules",
]
