"""The generic GRPO / SFT trainer: any `CausalLM` policy (text Qwen2 or the Qwen2.5-VL inserter), any reward.

The task side hands it batches of prompts (`PromptBatch`) and a reward function (`RewardFn`); it knows nothing
of the task. One GRPO step:

1. prepare the prompts once (`CausalLM.prepare_prompts`, padded to the configured buckets) and run the vision
   tower once (`encode_vision`); rollout, reference and training passes all reuse these features;
2. rollout: G samples per prompt with `m2io_jax.sampling.generate_prepared` (one prefill per prompt), with a
   seed derived from the configured seed and the step, `suppress_tokens` masked before the log-softmax;
3. rewards on the host, group advantages (`grpo.grpo_advantages`);
4. log-probs in the training layout (`CausalLM.completion_logprobs`: each prompt once, its G completions
   attending to it, the same temperature and suppressed tokens as the sampler): the old policy's when
   num_iterations > 1, the reference's (a frozen copy of the initial parameters) when beta > 0;
   with LoRA adapters on the model (`m2io_jax.models.lora`) the reference is the same parameters with the
   adapters off, only the adapters train and have optimizer state, and the frozen base weights are held once,
   in the compute dtype, shared by the sampler, the reference and the updates;
5. num_iterations jitted, donated updates (`rl.steps`), sharded on the mesh the parameters live on, each
   exact over micro-batches of rollout.micro_batch_prompts prompts (gradients summed, divided once).

The SFT step is token-mean cross-entropy of target completions through the same `completion_logprobs` (G = 1)
and the same optimizer. Metrics come back as a flat dict of floats (keys in `Trainer.grpo_step`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from m2io_jax import sampling
from m2io_jax import sharding as shd
from m2io_jax.buckets import bucket_size
from m2io_jax.models import lora
from m2io_jax.models.protocol import CausalLM, PreparedInputs
from m2io_jax.rl import grpo, rollout, steps
from m2io_jax.rl.optimizer import cast_floating
from m2io_jax.sampling.layout import mesh_of, row_multiple


@dataclasses.dataclass
class PromptBatch:
    """B prompts of one step.

    token_ids: chat-templated prompts, image pads expanded as the processor does.
    images: per prompt, a processor output with `pixel_values` and `image_grid_thw`, or None; None for all.
    examples: opaque per-prompt task data, handed to the reward function.
    targets: SFT only: per prompt, the target completion's token ids (stop token included).
    """

    token_ids: list[list[int]]
    images: list[Any] | None
    examples: list[Any]
    targets: list[list[int]] | None = None


@dataclasses.dataclass
class RewardResult:
    """Rewards of B * G completions, prompt-major (the G samples of prompt 0 first).

    total: [B * G] the reward GRPO optimises.
    components: name -> [B * G] per-component rewards (nan where a component does not apply).
    counts: events worth counting, e.g. {"parse_failed": 3}.
    """

    total: np.ndarray
    components: dict[str, np.ndarray]
    counts: dict[str, int]


RewardFn = Callable[[Sequence[Any], Sequence[Sequence[int]]], RewardResult]
"""(examples [B], completion token ids [B * G], prompt-major, stop token included) -> RewardResult."""


def _mesh_context(mesh: jax.sharding.Mesh | None):
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


class Trainer:
    """GRPO and SFT steps on one policy (module docstring).

    Args:
      model: a `CausalLM` nnx module, on one device or with parameters sharded on a mesh.
      config: a ConfigDict with sections `grpo`, `optimizer` and `rollout` (`rl.config.get_trainer_config`).
      reward_fn: scores completions; None allows SFT steps only.
      stop_tokens: token ids that end a completion (e.g. `<|im_end|>`).
      suppress_tokens: token ids never sampled (e.g. `<|image_pad|>`), masked before the log-softmax in the
        sampler and in the trainer's log-probs alike.
      mesh: places the parameters on this mesh (by their logical axes); None keeps them where they are.

    The trainer takes over the model's parameter buffers (updates donate them): after construction use
    `trainer.model`, not `model`.
    """

    def __init__(self, model: CausalLM, config: ml_collections.ConfigDict, *, reward_fn: RewardFn | None,
                 stop_tokens: Sequence[int], suppress_tokens: Sequence[int] = (),
                 mesh: jax.sharding.Mesh | None = None):
        for section in ("grpo", "optimizer", "rollout"):
            if section not in config:
                raise ValueError(f"trainer config has no '{section}' section; expected grpo, optimizer and rollout "
                                 f"(m2io_jax.rl.config.get_trainer_config)")
        self._grpo = steps.trainer_grpo_config(config)
        self._rollout = config.rollout
        self._reward_fn = reward_fn
        self._stop_tokens = tuple(int(t) for t in stop_tokens)
        self._suppress_tokens = tuple(int(t) for t in suppress_tokens)
        overlap = set(self._stop_tokens) & set(self._suppress_tokens)
        if overlap:
            raise ValueError(f"tokens {sorted(overlap)} are both stop tokens and suppressed tokens")
        self._vocab_size, self._max_length = model.vocab_size, model.max_length
        self._pad_id = min(set(range(len(self._suppress_tokens) + 1)) - set(self._suppress_tokens))
        graphdef, params = nnx.split(model)
        if mesh is not None:
            params = jax.device_put(params, shd.state_shardings(params, mesh))
        self._mesh = mesh if mesh is not None else mesh_of(params)
        adapters = lora.has_adapters(model)
        self._params = steps.master_params(params, adapters=adapters, optimizer=config.optimizer)
        self._spec = steps.StepSpec.create(graphdef, self._params, temperature=config.rollout.temperature,
                                           suppress_tokens=self._suppress_tokens, grpo_config=self._grpo,
                                           optimizer_config=config.optimizer, mesh=self._mesh,
                                           vision_parameters=model.vision_parameters, adapters=adapters)
        with _mesh_context(self._mesh):
            self._opt_state = steps.init_optimizer(self._spec, self._params)
        self._reference = None
        if self._grpo.beta != 0.0 and not adapters:
            compute = cast_floating(self._params, config.optimizer.compute_dtype)
            self._reference = jax.tree.map(lambda x: x.copy(), compute)  # own buffers: params are donated

    @property
    def model(self) -> nnx.Module:
        """The current policy (master-dtype parameters); valid until the next step replaces its parameters."""
        return nnx.merge(self._spec.graphdef, self._params)

    def state(self) -> dict[str, Any]:
        """What a resume needs besides the step: "params", "opt_state" and, when beta != 0 without LoRA,
        "reference".

        "params" are the trained parameters: all of them, or with LoRA only the adapters (the frozen base is the
        model the trainer was built with, so a checkpoint holds adapters and their optimizer state alone). The
        arrays are the trainer's own (valid until the next step donates them); a checkpoint copies them out.
        """
        trainable, _ = steps.split_trainable(self._spec.adapters, self._params)
        state = {"params": trainable, "opt_state": self._opt_state}
        if self._reference is not None:
            state["reference"] = self._reference
        return state

    def restore(self, state: dict[str, Any]) -> None:
        """Takes over `state` (the structure of `state()`, e.g. restored from a checkpoint onto this mesh); with
        LoRA its adapters join the frozen base this trainer was built with."""
        expected = set(self.state())
        if set(state) != expected:
            raise ValueError(f"Trainer.restore: state has keys {sorted(state)}; expected {sorted(expected)}")
        _, frozen = steps.split_trainable(self._spec.adapters, self._params)
        self._params, self._opt_state = steps.join_trainable(state["params"], frozen), state["opt_state"]
        if "reference" in state:
            self._reference = state["reference"]

    # ------------------------------------------------------------------------------------------ host layout
    def _rows(self, num_prompts: int) -> int:
        r = self._rollout
        rows = bucket_size(num_prompts, tuple(r.batch_sizes), 1, "prompts per batch")
        if not r.batch_sizes:
            multiple = row_multiple(self._mesh)
            rows = -(-rows // multiple) * multiple
        return rows

    def _prepare(self, batch: PromptBatch, completion_length: int) -> tuple[PreparedInputs, jax.Array | None]:
        """The prompts padded to their buckets and their vision features (the tower runs here, once)."""
        if not batch.token_ids:
            raise ValueError("PromptBatch.token_ids is empty; a step needs at least one prompt")
        if len(batch.examples) != len(batch.token_ids):
            raise ValueError(f"PromptBatch has {len(batch.token_ids)} prompts but {len(batch.examples)} examples")
        r = self._rollout
        longest = max(len(x) for x in batch.token_ids)
        length = bucket_size(longest, tuple(r.prompt_lengths), r.min_prompt_length, "prompt length")
        if length + completion_length > self._max_length:
            raise ValueError(f"prompts padded to {length} tokens plus {completion_length} completion tokens exceed "
                             f"the model's max_length {self._max_length}")
        inputs = self.model.prepare_prompts(batch.token_ids, batch.images, rows=self._rows(len(batch.token_ids)),
                                            length=length)
        with _mesh_context(self._mesh):
            features = None if inputs.vision is None else steps.encode_vision(self._spec, self._params, inputs)
        return inputs, features

    # ------------------------------------------------------------------------------------------------- SFT
    def sft_step(self, batch: PromptBatch) -> dict[str, float]:
        """One optimizer step on the token-mean cross-entropy of `batch.targets` given the prompts.

        Returns "loss" (before the update), "grad_norm", "skipped_nonfinite" (1 when the update was skipped for a
        NaN or infinite loss or gradient), "target_tokens", "tokens_per_second", "time/update"
        and "compiled_programs".
        """
        start = time.perf_counter()
        if batch.targets is None or len(batch.targets) != len(batch.token_ids):
            raise ValueError(f"sft_step needs PromptBatch.targets, one per prompt ({len(batch.token_ids)}); got "
                             f"{None if batch.targets is None else len(batch.targets)}")
        for i, target in enumerate(batch.targets):
            bad = [t for t in target if not 0 <= int(t) < self._vocab_size or int(t) in self._suppress_tokens]
            if not target or bad:
                raise ValueError(f"PromptBatch.targets[{i}] must be non-empty token ids in [0, {self._vocab_size}) "
                                 f"and not suppressed {self._suppress_tokens}; got {len(target)} tokens, "
                                 f"bad: {bad[:5]}")
        r = self._rollout
        n = bucket_size(max(len(t) for t in batch.targets), tuple(r.completion_lengths), r.min_completion_length,
                        "target length")
        inputs, features = self._prepare(batch, n)
        rows = inputs.ids.shape[0]
        targets = rollout.pad_completions(batch.targets, rows=rows, num_samples=1, length=n, stop_tokens=(),
                                          budget=n + 1, pad_id=self._pad_id)
        with _mesh_context(self._mesh):
            sft_batch = steps.SftBatch(inputs, features, targets.tokens, targets.mask)
            self._params, self._opt_state, metrics = steps.sft_update(self._spec, self._params, self._opt_state,
                                                                      sft_batch)
            metrics = shd.to_host(metrics)
        elapsed = time.perf_counter() - start
        return {**{k: float(v) for k, v in metrics.items()}, "target_tokens": float(targets.num_tokens),
                "tokens_per_second": targets.num_tokens / elapsed, "time/update": elapsed,
                "compiled_programs": float(self.compiled_programs())}

    # ------------------------------------------------------------------------------------------------ GRPO
    def grpo_step(self, batch: PromptBatch, step: int) -> dict[str, float]:
        """One GRPO step (rollout, rewards, log-probs, num_iterations updates) on `batch`; returns its metrics.

        Metrics: "reward/mean", "reward/std", "reward/<component>" and "reward_std/<component>" (mean and standard
        deviation over the completions where it applies; left out when it applies to none), "groups_all_tied",
        "count/<name>", "completion_length",
        "truncated_fraction", "loss", "grad_norm", "clip_fraction", "kl" (beta > 0 only),
        "logprob_diff/sampler_vs_trainer" (mean absolute difference per token), "entropy" (token-mean entropy of
        the policy at the sampling temperature, estimated by the sampled tokens' negative log-probs under the
        parameters before the update: their expectation is the entropy), "skipped_nonfinite" (1 when the update
        was skipped for a NaN or infinite loss or gradient), "tokens_per_second" (completion
        tokens over the step's time), "time/rollout", "time/reward", "time/logprobs", "time/update",
        "compiled_programs". Loss, gradient norm and clipping are the last iteration's.
        """
        if self._reward_fn is None:
            raise ValueError("grpo_step needs a reward_fn; this Trainer was built with reward_fn=None (SFT only)")
        r = self._rollout
        if not r.temperature > 0:
            raise ValueError(f"GRPO samples its groups: rollout.temperature must be > 0, got {r.temperature}")
        g = self._grpo.num_generations
        start = time.perf_counter()
        inputs, features = self._prepare(batch, r.max_new_tokens)
        b, rows = len(batch.token_ids), inputs.ids.shape[0]
        with _mesh_context(self._mesh):
            sampled = sampling.generate_prepared(
                steps.policy(self._spec, self._params), inputs, num_prompts=b, vision_features=features,
                max_new_tokens=r.max_new_tokens, num_samples=g, temperature=r.temperature, top_k=r.top_k,
                top_p=r.top_p, stop_tokens=self._stop_tokens, suppress_tokens=self._suppress_tokens,
                seed=rollout.step_seed(r.seed, step))
        completions = rollout.pad_completions(sampled.tokens, rows=rows, num_samples=g, length=r.max_new_tokens,
                                              stop_tokens=self._stop_tokens, budget=r.max_new_tokens,
                                              pad_id=self._pad_id)
        sampler_logp = rollout.pad_logprobs(sampled.logprobs, completions)
        rollout_done = time.perf_counter()

        rewards = self._reward_fn(batch.examples, sampled.tokens)
        total = np.asarray(rewards.total, np.float32)
        if total.shape != (b * g,):
            raise ValueError(f"reward_fn returned total of shape {total.shape}; expected [B * G] = ({b * g},)")
        advantages = np.zeros((rows, g), np.float32)
        advantages[:b] = np.asarray(grpo.grpo_advantages(total.reshape(b, g), self._grpo))
        reward_done = time.perf_counter()

        train_batch = steps.GrpoBatch(inputs, features, completions.tokens, completions.mask, advantages,
                                      completions.truncated, completions.row_mask)
        with _mesh_context(self._mesh):
            trainer_logp = None
            if self._grpo.num_iterations > 1:
                trainer_logp = steps.logprobs(self._spec, self._params, inputs, features, completions.tokens)
                train_batch = train_batch.replace(old_logp=trainer_logp)
            if self._reference is not None:
                train_batch = train_batch.replace(
                    ref_logp=steps.logprobs(self._spec, self._reference, inputs, features, completions.tokens))
            elif self._grpo.beta != 0.0:
                train_batch = train_batch.replace(ref_logp=steps.reference_logprobs(
                    self._spec, self._params, inputs, features, completions.tokens))
            jax.block_until_ready(train_batch)
            logprobs_done = time.perf_counter()
            for _ in range(self._grpo.num_iterations):
                metrics, logp = self._update(train_batch)
                trainer_logp = logp if trainer_logp is None else trainer_logp
            metrics, trainer_logp = shd.to_host((metrics, trainer_logp))
        end = time.perf_counter()

        out = {k: float(v) for k, v in metrics.items()}
        out.update(self._reward_metrics(rewards, total, g))
        lengths = completions.lengths[:b]
        out.update({
            "completion_length": float(lengths.mean()),
            "truncated_fraction": float(completions.truncated[:b].mean()),
            "logprob_diff/sampler_vs_trainer": float(
                np.sum(np.abs(sampler_logp - trainer_logp) * completions.mask) / max(completions.num_tokens, 1)),
            "entropy": float(-np.sum(trainer_logp * completions.mask) / max(completions.num_tokens, 1)),
            "tokens_per_second": completions.num_tokens / (end - start),
            "time/rollout": rollout_done - start, "time/reward": reward_done - rollout_done,
            "time/logprobs": logprobs_done - reward_done, "time/update": end - logprobs_done,
            "compiled_programs": float(self.compiled_programs()),
        })
        return out

    def _update(self, batch: steps.GrpoBatch) -> tuple[dict[str, jax.Array], jax.Array]:
        """One optimizer step over `batch` in micro-batches of rollout.micro_batch_prompts rows; returns the
        update's metrics and the log-probs [R, G, N] of the parameters before it."""
        accumulated = steps.zero_accumulated(self._params, self._spec.adapters)
        logps = []
        for micro in steps.micro_batches(batch, self._rollout.micro_batch_prompts):
            accumulated, logp = steps.grpo_gradients(self._spec, self._params, micro, accumulated)
            logps.append(logp)
        self._params, self._opt_state, metrics = steps.apply_gradients(self._spec, self._params, self._opt_state,
                                                                       accumulated)
        if self._grpo.beta == 0.0:
            metrics.pop("kl")
        return metrics, jnp.concatenate(logps)

    @staticmethod
    def _reward_metrics(rewards: RewardResult, total: np.ndarray, g: int) -> dict[str, float]:
        out = {"reward/mean": float(total.mean()), "reward/std": float(total.std()),
               "groups_all_tied": float(np.mean(np.ptp(total.reshape(-1, g), axis=1) == 0))}
        for name, values in rewards.components.items():
            values = np.asarray(values, np.float64)
            if values.shape != total.shape:
                raise ValueError(f"reward component {name!r} has shape {values.shape}; expected {total.shape}")
            if np.any(~np.isnan(values)):
                out[f"reward/{name}"] = float(np.nanmean(values))
                out[f"reward_std/{name}"] = float(np.nanstd(values))
        out.update({f"count/{name}": float(count) for name, count in rewards.counts.items()})
        return out

    @staticmethod
    def compiled_programs() -> int:
        """Programs compiled so far in this process: the sampler's and the trainer's (real compilations)."""
        return sampling.compile_count() + steps.compile_count()
