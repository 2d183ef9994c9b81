"""Static-shape buckets: powers of two, configured sizes and the encoders' text lengths."""

import pytest

from m2io_jax.buckets import bucket_size, next_power_of_two, next_power_of_two_or_three_quarters, text_length_bucket


def test_next_power_of_two():
    assert [next_power_of_two(n) for n in (-3, 0, 1, 2, 3, 4, 5, 7, 8, 9, 1023, 1024, 1025)] == [
        1, 1, 1, 2, 4, 4, 8, 8, 8, 16, 1024, 1024, 2048]


def test_next_power_of_two_or_three_quarters():
    assert [next_power_of_two_or_three_quarters(n) for n in (0, 1, 2, 3, 4, 5, 6, 7, 9, 13, 144, 1152, 1537)] == [
        1, 1, 2, 3, 4, 6, 6, 8, 12, 16, 192, 1536, 2048]
    assert bucket_size(144, None, 1, "windows", fine=True) == 192
    assert bucket_size(144, (150, 256), 1, "windows", fine=True) == 150  # configured choices win


def test_powers_of_two_without_choices():
    assert [bucket_size(n, None, 1, "rows") for n in (0, 1, 2, 3, 16, 17)] == [1, 1, 2, 4, 16, 32]
    assert [bucket_size(n, None, 16, "prompt length") for n in (0, 1, 16, 17)] == [16, 16, 16, 32]
    assert bucket_size(5, None, 3, "rows") == 8  # a minimum that is not a power of two rounds up too
    assert bucket_size(5, (), 1, "images") == 8  # an empty list means powers of two


def test_configured_choices():
    choices = (48, 16, 32)  # unsorted on purpose
    assert [bucket_size(n, choices, 1, "batch size") for n in (0, 1, 16, 17, 33, 48)] == [16, 16, 16, 32, 48, 48]
    assert bucket_size(3, choices, 64, "batch size") == 16  # the minimum applies only to powers of two


def test_over_the_largest_choice_names_what_and_the_buckets():
    with pytest.raises(ValueError, match=r"^prompt length=49 exceeds the largest bucket 48 \(buckets: \(16, 48\)\)$"):
        bucket_size(49, (16, 48), 1, "prompt length")


def test_text_length_bucket():
    # Multiples of 8 (at least 8) up to 64 tokens, then 2**k or 3 * 2**k, capped at the limit.
    assert [text_length_bucket(n, 256) for n in (0, 1, 8, 9, 17, 63, 64, 65, 97, 100, 200, 300)] == [
        8, 8, 8, 16, 24, 64, 64, 96, 128, 128, 256, 256]
    assert text_length_bucket(300, 512) == 384
    assert text_length_bucket(20, 16) == 16  # the limit also caps short texts
