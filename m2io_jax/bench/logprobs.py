"""What GRPO's prefix-shared log-probs save, and what the sampler's once-per-step weight re-layout costs.

    python -m m2io_jax.bench.logprobs [--cases=vl_tiny@576x32x2x8,...] [--repeats=3] [--max_timed_tokens=0]
                                      [--refresh_cases=vl_tiny@128x32x8x8,...] [--fake_devices=8]

Models (random weights, float32, built with `m2io_jax.models.tiny`): `vl_tiny`, the Qwen2.5-VL of
configs/tiny.py (decoder width 64, 2 layers, 2-block vision tower); `vl_wide`, the same with a decoder of width
256 and 4 layers; `text_40m`, the text Qwen2 "40m" of `m2io_jax.bench.sampler` (width 512, 8 layers, vocabulary
32,000). A case is `MODEL@PxNxBxG`: B prompts of P tokens (prompt i is 3 * i tokens shorter, so left padding is
in play; a VL prompt holds IMAGES_PER_PROMPT images of random pixels) and G completions of N random tokens each.

1. Log-prob + gradient pass (`--cases`): `jax.value_and_grad` of the sum of the completions' log-probs with
   respect to every parameter, in two layouts:
   - shared: `CausalLM.completion_logprobs(inputs, completions [B, G, N])`, each prompt run once and its G
     completions attending to its keys and values (what `rl.Trainer` runs);
   - full: prompt + completion concatenated into B * G rows, prepared from scratch (positions, image-feature
     index), one ordinary forward, log-probs of the completion tokens (logits of those positions only).
   The vision features are computed once outside the timed pass in both layouts (the tiny config freezes the
   tower, so the trainer computes them once per step). Figures: steady-state seconds per pass (compilation
   excluded: one untimed call, then the median of `--repeats` calls, the layouts alternating), the speedup,
   the compiled programs' FLOPs (XLA `cost_analysis`) with their ratio, the same from an analytic matmul count
   (`analytic_gflop`: XLA counts the body of the layers' `lax.scan` once, not once per layer, so its figures
   undercount both layouts and weigh the LM head too heavily), and the largest log-prob difference between the
   layouts. A case whose full layout holds more than `--max_timed_tokens` tokens (B * G * (P + N);
   0: no limit) is compiled and counted but not run (its activations may not fit a small machine).
2. Weight-layout refresh (`--refresh_cases`): on a mesh of every device on the fsdp axis (`--fake_devices`
   fake CPU devices, set before jax starts), the parameters fsdp-sharded as `rl.Trainer` places them,
   `sampling.sampling_params` (the sampler re-lays the weights out without the fsdp axis once per `generate`
   call, i.e. once per GRPO step) is timed against a whole `Trainer.grpo_step` (config: the case's shape, beta
   0, one iteration, float32), after two untimed steps. Bytes moved = bytes every device holds after the
   re-layout minus before (the all-gather's output). On one device there is no mesh and nothing moves: its
   `sampling_params` time is reported too.

Prints a table per part; the last line is one JSON object with every figure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import flags

from m2io_jax import cli
from m2io_jax.bench.sampler import SIZES

MODELS: dict[str, dict[str, Any]] = {
    "vl_tiny": dict(kind="qwen2_5_vl", vocab_size=2048, text_shape={}),
    "vl_wide": dict(kind="qwen2_5_vl", vocab_size=2048,
                    text_shape=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2)),
    "text_40m": dict(kind="qwen2", vocab_size=SIZES["40m"]["vocab_size"],
                     text_shape={k: v for k, v in SIZES["40m"].items() if k != "vocab_size"}),
}
IMAGES_PER_PROMPT = 4
IMAGE_GRID = (1, 8, 8)  # 8 x 8 patches of 14 px: 16 image tokens each
FIRST_TEXT_ID = 7  # ids below are the tiny tokenizer's special tokens (`tiny.SPECIAL_TOKENS`)
SHORTER_PER_PROMPT = 3

_CASES = flags.DEFINE_list(
    "cases", [f"{m}@{s}" for m in MODELS for s in ("576x32x2x8", "1024x128x8x8")],
    "log-prob cases MODEL@PxNxBxG (models: " + ", ".join(MODELS) + ")")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls per layout and case, and timed steps per refresh case",
                                allow_override=True)
_MAX_TIMED_TOKENS = flags.DEFINE_integer("max_timed_tokens", 0, "run a log-prob case only when its full layout "
                                         "holds at most this many tokens (0: no limit); larger: FLOPs only")
_REFRESH_CASES = flags.DEFINE_list("refresh_cases", ["vl_tiny@512x32x8x8", "text_40m@128x32x8x8"],
                                   "weight-layout refresh cases MODEL@PxNxBxG (B a multiple of the device count)")
_FAKE_DEVICES = flags.DEFINE_integer("fake_devices", 8, "fake CPU devices for the refresh mesh, set in XLA_FLAGS "
                                     "before jax starts (0: leave XLA_FLAGS alone)")


@dataclasses.dataclass(frozen=True)
class Case:
    """One model on one shape: B prompts of up to P tokens, G completions of N tokens each."""

    model: str
    prompt: int
    new: int
    prompts: int
    samples: int

    @property
    def full_tokens(self) -> int:
        return self.prompts * self.samples * (self.prompt + self.new)

    def __str__(self) -> str:
        return f"{self.model}@{self.prompt}x{self.new}x{self.prompts}x{self.samples}"


def parse_case(text: str, flag: str) -> Case:
    """`MODEL@PxNxBxG` -> Case; raises cli.UserError naming the flag and the malformed entry."""
    model, _, shape = text.partition("@")
    sizes = shape.split("x")
    if model not in MODELS or len(sizes) != 4 or not all(s.isdigit() and int(s) > 0 for s in sizes):
        raise cli.UserError(f"--{flag}: {text!r} is not MODEL@PxNxBxG with MODEL in {sorted(MODELS)} and "
                            f"positive integers, e.g. vl_tiny@576x32x2x8")
    case = Case(model, *map(int, sizes))
    if case.prompt <= SHORTER_PER_PROMPT * (case.prompts - 1) + _image_tokens(model):
        raise cli.UserError(f"--{flag}: {text!r}: prompt length {case.prompt} leaves no text in the shortest of "
                            f"{case.prompts} prompts")
    return case


def _image_tokens(model: str) -> int:
    """Tokens the images of one prompt take (placeholders plus vision start/end), 0 for a text model."""
    if MODELS[model]["kind"] != "qwen2_5_vl":
        return 0
    return IMAGES_PER_PROMPT * (int(np.prod(IMAGE_GRID)) // 4 + 2)


def set_fake_devices(count: int) -> None:
    """Asks XLA for `count` host devices; must run before jax is imported (raises cli.UserError after)."""
    import sys

    if count <= 0:
        return
    if "jax" in sys.modules:
        raise cli.UserError(f"--fake_devices={count}: jax was imported before the flag could take effect")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={count}").strip()


def build_model(name: str, seed: int = 0):
    """The random float32 model `name` of MODELS (an nnx module implementing `CausalLM`)."""
    from m2io_jax.models import tiny

    spec = MODELS[name]
    return tiny.init_model(tiny.hf_config(spec["kind"], spec["vocab_size"], text_shape=spec["text_shape"]),
                           seed=seed)


def random_prompts(model, case: Case, seed: int) -> tuple[list[list[int]], list[dict[str, np.ndarray]] | None]:
    """B prompts of random text tokens (prompt i is SHORTER_PER_PROMPT * i tokens shorter than P); a VL model's
    open with IMAGES_PER_PROMPT images of random pixels, each as vision start, its placeholders, vision end."""
    rng = np.random.default_rng(seed)
    vocab = model.vocab_size
    prompts, images = [], []
    for i in range(case.prompts):
        length = case.prompt - SHORTER_PER_PROMPT * i
        head: list[int] = []
        if MODELS[case.model]["kind"] == "qwen2_5_vl":
            c = model.config
            per_image = int(np.prod(IMAGE_GRID)) // c.vision.spatial_merge_size**2
            for _ in range(IMAGES_PER_PROMPT):
                head += [c.vision_start_token_id, *[c.image_token_id] * per_image, c.vision_end_token_id]
            grid = np.tile(np.array([IMAGE_GRID], np.int64), (IMAGES_PER_PROMPT, 1))
            pixels = rng.standard_normal((int(grid.prod(axis=1).sum()), c.vision.patch_dim)).astype(np.float32)
            images.append({"pixel_values": pixels, "image_grid_thw": grid})
        prompts.append(head + rng.integers(FIRST_TEXT_ID, vocab, length - len(head)).tolist())
    return prompts, images or None


def full_layout_inputs(model, inputs, images, completions: np.ndarray):
    """PreparedInputs of the B * G rows prompt + completion (each row with its prompt's images), from scratch."""
    from m2io_jax.models.protocol import PreparedInputs
    from m2io_jax.models.qwen2 import default_positions
    from m2io_jax.models.qwen2_5_vl_inputs import prepare_inputs

    b, g, n = completions.shape
    ids = np.concatenate([np.repeat(inputs.ids, g, axis=0), completions.reshape(b * g, n)], axis=1)  # [B*G, P+N]
    mask = np.concatenate([np.repeat(inputs.mask, g, axis=0), np.ones((b * g, n), np.int32)], axis=1)
    if images is None:
        return PreparedInputs(ids=ids, mask=mask, positions=default_positions(mask),
                              next_position=mask.sum(axis=1).astype(np.int32))
    rows = [images[i] for i in range(b) for _ in range(g)]
    return prepare_inputs(model.config, ids, attention_mask=mask,
                          pixel_values=np.concatenate([r["pixel_values"] for r in rows]),
                          image_grid_thw=np.concatenate([r["image_grid_thw"] for r in rows]))


def shared_logprobs(model, inputs, completions, features):
    """[B, G, N] log-probs in the shared layout (the trainer's `completion_logprobs`)."""
    return model.completion_logprobs(inputs, completions, features)


def full_logprobs(model, full, completions, features):
    """[B, G, N] log-probs in the full layout: one forward over the B * G rows of prompt + completion, logits of
    the positions that predict completion tokens only."""
    b, g, n = completions.shape
    p = full.ids.shape[1] - n
    if model.vision_parameters is None:
        hidden, _ = model.forward(model.embed(full.ids), positions=full.positions, segment_ids=full.mask)
    else:
        hidden, _ = model.forward(full.ids, positions=full.positions, segment_ids=full.mask,
                                  image_token_index=full.image_index, vision_features=features)
    return model.token_logprobs(hidden[:, p - 1:-1], full.ids[:, p:]).reshape(b, g, n)  # [B, G, N]


def value_and_grad_program(model, logprobs_fn: Callable, *args):
    """The compiled `value_and_grad` (over every parameter) of sum(logprobs_fn(model, *args)), log-probs as aux;
    returns (compiled, parameters, GFLOP of the compiled program)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, *a):
        logp = logprobs_fn(nnx.merge(graphdef, p, rest), *a)
        return jnp.sum(logp), logp

    compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params, *args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return compiled, params, float(cost["flops"]) / 1e9


def analytic_gflop(case: Case, *, shared: bool) -> float:
    """Matmul GFLOP of the decoder's log-prob + gradient pass (backward = 2x forward; 2 FLOPs per multiply-add).

    Projections and MLP per token and layer; attention as the xla implementation computes it, every [query, key]
    pair of the score matrix (masked ones too): shared, each prompt's P x P and each completion's N x (P + N);
    full, (P + N)^2 per row. The LM head on the B * G * N completion tokens in both layouts. Vision excluded (its
    features are computed once, outside the pass). XLA's `cost_analysis` counts a `lax.scan` body once, not once
    per layer, so for this model (layers in a scan) it undercounts both layouts; this count does not.
    """
    from m2io_jax.models.tiny import TEXT_SHAPE

    t = {**TEXT_SHAPE, **MODELS[case.model]["text_shape"]}
    d, layers, heads = t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"]
    kv, hd = t["num_key_value_heads"], d // heads
    per_token = 2 * (2 * d * heads * hd + 2 * d * kv * hd + 3 * d * t["intermediate_size"])
    b, g, p, n = case.prompts, case.samples, case.prompt, case.new
    if shared:
        tokens, pairs = b * p + b * g * n, b * p * p + b * g * n * (p + n)
    else:
        tokens, pairs = b * g * (p + n), b * g * (p + n) ** 2
    lm_head = 2 * d * MODELS[case.model]["vocab_size"] * b * g * n
    forward = layers * (tokens * per_token + 4 * heads * hd * pairs) + lm_head
    return 3 * forward / 1e9


def _seconds(fn: Callable[[], Any]) -> float:
    import jax

    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def logprob_case(case: Case, repeats: int, max_timed_tokens: int) -> dict[str, Any]:
    """Part 1 of the module docstring for one case: its figures."""
    import jax
    from flax import nnx

    model = build_model(case.model)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    prompts, images = random_prompts(model, case, seed=1)
    inputs = model.prepare_prompts(prompts, images, rows=case.prompts, length=case.prompt)
    completions = np.random.default_rng(2).integers(
        FIRST_TEXT_ID, model.vocab_size, (case.prompts, case.samples, case.new)).astype(np.int32)  # [B, G, N]
    full = full_layout_inputs(model, inputs, images, completions)
    inputs, full, completions = jax.device_put((inputs, full, completions))
    encode = jax.jit(lambda m, x: m.encode_vision(x))
    shared_features = encode(model, inputs)
    full_features = encode(model, full)

    shared, params, shared_gflop = value_and_grad_program(model, shared_logprobs, inputs, completions,
                                                          shared_features)
    full_program, _, full_gflop = value_and_grad_program(model, full_logprobs, full, completions, full_features)
    out: dict[str, Any] = {
        "params_m": round(n_params / 1e6, 2), "full_layout_tokens": case.full_tokens,
        "shared_gflop": round(shared_gflop, 2), "full_gflop": round(full_gflop, 2),
        "flop_ratio": round(shared_gflop / full_gflop, 4), "timed": False,
    }
    analytic = {layout: analytic_gflop(case, shared=layout == "shared") for layout in ("shared", "full")}
    out.update({"analytic_shared_gflop": round(analytic["shared"], 2),
                "analytic_full_gflop": round(analytic["full"], 2),
                "analytic_flop_ratio": round(analytic["shared"] / analytic["full"], 4)})
    if max_timed_tokens and case.full_tokens > max_timed_tokens:
        return out

    def run_shared():
        return shared(params, inputs, completions, shared_features)

    def run_full():
        return full_program(params, full, completions, full_features)

    (_, shared_logp), _ = run_shared()
    (_, full_logp), _ = run_full()
    pairs = [(_seconds(run_shared), _seconds(run_full)) for _ in range(repeats)]  # alternating: shared load
    shared_s = statistics.median(p[0] for p in pairs)
    full_s = statistics.median(p[1] for p in pairs)
    out.update({
        "timed": True, "shared_s": round(shared_s, 4), "full_s": round(full_s, 4),
        "speedup": round(full_s / shared_s, 2),
        "max_abs_diff": float(np.abs(np.asarray(shared_logp) - np.asarray(full_logp)).max()),
    })
    return out


def _even_token_reward(examples, completions):
    """Fraction of a completion's tokens with an even id: a cheap reward from token ids only."""
    from m2io_jax.rl.trainer import RewardResult

    total = np.array([np.mean(np.asarray(c) % 2 == 0) if len(c) else 0.0 for c in completions], np.float32)
    return RewardResult(total=total, components={}, counts={})


def refresh_trainer_config(case: Case):
    """The GRPO trainer config of a refresh case: its shape as the only bucket, beta 0, one iteration, float32."""
    from m2io_jax.rl.config import get_trainer_config

    config = get_trainer_config()
    config.grpo.num_generations = case.samples
    config.optimizer.update(warmup_steps=0, compute_dtype="float32")
    config.rollout.update(max_new_tokens=case.new, temperature=1.0, prompt_lengths=(case.prompt,),
                          batch_sizes=(case.prompts,))
    return config


def refresh_case(case: Case, repeats: int) -> dict[str, Any]:
    """Part 2 of the module docstring for one case: its figures."""
    import jax
    from flax import nnx

    from m2io_jax import sharding
    from m2io_jax.rl.trainer import PromptBatch, Trainer
    from m2io_jax.sampling import sampling_params

    def refresh_seconds(model) -> float:
        return statistics.median(_seconds(lambda: sampling_params(model)[1]) for _ in range(repeats + 1))

    one_device_s = refresh_seconds(build_model(case.model))
    out: dict[str, Any] = {"devices": jax.device_count(), "one_device_refresh_s": round(one_device_s, 6)}
    if jax.device_count() == 1:
        return out
    if case.prompts % jax.device_count():
        raise cli.UserError(f"--refresh_cases: {case}: B={case.prompts} is not a multiple of the "
                            f"{jax.device_count()} devices")
    mesh = sharding.make_mesh()  # every device on fsdp
    model = build_model(case.model)
    suppress = (model.config.image_token_id,) if model.vision_parameters is not None else ()
    trainer = Trainer(model, refresh_trainer_config(case), reward_fn=_even_token_reward, stop_tokens=(),
                      suppress_tokens=suppress, mesh=mesh)
    prompts, images = random_prompts(trainer.model, case, seed=3)
    batch = PromptBatch(token_ids=prompts, images=images, examples=[None] * len(prompts))
    step_seconds = []
    for step in range(2 + repeats):  # two untimed steps: compilation (the update compiles again at the second)
        start = time.perf_counter()
        trainer.grpo_step(batch, step)
        step_seconds.append(time.perf_counter() - start)
    step_s = statistics.median(step_seconds[2:])
    policy = trainer.model
    params = jax.tree.leaves(nnx.state(policy))
    before = sum(sharding.per_device_bytes(params).values())
    after = sum(sharding.per_device_bytes(jax.tree.leaves(sampling_params(policy)[1])).values())
    refresh_s = refresh_seconds(policy)
    out.update({
        "param_bytes": int(sum(x.nbytes for x in params)), "bytes_moved": int(after - before),
        "refresh_s": round(refresh_s, 5), "step_s": round(step_s, 4), "fraction_of_step": round(refresh_s / step_s, 5),
    })
    return out


def cpu_model() -> str:
    """`lscpu`'s "Model name" ("unknown" where lscpu is missing)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        return "unknown"
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")]
    return names[0] if names else "unknown"


def _print_logprob_table(results: dict[str, dict[str, Any]]) -> None:
    print("\nlog-prob + gradient pass, float32 (shared: each prompt once; full: B * G rows of prompt + completion)")
    print(f"  {'case':26s} {'params':>7s} {'shared s':>9s} {'full s':>8s} {'speedup':>8s} "
          f"{'XLA GF shared':>13s} {'/ full':>8s} {'ratio':>6s} {'GF shared':>10s} {'/ full':>8s} {'ratio':>6s} "
          f"{'max |diff|':>10s}")
    for name, r in results.items():
        timed = (f"{r['shared_s']:9.3f} {r['full_s']:8.3f} {r['speedup']:7.2f}x" if r["timed"]
                 else f"{'-':>9s} {'-':>8s} {'-':>8s}")
        diff = f"{r['max_abs_diff']:10.1e}" if r["timed"] else f"{'-':>10s}"
        print(f"  {name:26s} {r['params_m']:6.2f}M {timed} {r['shared_gflop']:13.1f} {r['full_gflop']:8.1f} "
              f"{r['flop_ratio']:6.3f} {r['analytic_shared_gflop']:10.1f} {r['analytic_full_gflop']:8.1f} "
              f"{r['analytic_flop_ratio']:6.3f} {diff}", flush=True)


def _print_refresh_table(results: dict[str, dict[str, Any]]) -> None:
    print("\nsampler weight-layout refresh (sampling_params, fsdp -> sampling layout) vs one GRPO step")
    print(f"  {'case':26s} {'devices':>7s} {'MB params':>9s} {'MB moved':>9s} {'refresh s':>10s} {'step s':>8s} "
          f"{'fraction':>9s} {'1-device s':>10s}")
    for name, r in results.items():
        if "refresh_s" not in r:
            print(f"  {name:26s} {r['devices']:7d}   one device: no mesh, nothing moves "
                  f"({r['one_device_refresh_s']:.6f} s)")
            continue
        print(f"  {name:26s} {r['devices']:7d} {r['param_bytes'] / 1e6:9.1f} {r['bytes_moved'] / 1e6:9.1f} "
              f"{r['refresh_s']:10.4f} {r['step_s']:8.2f} {r['fraction_of_step']:9.4f} "
              f"{r['one_device_refresh_s']:10.6f}", flush=True)


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    cases = [parse_case(c, "cases") for c in _CASES.value]
    refresh_cases = [parse_case(c, "refresh_cases") for c in _REFRESH_CASES.value]
    if _REPEATS.value < 1 or _MAX_TIMED_TOKENS.value < 0:
        raise cli.UserError(f"--repeats={_REPEATS.value} must be >= 1 and --max_timed_tokens="
                            f"{_MAX_TIMED_TOKENS.value} >= 0")
    set_fake_devices(_FAKE_DEVICES.value)
    import jax

    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; jax {jax.__version__}; cpu {cpu_model()}",
          flush=True)
    logprob_results = {str(c): logprob_case(c, _REPEATS.value, _MAX_TIMED_TOKENS.value) for c in cases}
    _print_logprob_table(logprob_results)
    refresh_results = {str(c): refresh_case(c, _REPEATS.value) for c in refresh_cases}
    _print_refresh_table(refresh_results)
    print(json.dumps({"benchmark": "logprobs", "backend": jax.default_backend(), "devices": jax.device_count(),
                      "cpu": cpu_model(), "repeats": _REPEATS.value, "logprobs": logprob_results,
                      "refresh": refresh_results}))


if __name__ == "__main__":
    cli.run(main)
