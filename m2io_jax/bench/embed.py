"""Text-encoder throughput: our Flax BERT against sentence-transformers (torch) on the same MiniLM weights.

    python -m m2io_jax.bench.embed [--threads 2] [--num_short 2000] [--num_chunks 64] [--repeats 2]

Two workloads, each encoded whole by both encoders (sorting by length and batching are each encoder's own):
short sentences of about 15 tokens (batch 128) and 256-token passages, i.e. retrieval chunks at MiniLM's
max_seq_length (batch 32). torch runs `--threads` intra-op threads; XLA's CPU client uses every core of the
machine (2 on the reference machine, where the two match). Sentences/s is the best of `--repeats` timed runs
after one warm-up run (which compiles our few bucketed shapes). The embeddings of both encoders are compared
(minimum cosine) so that a speed-up cannot hide a wrong result. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable

import numpy as np

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="", help="checkpoint directory (default: packaged MiniLM)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num_short", type=int, default=2000)
    parser.add_argument("--num_chunks", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch  # noqa: PLC0415  (benchmark-only peer)
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    from m2io_jax.models import from_pretrained, sentence_encoder  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    path = args.encoder or sentence_encoder.default_encoder_path()
    ours = from_pretrained(path)
    peer = SentenceTransformer(path, device="cpu")
    workloads = {
        "short (~15 tokens)": (short_sentences(args.num_short), 128, 1.0),
        "256-token chunks": (long_passages(args.num_chunks), 32, 0.8),
    }
    print(f"encoder {path}; torch threads {args.threads}")
    print(f"{'workload':<20} {'mean tokens':>11} {'flax sent/s':>12} {'s-t sent/s':>11} {'ratio':>6} {'target':>6} {'min cos':>9}")
    rows = []
    for name, (texts, batch_size, target) in workloads.items():
        mean_tokens = float(np.mean([len(ids) for ids in ours.tokenize(texts)]))
        flax_rate, flax_out = best_rate(lambda: ours.encode(texts, batch_size=batch_size), len(texts), args.repeats)
        torch_rate, torch_out = best_rate(
            lambda: peer.encode(texts, batch_size=batch_size, convert_to_numpy=True), len(texts), args.repeats
        )
        cosine = float(np.min(np.sum(flax_out * torch_out, axis=1) / np.linalg.norm(torch_out, axis=1)))
        ratio = flax_rate / torch_rate
        rows.append({"workload": name, "texts": len(texts), "batch_size": batch_size, "mean_tokens": round(mean_tokens, 1),
                     "flax_sentences_per_s": round(flax_rate, 1), "st_sentences_per_s": round(torch_rate, 1),
                     "ratio": round(ratio, 3), "target": target, "min_cosine": cosine})
        print(f"{name:<20} {mean_tokens:>11.1f} {flax_rate:>12.1f} {torch_rate:>11.1f} {ratio:>6.2f} {target:>6.1f} "
              f"{cosine:>9.6f}")
    print(json.dumps({
        "benchmark": "embed",
        "threads": args.threads,
        "short_ratio": rows[0]["ratio"],
        "chunk_ratio": rows[1]["ratio"],
        "acceptance_met": all(r["ratio"] >= r["target"] for r in rows),
        "workloads": rows,
    }))


if __name__ == "__main__":
    main()
