"""GRPO step throughput: m2io_jax's `rl.Trainer` against tunix's `GRPOLearner`.

    python -m m2io_jax.bench.grpo [--size=40m] [--workloads=1024x128,128x128] [--steps=3] [--sides=SIDE ...]

The random Qwen2 of `m2io_jax.bench.sampler` (`--size`, `--workloads` and `--samples` are that module's flags)
is written once as a Hugging Face safetensors checkpoint and loaded by both sides, float32, on the same CPU
threads. One step = rollout of 8 prompts of P random tokens x G samples (temperature 1, exactly N new tokens, no
stop token) + reference log-probs + one AdamW update, with the same settings on both sides: G = 8, beta = 0.04
(k3 KL to the reference), epsilon = 0.2, one iteration per rollout, sequence-mean token-mean loss, the same
optax optimizer object (`rl.optimizer.build_optimizer`) and the same reward: the fraction of a completion's
tokens in a fixed id set (`reward_of`), computed from token ids (tunix hands its reward function the decoded
text, which here is the ids separated by spaces).

- m2io_jax: `rl.Trainer.grpo_step` (each prompt prefilled once and shared by its G samples in the rollout and
  once per log-prob pass); its metrics give the time split rollout / reward / logprobs / update.
- tunix: `GRPOLearner.train` over an `RLCluster` (vanilla rollout, actor and reference loaded separately from the
  checkpoint, one 1 x 1 mesh), prompts repeated G times as it does. Its steps are timed where the learner draws
  each batch from the dataset; its split comes from timers around the cluster's rollout, reference log-prob,
  reward and actor-update calls. Its log-prob and update passes compute logits over prompt and completion,
  so they run in micro-batches of `micro_batch_prompts` prompts (same gradient, one optimizer update) sized to
  keep those logits under `--logits_gib`; our update runs in micro-batches of the same size
  (`rollout.micro_batch_prompts`), so that neither side holds a whole batch's activations on this 23 GB machine.

Memory: every side of every workload (and the checkpoint writer, which imports torch) runs in a fresh process
of its own, one at a time, so that no side's arrays, compiled programs or allocator pages are resident while the
other runs; the peak resident memory of a run is the largest single side's, which the table and the JSON report
(`peak_rss_gib`, the side process's VmHWM). `--sides=tunix` (or `--sides=m2io_jax`) runs that side alone (no
ratio then); both is the default.

The first `--warmup_steps` steps (compilation) are excluded; figures are medians over `--steps` timed steps.
Each step draws fresh prompts (the same on both sides). The last line is one JSON object with, per workload,
`ratio_<P>x<N>` (m2io_jax steps/s over tunix's, when both sides ran), both sides' steps/s, time splits and
peak resident memory.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import flags

from m2io_jax import cli
from m2io_jax.bench import sampler as bench_sampler
from m2io_jax.bench.sampler import NUM_PROMPTS, SIZES, Workload

_STEPS = flags.DEFINE_integer("steps", 3, "timed GRPO steps per side and workload")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 2, "untimed steps first (compilation; our optimizer update "
                                     "compiles again at the second step)")
_SIDES = flags.DEFINE_multi_enum("sides", ["m2io_jax", "tunix"], ["m2io_jax", "tunix"],
                                  "sides to time, each in its own process (the ratio needs both)")
_LOGITS_GIB = flags.DEFINE_float("logits_gib", 1.5, "largest tunix micro-batch logits, GiB (sets both sides' "
                                  "update micro-batch)")

BETA = 0.04
EPSILON = 0.2
LEARNING_RATE = 1e-6
REWARD_MODULUS = 4
SPLIT = ("rollout", "reward", "logprobs", "update")
SIDES = ("m2io_jax", "tunix")


def reward_of(token_ids: Sequence[int]) -> float:
    """Fraction of `token_ids` divisible by REWARD_MODULUS: a cheap reward in [0, 1] that both sides compute
    alike from token ids."""
    ids = np.asarray(token_ids, np.int64)
    return float(np.mean(ids % REWARD_MODULUS == 0)) if ids.size else 0.0


def step_prompts(vocab: int, w: Workload, step: int) -> list[list[int]]:
    """The prompts of step `step` (a fresh draw per step, the same on both sides)."""
    return bench_sampler.random_prompts(vocab, w, seed=1000 + step)


def trainer_config(w: Workload, micro_prompts: int = 0):
    """The m2io_jax trainer config of workload `w` (GRPO settings of the module docstring, float32), its update in
    micro-batches of `micro_prompts` prompts (0: the whole batch at once)."""
    from m2io_jax.rl.config import get_trainer_config

    config = get_trainer_config()
    config.grpo.num_generations = w.samples
    config.grpo.beta = BETA
    config.grpo.epsilon = EPSILON
    config.grpo.num_iterations = 1
    config.grpo.loss_type = "grpo"
    config.optimizer.learning_rate = LEARNING_RATE
    config.optimizer.warmup_steps = 0
    config.optimizer.compute_dtype = "float32"
    config.rollout.max_new_tokens = w.new
    config.rollout.temperature = 1.0
    config.rollout.prompt_lengths = (w.prompt,)
    config.rollout.batch_sizes = (NUM_PROMPTS,)
    config.rollout.micro_batch_prompts = micro_prompts
    return config


@dataclasses.dataclass
class SideResult:
    """Per-step wall times (warm-up included), the time split per step, every reward computed, the programs
    compiled so far after each step (m2io_jax only: tunix does not count them) and the peak resident memory of
    the process that ran the side (GiB; 0 until `run_isolated` fills it)."""

    step_seconds: list[float]
    split: list[dict[str, float]]
    rewards: list[float]
    compiled: list[float] | None = None
    peak_rss_gib: float = 0.0

    def compiles_in_timed_steps(self, warmup: int) -> int:
        """Programs compiled during the timed steps (0 for a steady-state measurement)."""
        if not self.compiled:
            return 0
        before = self.compiled[warmup - 1] if warmup else 0.0
        return int(self.compiled[-1] - before)

    def timed(self, warmup: int) -> list[float]:
        return self.step_seconds[warmup:]

    def steps_per_second(self, warmup: int) -> float:
        return 1.0 / statistics.median(self.timed(warmup))

    def median_split(self, warmup: int) -> dict[str, float]:
        return {k: statistics.median(s[k] for s in self.split[warmup:]) for k in SPLIT}


def run_m2io(directory: str, shape: dict, w: Workload, total_steps: int, micro_prompts: int) -> SideResult:
    """`total_steps` GRPO steps of `rl.Trainer` on the checkpoint in `directory`."""
    from m2io_jax import models
    from m2io_jax.rl.trainer import PromptBatch, RewardResult, Trainer

    rewards: list[float] = []

    def reward_fn(examples, completions) -> RewardResult:
        total = np.array([reward_of(c) for c in completions], np.float32)
        rewards.extend(total.tolist())
        return RewardResult(total=total, components={}, counts={})

    trainer = Trainer(models.from_pretrained(directory), trainer_config(w, micro_prompts), reward_fn=reward_fn,
                      stop_tokens=())
    seconds, split, compiled = [], [], []
    for step in range(total_steps):
        prompts = step_prompts(shape["vocab_size"], w, step)
        batch = PromptBatch(token_ids=prompts, images=None, examples=[None] * len(prompts))
        start = time.perf_counter()
        metrics = trainer.grpo_step(batch, step)
        seconds.append(time.perf_counter() - start)
        split.append({k: metrics[f"time/{k}"] for k in SPLIT})
        compiled.append(metrics["compiled_programs"])
        if metrics["completion_length"] != w.new:
            raise RuntimeError(f"m2io_jax completions average {metrics['completion_length']} tokens; expected {w.new}")
    return SideResult(seconds, split, rewards, compiled)


def micro_batch_prompts(shape: dict, w: Workload, logits_gib: float) -> int:
    """Largest divisor of NUM_PROMPTS whose tunix micro-batch logits [m * G, P + N, V] float32 fit `logits_gib`."""
    per_prompt = w.samples * (w.prompt + w.new) * shape["vocab_size"] * 4 / 2**30
    fitting = [m for m in range(1, NUM_PROMPTS + 1) if NUM_PROMPTS % m == 0 and m * per_prompt <= logits_gib]
    return max(fitting, default=1)


class _StepClock:
    """Timestamps of the learner drawing each batch (a step's start) and per-step sums of timed calls."""

    def __init__(self):
        self.starts: list[float] = []
        self.split: list[dict[str, float]] = []

    def batches(self, batches: Sequence[dict[str, Any]]):
        for batch in batches:
            self.starts.append(time.perf_counter())
            self.split.append(dict.fromkeys(SPLIT, 0.0))
            yield batch

    def timed(self, name: str, fn: Callable, *, block: bool = False) -> Callable:
        import jax

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if block:
                jax.block_until_ready(out)
            self.split[-1][name] += time.perf_counter() - start
            return out

        return wrapper


def run_tunix(directory: str, shape: dict, w: Workload, total_steps: int, micro_prompts: int) -> SideResult:
    """`total_steps` steps of tunix's GRPOLearner on the checkpoint in `directory` (module docstring)."""
    import jax
    from tunix.models.qwen2 import params as tunix_params
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    from m2io_jax.rl.optimizer import build_optimizer

    config = trainer_config(w, micro_prompts)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    model_config = bench_sampler.tunix_model_config(shape)
    actor = tunix_params.create_model_from_safe_tensors(directory, model_config, mesh)
    reference = tunix_params.create_model_from_safe_tensors(directory, model_config, mesh)  # its own copy
    rollout_config = base_rollout.RolloutConfig(
        max_tokens_to_generate=w.new, max_prompt_length=w.prompt, kv_cache_size=w.prompt + w.new, temperature=1.0,
        top_p=1.0, top_k=None, eos_tokens=[-1])
    training_config = rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=build_optimizer(config.optimizer), eval_every_n_steps=10**9, max_steps=total_steps,
        mini_batch_size=NUM_PROMPTS, train_micro_batch_size=micro_prompts, rollout_micro_batch_size=NUM_PROMPTS,
        compute_logps_micro_batch_size=micro_prompts)
    roles = (rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.REFERENCE, rl_cluster_lib.Role.ROLLOUT)
    cluster = rl_cluster_lib.RLCluster(
        actor=actor, reference=reference, tokenizer=bench_sampler.IdTokenizer(),
        cluster_config=rl_cluster_lib.ClusterConfig(role_to_mesh={r: mesh for r in roles}, rollout_engine="vanilla",
                                                    training_config=training_config, rollout_config=rollout_config))
    rewards: list[float] = []

    def reward_fn(prompts, completions, **_):
        values = [reward_of([int(t) for t in text.split()]) for text in completions]
        rewards.extend(values)
        return values

    grpo_config = grpo_learner.GRPOConfig(num_generations=w.samples, num_iterations=1, beta=BETA, epsilon=EPSILON,
                                          kl_loss_mode="low_var_kl", loss_agg_mode="sequence-mean-token-mean")
    learner = grpo_learner.GRPOLearner(cluster, grpo_config, reward_fns=reward_fn)
    clock = _StepClock()
    cluster.generate = clock.timed("rollout", cluster.generate)
    cluster.get_ref_per_token_logps = clock.timed("logprobs", cluster.get_ref_per_token_logps, block=True)
    learner._compute_rewards = clock.timed("reward", learner._compute_rewards)
    cluster.update_actor = clock.timed("update", cluster.update_actor)
    batches = [{"prompts": np.array([" ".join(map(str, p)) for p in step_prompts(shape["vocab_size"], w, step)])}
               for step in range(total_steps)]  # an array: the learner repeats each prompt G times with np.repeat
    learner.train(clock.batches(batches))
    end = time.perf_counter()
    if len(clock.starts) != total_steps or cluster.actor_trainer.train_steps != total_steps:
        raise RuntimeError(f"tunix drew {len(clock.starts)} batches and made {cluster.actor_trainer.train_steps} "
                           f"updates; expected {total_steps} of each")
    seconds = list(np.diff([*clock.starts, end]))
    return SideResult(seconds, clock.split, rewards)


RUNNERS: dict[str, Callable[..., SideResult]] = {"m2io_jax": run_m2io, "tunix": run_tunix}


def peak_rss_gib() -> float:
    """This process's peak resident set so far, GiB: VmHWM of /proc/self/status (the pages of this program
    image only, unlike ru_maxrss, which also counts the parent's pages a spawned child held before its exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    raise RuntimeError("/proc/self/status has no VmHWM line; expected Linux")


def _child(connection, fn: Callable, args: tuple) -> None:
    """Body of a fresh process: sends back fn(*args) (a SideResult gets the process's peak resident memory)."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # tunix logs every prompt of every step at INFO
    result = fn(*args)
    if isinstance(result, SideResult):
        result.peak_rss_gib = peak_rss_gib()
    connection.send(result)
    connection.close()


def run_isolated(what: str, fn: Callable, *args: Any) -> Any:
    """fn(*args) in a fresh (spawned) process, waiting for it: its memory is returned to the system when it exits,
    so successive sides never share a process. Raises naming `what` when the process fails."""
    context = multiprocessing.get_context("spawn")  # no fork of a process holding jax's threads
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, fn, args), name=what)
    process.start()
    sender.close()
    try:
        result = receiver.recv()
    except EOFError:
        result = None
    process.join()
    if process.exitcode != 0 or result is None:
        killed = " (killed by SIGKILL: out of memory?)" if process.exitcode == -9 else " (traceback above)"
        raise RuntimeError(f"{what}: its process exited with code {process.exitcode}{killed}")
    return result


def write_checkpoint(shape: dict, directory: str, max_length: int) -> int:
    """Writes the random checkpoint of `shape` (`bench_sampler.write_checkpoint`); returns its parameter count."""
    torch_model = bench_sampler.write_checkpoint(shape, directory, max_length)
    return sum(p.numel() for p in torch_model.parameters())


def _finite_rewards(name: str, result: SideResult, expected: int) -> None:
    if len(result.rewards) != expected or not all(0.0 <= r <= 1.0 for r in result.rewards):
        raise RuntimeError(f"{name}: {len(result.rewards)} rewards (expected {expected}), range "
                           f"[{min(result.rewards, default=np.nan)}, {max(result.rewards, default=np.nan)}]")


def run_workload(directory: str, size: str, w: Workload, *, steps: int, warmup: int, sides: Sequence[str],
                 logits_gib: float) -> dict[str, Any]:
    """`sides` on workload `w`, each in its own process (`run_isolated`); prints its table (a side's row as soon
    as that side is done, so that a later side's failure keeps it) and returns its figures."""
    shape = SIZES[size]
    total = warmup + steps
    micro = micro_batch_prompts(shape, w, logits_gib)
    print(f"\n{size} model, prompt {w.prompt} + {w.new} new, {NUM_PROMPTS} prompts x G={w.samples}, beta {BETA}; "
          f"median of {steps} steps after {warmup} warm-up; update micro-batches of {micro} prompts", flush=True)
    print(f"  {'side':10s} {'s/step':>8s} {'steps/s':>8s} " + " ".join(f"{k:>9s}" for k in SPLIT)
          + f" {'peak GiB':>9s}", flush=True)
    results: dict[str, SideResult] = {}
    for name in sides:
        result = run_isolated(f"{name} side of {w}", RUNNERS[name], directory, shape, w, total, micro)
        _finite_rewards(name, result, total * NUM_PROMPTS * w.samples)
        split = result.median_split(warmup)
        print(f"  {name:10s} {statistics.median(result.timed(warmup)):8.2f} {result.steps_per_second(warmup):8.4f} "
              + " ".join(f"{split[k]:9.2f}" for k in SPLIT) + f" {result.peak_rss_gib:9.2f}", flush=True)
        results[name] = result
    out: dict[str, Any] = {
        "workload": str(w),
        "steps_per_s": {k: round(r.steps_per_second(warmup), 5) for k, r in results.items()},
        "time_split_s": {k: {s: round(v, 3) for s, v in r.median_split(warmup).items()} for k, r in results.items()},
        "steps": {k: len(r.step_seconds) for k, r in results.items()},
        "reward_range": {k: [min(r.rewards), max(r.rewards)] for k, r in results.items()},
        "peak_rss_gib": {k: round(r.peak_rss_gib, 2) for k, r in results.items()},
        "micro_batch_prompts": micro,
    }
    if "m2io_jax" in results:
        out["m2io_jax_compiles_in_timed_steps"] = results["m2io_jax"].compiles_in_timed_steps(warmup)
    if len(results) == len(SIDES):
        ratio = results["m2io_jax"].steps_per_second(warmup) / results["tunix"].steps_per_second(warmup)
        out["ratio"] = round(ratio, 3)
        print(f"  m2io_jax / tunix: {ratio:.2f}x")
    return out


def _devices() -> str:
    import jax

    return f"{jax.devices()}; jax {jax.__version__}"


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    size = flags.FLAGS.size
    workloads = bench_sampler.parse_workloads(flags.FLAGS["workloads"], flags.FLAGS.samples)
    if _STEPS.value < 1 or _WARMUP_STEPS.value < 0:
        raise cli.UserError(f"--steps={_STEPS.value} must be >= 1 and --warmup_steps={_WARMUP_STEPS.value} >= 0")

    sides = [name for name in SIDES if name in _SIDES.value]
    print(f"devices: {run_isolated('device query', _devices)}", flush=True)
    max_length = max(4096, max(w.prompt + w.new for w in workloads))
    results = []
    with tempfile.TemporaryDirectory() as directory:
        n_params = run_isolated("checkpoint writer", write_checkpoint, SIZES[size], directory, max_length)
        print(f"model {size}: {n_params / 1e6:.1f}M parameters (tied embeddings), float32; sides {sides}, each in "
              "its own process", flush=True)
        for w in workloads:
            results.append(run_workload(directory, size, w, steps=_STEPS.value, warmup=_WARMUP_STEPS.value,
                                        sides=sides, logits_gib=_LOGITS_GIB.value))
    summary: dict[str, Any] = {"size": size}
    for r in results:
        key = r["workload"].replace("+", "x")
        if "ratio" in r:
            summary[f"ratio_{key}"] = r["ratio"]
        summary[key] = {k: v for k, v in r.items() if k not in ("workload", "ratio")}
    print(json.dumps(summary))


if __name__ == "__main__":
    cli.run(main)
