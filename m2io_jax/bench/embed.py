"""Text-encoder throughput: our Flax BERT against sentence-transformers (torch) on the same MiniLM weights.

    python -m m2io_jax.bench.embed [--threads=2] [--pin] [--op_rates] [--num_short=2000] [--num_chunks=64] [--repeats=2]

Two workloads, each encoded whole by both encoders (sorting by length and batching are each encoder's own):
short sentences of about 15 tokens (batch 128) and 256-token passages, i.e. retrieval chunks at MiniLM's
max_seq_length (batch 32). torch runs `--threads` intra-op threads; XLA's CPU client uses every core of the
machine (2 on the reference machine, where the two match) unless `--pin` restricts the whole process to the first
`--threads` cores: on a machine shared with other jobs, `--threads=1 --pin` compares one core against one core
and is far less sensitive to load than two threads each (whose thread pools stall when the scheduler takes one of
their cores away). The CPU (model and widest vector ISA) is printed and recorded in the JSON, because the ratio
depends on it: XLA:CPU's matmuls use AVX-512 where present, while torch's MKL does not take its AVX-512 paths on
AMD CPUs (`MKL_VERBOSE=1` reports "Intel(R) Architecture processors" there, AVX-512 on Intel ones).
`--op_rates` adds a micro-benchmark of the chunk workload's operations (dense and batched matmuls, softmax, GELU,
LayerNorm) on both sides, which shows where a gap comes from. Sentences/s is the best of `--repeats` timed runs
after one warm-up run (which compiles our few bucketed shapes). The embeddings of both encoders are compared
(minimum cosine) so that a speed-up cannot hide a wrong result. The last line is one JSON object.
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from collections.abc import Callable, Sequence

import numpy as np
from absl import flags

from m2io_jax import cli

_ENCODER = flags.DEFINE_string("encoder", "", "checkpoint directory (default: the packaged MiniLM)")
_THREADS = flags.DEFINE_integer("threads", 2, "torch intra-op threads", allow_override=True)
_NUM_SHORT = flags.DEFINE_integer("num_short", 2000, "short sentences in the first workload")
_NUM_CHUNKS = flags.DEFINE_integer("num_chunks", 64, "256-token passages in the second workload")
_REPEATS = flags.DEFINE_integer("repeats", 2, "timed runs per encoder and workload (the best counts)",
                                allow_override=True)
_PIN = flags.DEFINE_bool("pin", False, "pin the whole process (XLA and torch) to the first --threads cores")
_OP_RATES = flags.DEFINE_bool("op_rates", False, "also time each operation of the chunk workload on both sides")

_WORDS = (
    "the a of retrieval image answer question model corpus passage embedding index search vector recipe manual "
    "paper figure table oven sauce battery screen history city river mountain protein learning training reward "
    "policy gradient attention layer token sequence benchmark latency throughput press hold button minutes "
    "flour sugar butter bake heat water filter replace device power reset chapter section results method"
).split()


def short_sentences(n: int, seed: int = 0) -> list[str]:
    """Sentences of 10-14 common words (about 15 tokens with [CLS]/[SEP])."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(10, 14))).capitalize() + "." for _ in range(n)]


def long_passages(n: int, seed: int = 1) -> list[str]:
    """Passages of 300 words: more than 256 tokens, so every one is truncated to max_seq_length."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(300)) + "." for _ in range(n)]


def best_rate(fn: Callable[[], np.ndarray], count: int, repeats: int) -> tuple[float, np.ndarray]:
    """(items/s of the fastest of `repeats` runs after one warm-up run, the last output)."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return count / best, out


def cpu_description() -> dict[str, str | int]:
    """The CPU the figures come from: model name, widest x86 vector ISA, and the cores this process may use."""
    model, isa_flags = platform.processor() or platform.machine(), set()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    isa_flags = set(value.split())
    isa = next((name for name in ("avx512f", "avx2", "avx") if name in isa_flags), "other")
    return {"model": model, "isa": isa, "cores": len(os.sched_getaffinity(0))}


def op_rates(threads: int, repeats: int, batch: int = 8, length: int = 256) -> list[dict[str, float | str]]:
    """GFLOP/s (or Gelem/s) of each operation of a MiniLM layer at [batch, length], XLA:CPU against torch.

    The two sides alternate within each repeat so that load on a shared machine hits both alike; the fastest
    repeat of each counts.
    """
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(threads)
    d, h, f = 384, 12, 1536  # MiniLM hidden, heads, feed-forward
    rng = np.random.default_rng(0)
    x, w_qkv, w_in = (rng.standard_normal(s).astype(np.float32) for s in ((batch, length, d), (d, 3 * d), (d, f)))
    q, k = (rng.standard_normal((batch, h, length, d // h)).astype(np.float32) for _ in range(2))
    scores = rng.standard_normal((batch, h, length, length)).astype(np.float32)
    hidden = rng.standard_normal((batch, length, f)).astype(np.float32)
    flops_qk = 2 * batch * h * length * length * (d // h)
    cases = [  # (name, work, unit, xla function, torch function, inputs)
        ("dense D->3D (fused QKV)", 2 * batch * length * d * 3 * d, "GFLOP/s", jnp.matmul, torch.matmul, (x, w_qkv)),
        ("dense D->F (MLP in)", 2 * batch * length * d * f, "GFLOP/s", jnp.matmul, torch.matmul, (x, w_in)),
        ("batched scores bhqd,bhkd", flops_qk, "GFLOP/s", lambda a, b: jnp.einsum("bhqd,bhkd->bhqk", a, b),
         lambda a, b: a @ b.transpose(-1, -2), (q, k)),
        ("batched context bhqk,bhkd", flops_qk, "GFLOP/s", lambda a, b: jnp.einsum("bhqk,bhkd->bhqd", a, b),
         torch.matmul, (scores, k)),
        ("softmax [B,H,T,T]", scores.size, "Gelem/s", lambda a: jax.nn.softmax(a, axis=-1),
         lambda a: torch.softmax(a, -1), (scores,)),
        ("GELU (erf) [B,T,F]", hidden.size, "Gelem/s", lambda a: jax.nn.gelu(a, approximate=False),
         torch.nn.functional.gelu, (hidden,)),
        ("LayerNorm [B,T,D]", x.size, "Gelem/s",
         lambda a: (a - a.mean(-1, keepdims=True)) * jax.lax.rsqrt(a.var(-1, keepdims=True) + 1e-12),
         lambda a: torch.nn.functional.layer_norm(a, (d,)), (x,)),
    ]
    rows = []
    for name, work, unit, xla_fn, torch_fn, inputs in cases:
        xla_fn = jax.jit(xla_fn)
        xla_in, torch_in = [jnp.asarray(a) for a in inputs], [torch.from_numpy(a) for a in inputs]
        xla_fn(*xla_in).block_until_ready()
        xla_best = torch_best = float("inf")
        with torch.inference_mode():
            torch_fn(*torch_in)
            for _ in range(max(repeats, 5)):
                start = time.perf_counter()
                xla_fn(*xla_in).block_until_ready()
                xla_best = min(xla_best, time.perf_counter() - start)
                start = time.perf_counter()
                torch_fn(*torch_in)
                torch_best = min(torch_best, time.perf_counter() - start)
        rows.append({"op": name, "unit": unit, "xla": round(work / xla_best / 1e9, 2),
                     "torch": round(work / torch_best / 1e9, 2), "ratio": round(torch_best / xla_best, 3)})
    return rows


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    threads, repeats = _THREADS.value, _REPEATS.value
    usable = sorted(os.sched_getaffinity(0))
    if _PIN.value:
        if not 1 <= threads <= len(usable):
            raise cli.UserError(f"--threads={threads} with --pin: this process may use {len(usable)} cores")
        os.sched_setaffinity(0, usable[:threads])  # before XLA and torch start their thread pools
    # Imported here so that the module's helpers and flags load without the benchmark-only torch peers.
    import torch
    from sentence_transformers import SentenceTransformer

    from m2io_jax.models import from_pretrained, sentence_encoder

    torch.set_num_threads(threads)
    path = _ENCODER.value or sentence_encoder.default_encoder_path()
    ours = from_pretrained(path)
    peer = SentenceTransformer(path, device="cpu")
    workloads = {
        "short (~15 tokens)": (short_sentences(_NUM_SHORT.value), 128, 1.0),
        "256-token chunks": (long_passages(_NUM_CHUNKS.value), 32, 0.8),
    }
    cpu = cpu_description()
    print(f"encoder {path}; torch threads {threads}; CPU {cpu['model']} ({cpu['isa']}, {cpu['cores']} cores"
          f"{', pinned' if _PIN.value else ''})")
    print(f"{'workload':<20} {'mean tokens':>11} {'flax sent/s':>12} {'s-t sent/s':>11} {'ratio':>6} {'target':>6} "
          f"{'min cos':>9}")
    rows = []
    for name, (texts, batch_size, target) in workloads.items():
        mean_tokens = float(np.mean([len(ids) for ids in ours.tokenize(texts)]))
        flax_rate, flax_out = best_rate(lambda: ours.encode(texts, batch_size=batch_size), len(texts), repeats)
        torch_rate, torch_out = best_rate(
            lambda: peer.encode(texts, batch_size=batch_size, convert_to_numpy=True), len(texts), repeats
        )
        cosine = float(np.min(np.sum(flax_out * torch_out, axis=1) / np.linalg.norm(torch_out, axis=1)))
        ratio = flax_rate / torch_rate
        rows.append({"workload": name, "texts": len(texts), "batch_size": batch_size,
                     "mean_tokens": round(mean_tokens, 1), "flax_sentences_per_s": round(flax_rate, 1),
                     "st_sentences_per_s": round(torch_rate, 1),
                     "ratio": round(ratio, 3), "target": target, "min_cosine": cosine})
        print(f"{name:<20} {mean_tokens:>11.1f} {flax_rate:>12.1f} {torch_rate:>11.1f} {ratio:>6.2f} {target:>6.1f} "
              f"{cosine:>9.6f}")
    ops = op_rates(threads, repeats) if _OP_RATES.value else []
    if ops:
        print(f"{'operation (B=8, T=256)':<28} {'unit':>8} {'XLA:CPU':>8} {'torch':>8} {'ratio':>6}")
        for op in ops:
            print(f"{op['op']:<28} {op['unit']:>8} {op['xla']:>8.2f} {op['torch']:>8.2f} {op['ratio']:>6.2f}")
    print(json.dumps({
        "benchmark": "embed",
        "threads": threads,
        "pinned": _PIN.value,
        "cpu": cpu,
        "short_ratio": rows[0]["ratio"],
        "chunk_ratio": rows[1]["ratio"],
        "acceptance_met": all(r["ratio"] >= r["target"] for r in rows),
        "workloads": rows,
        "op_rates": ops,
    }))


if __name__ == "__main__":
    cli.run(main)
