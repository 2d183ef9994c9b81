"""The demo's answer generators: tiny text Qwen2 models trained by SFT on the embedded demo corpus.

    python -m m2io_jax.train_generator --config=configs/demo_generator.py --workdir=/tmp/tiny_run

Two generators from one tiny initial model (`m2io_jax.models.tiny`, tokenizer trained on the demo corpus, the
prompts and the answers): `generator/` writes answers from the top-3 retrieved passages, `generator_llm/`
(MRAMG-Bench's LLM-based method) also sees the candidate images' captions and writes `<imgN>` placeholders.
With --workdir set to the inserter run's workdir (`python -m m2io_jax.train --config=configs/tiny.py`),
`python -m m2io_jax.answer --workdir=...` finds the inserter and both generators. A few minutes on the 2-core
CPU (README).
"""

import ml_collections

from m2io_jax import generator


def get_config() -> ml_collections.ConfigDict:
    c = generator.get_config()
    c.data.retrieval.top_k = 3
    c.data.candidates.max_images = 6
    c.generator.top_k = 3
    c.generator.max_prompt_tokens = 512
    c.generator.max_new_tokens = 96
    c.generator.batch_size = 16
    c.generator.buckets.prompt_lengths = (256, 512)
    c.print_every = 50

    c.model.tiny.vocab_size = 2048
    c.model.tiny.text_shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   rope_theta=10000.0, tie_word_embeddings=True)

    c.sft.num_steps = 300
    c.sft.batch_size = 8
    c.sft.optimizer.learning_rate = 3e-3
    c.sft.optimizer.warmup_steps = 20
    c.sft.optimizer.compute_dtype = "float32"
    c.rollout.prompt_lengths = (256, 512)
    c.rollout.completion_lengths = (96,)
    return c
