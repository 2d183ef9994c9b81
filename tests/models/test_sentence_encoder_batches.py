"""Length-bucketed batching of `SentenceEncoder`: the token cap per forward call and the rows each batch keeps."""

import numpy as np

from m2io_jax.models import sentence_encoder


def test_long_texts_split_into_calls_within_the_token_cap():
    token_ids = [[7] * n for n in (200, 10, 200, 100, 200, 10, 200, 200)]
    batches = sentence_encoder.length_bucketed_batches(token_ids, batch_size=8, max_length=256, max_tokens=512)
    # Longest first; a batch's longest text sets its bucket: 256 tokens allow 512 // 256 = 2 rows per call (the
    # fifth 200-token text shares its call with the 100-token one), the two 10-token texts fit one 16-token call.
    assert [b.ids.shape for b in batches] == [(2, 256), (2, 256), (2, 256), (2, 16)]
    assert sorted(np.concatenate([b.rows for b in batches]).tolist()) == list(range(len(token_ids)))
    for batch in batches:
        assert batch.ids.size <= 512
        for i, r in enumerate(batch.rows):
            assert batch.mask[i].sum() == len(token_ids[r])


def test_default_cap_keeps_short_batches_whole():
    token_ids = [[7] * 14 for _ in range(128)]  # 16-token bucket: 2048 // 16 = 128 rows fit one call
    batches = sentence_encoder.length_bucketed_batches(token_ids, batch_size=128, max_length=256)
    assert [b.ids.shape for b in batches] == [(128, 16)]
    long_batches = sentence_encoder.length_bucketed_batches([[7] * 250] * 32, batch_size=32, max_length=256)
    assert [b.ids.shape for b in long_batches] == [(sentence_encoder.MAX_TOKENS_PER_CALL // 256, 256)] * 4
