"""Text-encoder throughput: our Flax BERT against sentence-transformers (torch) on the same MiniLM weights.

    python -m m2io_jax.bench.embed [--threads=2] [--num_short=2000] [--num_chunks=64] [--repeats=2]

Two workloads, each encoded whole by both encoders (sorting by length and batching are each encoder's own):
short sentences of about 15 tokens (batch 128) and 256-token passages, i.e. retrieval chunks at MiniLM's
max_seq_length (batch 32). torch runs `--threads` intra-op threads; XLA's CPU client uses every core of the
machine (2 on the reference machine, where the two match). Sentences/s is the best of `--repeats` timed runs
after one warm-up run (which compiles our few bucketed shapes). The embeddings of both encoders are compared
(minimum cosine) so that a speed-up cannot hide a wrong result. The last line is one JSON object.
"""

from __future__ import annotations

import json
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


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    # Imported here so that the module's helpers and flags load without the benchmark-only torch peers.
    import torch
    from sentence_transformers import SentenceTransformer

    from m2io_jax.models import from_pretrained, sentence_encoder

    threads, repeats = _THREADS.value, _REPEATS.value
    torch.set_num_threads(threads)
    path = _ENCODER.value or sentence_encoder.default_encoder_path()
    ours = from_pretrained(path)
    peer = SentenceTransformer(path, device="cpu")
    workloads = {
        "short (~15 tokens)": (short_sentences(_NUM_SHORT.value), 128, 1.0),
        "256-token chunks": (long_passages(_NUM_CHUNKS.value), 32, 0.8),
    }
    print(f"encoder {path}; torch threads {threads}")
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
    print(json.dumps({
        "benchmark": "embed",
        "threads": threads,
        "short_ratio": rows[0]["ratio"],
        "chunk_ratio": rows[1]["ratio"],
        "acceptance_met": all(r["ratio"] >= r["target"] for r in rows),
        "workloads": rows,
    }))


if __name__ == "__main__":
    cli.run(main)
