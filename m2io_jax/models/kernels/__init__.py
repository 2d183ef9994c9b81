"""Pallas TPU attention kernels behind `attention_impl="pallas"` (selected in `m2io_jax.models.attention`).

- `splash`: jax's splash attention (block-sparse flash attention with segment ids) for every differentiable
  pass: the decoder's causal attention (training, prefill), the vision tower's window and full-attention
  blocks, and the G completions of a prompt attending to its shared prefix (GRPO's log-prob pass);
- `decode`: the sampler's one-token decode attention, which reads each prompt's shared keys and values once for
  its G samples;
- `placement`: compiled Mosaic kernels on TPU, Pallas interpret mode elsewhere (CPU tests), and `shard_map`
  around every kernel under a mesh (Mosaic kernels are not partitioned automatically).
"""
