"""GRPO group sampling throughput: m2io_jax's shared-prefix sampler against transformers and tunix.

    python -m m2io_jax.bench.sampler [--size=40m|150m] [--workloads=1024x128,128x128] [--scaling]

One random Qwen2 (tied embeddings, vocabulary 32,000; `40m`: width 512, 8 layers; `150m`: width 1024,
10 layers) is written once as a Hugging Face safetensors checkpoint and loaded by all three engines, float32,
on the same CPU threads. Each workload is 8 prompts of P random tokens x G = 8 samples, temperature 1, exactly
N new tokens (no stop token), counted as 8 * G * N tokens:

- m2io_jax `sampling.generate(num_samples=G)`: each prompt prefilled once, G samples share its cache;
- transformers `generate(do_sample=True, num_return_sequences=G, top_k=0)`: prompts expanded G times;
- tunix `Sampler` (its own Qwen2 loaded by `create_model_from_safe_tensors`): prompts repeated G times, as
  its GRPO learner does.

Compilation is excluded (one warm-up call of the same shapes for the JAX engines). Beside each ratio the FLOP
ceiling of prefill sharing: analytic FLOPs of sampling with G prefills per prompt over FLOPs with one (matmul
and attention FLOPs, an LM head on generated tokens only), i.e. the speed-up sharing gives an engine whose time
is proportional to FLOPs. `--scaling` prints m2io_jax tokens/s for G in 1, 4, 8, 16 and P from 128 to 2048
(32 new tokens).
The last line is one JSON object (the main workload: the first of `--workloads`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Sequence

import numpy as np
from absl import flags

from m2io_jax import cli

SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1024),
    "40m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=1536, vocab_size=32000),
    "150m": dict(hidden_size=1024, num_hidden_layers=10, num_attention_heads=16, num_key_value_heads=4,
                 intermediate_size=2816, vocab_size=32000),
}
NUM_PROMPTS = 8

_SIZE = flags.DEFINE_enum("size", "40m", sorted(SIZES), "model size")
_WORKLOADS = flags.DEFINE_string("workloads", "1024x128,128x128", "PROMPTxNEW,... (the first is the main one)")
_SAMPLES = flags.DEFINE_integer("samples", 8, "G, samples per prompt")
_SCALING = flags.DEFINE_bool("scaling", False, "only the m2io_jax scaling table")
_SCALING_NEW = flags.DEFINE_integer("scaling_new", 32, "new tokens in the scaling table")
_SCALING_PROMPTS = flags.DEFINE_string("scaling_prompts", "128,512,2048", "prompt lengths in the scaling table")
_REPEATED = flags.DEFINE_bool("repeated", False, "also time m2io_jax without prefix sharing")
_SKIP_PEERS = flags.DEFINE_bool("skip_peers", False, "time m2io_jax only")


@dataclasses.dataclass(frozen=True)
class Workload:
    prompt: int
    new: int
    samples: int = 8

    @property
    def tokens(self) -> int:
        return NUM_PROMPTS * self.samples * self.new

    def __str__(self) -> str:
        return f"{self.prompt}+{self.new}"


def model_flops(shape: dict, w: Workload, *, shared: bool) -> float:
    """Analytic FLOPs of sampling `w` (one prefill per prompt when `shared`, else one per sample)."""
    d, layers, heads, kv = (shape["hidden_size"], shape["num_hidden_layers"], shape["num_attention_heads"],
                            shape["num_key_value_heads"])
    hd = d // heads
    per_layer = d * heads * hd * 2 + 2 * d * kv * hd + 3 * d * shape["intermediate_size"]
    matmul = 2 * layers * per_layer  # per token

    def tokens(start: int, count: int) -> float:  # matmuls + attention over a growing context
        ctx = count * start + count * (count + 1) / 2
        return matmul * count + 4 * layers * heads * hd * ctx

    head = 2 * d * shape["vocab_size"]
    prefill = tokens(0, w.prompt) * NUM_PROMPTS * (1 if shared else w.samples)
    decode = (tokens(w.prompt, w.new) + head * w.new) * NUM_PROMPTS * w.samples
    return prefill + decode


def sharing_ceiling(shape: dict, w: Workload) -> float:
    return model_flops(shape, w, shared=False) / model_flops(shape, w, shared=True)


def write_checkpoint(shape: dict, directory: str, max_length: int):
    """A random transformers Qwen2ForCausalLM saved to `directory`; returns the torch model."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
                         max_position_embeddings=max_length, **shape)
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(directory)
    return model


def random_prompts(vocab: int, w: Workload, seed: int = 0) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [rng.randint(1, vocab - 1, w.prompt).tolist() for _ in range(NUM_PROMPTS)]


def time_m2io(model, prompts, w: Workload, *, repeated: bool = False) -> float:
    from m2io_jax import sampling

    fn = sampling.generate_repeated if repeated else sampling.generate
    kwargs = dict(max_new_tokens=w.new, num_samples=w.samples, temperature=1.0)
    sampling.precompile(model, batch_size=len(prompts), prompt_length=w.prompt, repeated=repeated, **kwargs)
    compiles = sampling.compile_count()
    start = time.perf_counter()
    out = fn(model, prompts, **kwargs, seed=2)
    elapsed = time.perf_counter() - start
    assert sum(len(t) for t in out.tokens) == w.tokens
    assert sampling.compile_count() == compiles, "the timed call compiled"
    return elapsed


def time_transformers(model, prompts, w: Workload) -> float:
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    with torch.no_grad():
        model.generate(ids[:1, :8], attention_mask=torch.ones_like(ids[:1, :8]), do_sample=True, max_new_tokens=2)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, num_return_sequences=w.samples, max_new_tokens=w.new, min_new_tokens=w.new,
                             eos_token_id=None, pad_token_id=0)
        elapsed = time.perf_counter() - start
    assert out.shape == (NUM_PROMPTS * w.samples, w.prompt + w.new)
    return elapsed


class IdTokenizer:
    """tunix tokenizer adapter over space-separated token ids (prompts are already token ids)."""

    def encode(self, text: str, **_) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **_) -> str:
        return " ".join(str(int(t)) for t in ids)

    def bos_id(self):
        return None

    def eos_id(self) -> int:
        return -1

    def pad_id(self) -> int:
        return 0


def _precompile_tunix(sampler, texts: list[str], w: Workload) -> None:
    """Compiles tunix's prefill and decode programs for these shapes ahead of time (as its __call__ builds them),
    so that the timed call neither compiles nor needs a full warm-up run."""
    import jax
    import jax.numpy as jnp
    from tunix.generate import utils

    sampler.eos_ids = jnp.array([-1])
    ids = np.array([utils.pad_to_length(sampler.tokenize(t), target_length=w.prompt, pad_value=0, left=True)
                    for t in texts])
    state = sampler.init_sample_state(
        jnp.array(ids), include_logits=False, total_sampling_steps=w.prompt + w.new, forbidden_token_ids=None,
        temperature=1.0, top_p=1.0, top_k=None, seed=jax.random.PRNGKey(1), beam_size=None, include_logprobs=False)
    params = sampler._flattened_transformer_state
    sampler._compiled_prefill_fn.lower(params, state, None, echo=False).compile()
    after_prefill = jax.eval_shape(lambda p, s: sampler._prefill_fn(p, s, None, echo=False), params, state)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # the real call passes committed arrays
    after_prefill = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=x.weak_type, sharding=device), after_prefill)
    sampler._compiled_decode_fn.lower(params, after_prefill).compile()


def tunix_model_config(shape: dict):
    """tunix's Qwen2 ModelConfig of the checkpoint `write_checkpoint(shape, ...)` writes."""
    from tunix.models.qwen2 import model as tunix_model

    d, heads = shape["hidden_size"], shape["num_attention_heads"]
    return tunix_model.ModelConfig(
        num_layers=shape["num_hidden_layers"], vocab_size=shape["vocab_size"], embed_dim=d,
        hidden_dim=shape["intermediate_size"], num_heads=heads, head_dim=d // heads,
        num_kv_heads=shape["num_key_value_heads"], rope_theta=1_000_000, norm_eps=1e-6, use_tied_embedding=True)


def time_tunix(directory: str, shape: dict, prompts, w: Workload) -> float:
    from tunix.generate.sampler import CacheConfig, Sampler
    from tunix.models.qwen2 import params as tunix_params

    config = tunix_model_config(shape)
    model = tunix_params.create_model_from_safe_tensors(directory, config)
    sampler = Sampler(model, IdTokenizer(), CacheConfig(cache_size=w.prompt + w.new, num_layers=config.num_layers,
                                                         num_kv_heads=config.num_kv_heads, head_dim=config.head_dim))
    texts = [" ".join(map(str, p)) for p in prompts for _ in range(w.samples)]
    kwargs = dict(max_generation_steps=w.new, max_prompt_length=w.prompt, temperature=1.0, top_p=1.0,
                  eos_tokens=[-1])
    _precompile_tunix(sampler, texts, w)
    start = time.perf_counter()
    out = sampler(texts, **kwargs, seed=2)
    elapsed = time.perf_counter() - start
    assert sum(len(t) for t in out.tokens) == w.tokens
    return elapsed


def run_workload(size: str, directory: str, torch_model, model, w: Workload, *, repeated: bool,
                 peers: bool) -> dict:
    """Times one workload on every engine, prints its table and returns its figures."""
    shape = SIZES[size]
    prompts = random_prompts(shape["vocab_size"], w)
    seconds = {"m2io_jax": time_m2io(model, prompts, w)}
    if repeated:
        seconds["m2io_jax_repeated_prefill"] = time_m2io(model, prompts, w, repeated=True)
    if peers:
        seconds["transformers"] = time_transformers(torch_model, prompts, w)
        seconds["tunix"] = time_tunix(directory, shape, prompts, w)
    tps = {k: w.tokens / v for k, v in seconds.items()}
    ceiling = sharing_ceiling(shape, w)
    print(f"\n{size} model, prompt {w.prompt} + {w.new} new, {NUM_PROMPTS} prompts x G={w.samples} "
          f"({w.tokens} tokens); FLOP ceiling of prefill sharing {ceiling:.2f}x")
    print(f"  {'engine':28s} {'seconds':>8s} {'tokens/s':>9s} {'m2io_jax speed-up':>18s}")
    for name, s in seconds.items():
        ratio = seconds[name] / seconds["m2io_jax"]
        print(f"  {name:28s} {s:8.2f} {tps[name]:9.1f} {ratio:12.2f}x  (ceiling {ceiling:.2f}x)")
    return {"workload": str(w), "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
            "ratios": {f"vs_{k}": round(seconds[k] / seconds["m2io_jax"], 2) for k in seconds if k != "m2io_jax"},
            "flop_ceiling": round(ceiling, 2)}


def run_scaling(size: str, model, new: int, prompt_lengths: Sequence[int]) -> list[dict]:
    """m2io_jax tokens/s for G in 1, 4, 8, 16 at each prompt length, `new` new tokens; prints the table."""
    shape = SIZES[size]
    rows = []
    print(f"\nm2io_jax scaling ({size}, {NUM_PROMPTS} prompts, {new} new tokens): tokens/s "
          f"(FLOP ceiling of prefill sharing)")
    print("  prompt " + "".join(f"{'G=' + str(g):>18s}" for g in (1, 4, 8, 16)))
    for p in prompt_lengths:
        cells = []
        for g in (1, 4, 8, 16):
            w = Workload(p, new, g)
            tps = w.tokens / time_m2io(model, random_prompts(shape["vocab_size"], w), w)
            ceiling = sharing_ceiling(shape, w)
            rows.append({"prompt": p, "samples": g, "tokens_per_s": round(tps, 1), "flop_ceiling": round(ceiling, 2)})
            cells.append(f"{tps:9.1f} ({ceiling:4.2f}x)")
        print(f"  {p:6d} " + "".join(f"{c:>18s}" for c in cells), flush=True)
    return rows


def _ints(flag: flags.FlagHolder, text: str, separator: str) -> list[int]:
    """The integers of a `separator`-separated flag value; a malformed value is a user error naming the flag."""
    try:
        return [int(x) for x in text.split(separator)]
    except ValueError:
        raise cli.UserError(f"--{flag.name}={flag.value}: expected integers separated by {separator!r}") from None


def parse_workloads(flag: flags.FlagHolder, samples: int) -> list[Workload]:
    """`PROMPTxNEW,...` of `flag` as workloads of `samples` samples per prompt."""
    pairs = [_ints(flag, x, "x") for x in flag.value.split(",")]
    if any(len(pair) != 2 for pair in pairs):
        raise cli.UserError(f"--{flag.name}={flag.value}: expected PROMPTxNEW,... (e.g. 1024x128,128x128)")
    return [Workload(prompt, new, samples) for prompt, new in pairs]


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    size = _SIZE.value
    workloads = parse_workloads(_WORKLOADS, _SAMPLES.value)
    prompt_lengths = _ints(_SCALING_PROMPTS, _SCALING_PROMPTS.value, ",")

    import jax
    import torch

    from m2io_jax import models, sampling

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    shape = SIZES[size]
    max_length = max(4096, max(w.prompt + w.new for w in workloads))
    print(f"devices: {jax.devices()}; torch threads {threads}; jax {jax.__version__}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as directory:
        torch_model = write_checkpoint(shape, directory, max_length)
        n_params = sum(p.numel() for p in torch_model.parameters())
        print(f"model {size}: {n_params / 1e6:.1f}M parameters (tied embeddings), float32")
        model = models.from_pretrained(directory)
        if _SCALING.value:
            result = {"size": size, "scaling": run_scaling(size, model, _SCALING_NEW.value, prompt_lengths)}
        else:
            results = [run_workload(size, directory, torch_model, model, w, repeated=_REPEATED.value,
                                    peers=not _SKIP_PEERS.value) for w in workloads]
            main_result = results[0]
            result = {"size": size, "main_workload": main_result["workload"],
                      "tokens_per_s": main_result["tokens_per_s"], "ratios": main_result["ratios"],
                      "flop_ceiling": main_result["flop_ceiling"], "other_workloads": results[1:],
                      "compiles": sampling.compile_counts()}
    print(json.dumps(result))


if __name__ == "__main__":
    cli.run(main)
