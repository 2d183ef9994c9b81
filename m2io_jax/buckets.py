"""Static-shape buckets: the padded size a dynamic length or count rounds up to, so jit compiles few shapes.

Every padded dimension (prompt length, batch rows, images, vision windows) is either one of a configured list
of sizes or, with none configured, the next power of two, or (`fine=True`, for dimensions whose padding costs
FLOPs quadratically or over many layers) the next of 2**k and 3 * 2**k. Text lengths of the encoders
(`text_length_bucket`) round to a multiple of 8 while short, then to 2**k or 3 * 2**k.
"""

from __future__ import annotations

from collections.abc import Sequence


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def next_power_of_two_or_three_quarters(n: int) -> int:
    """The smallest size >= n in 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2**k or 3 * 2**k).

    Two sizes per doubling: padding is at most a third of the padded size instead of a half.
    """
    power = next_power_of_two(n)
    return 3 * power // 4 if power >= 4 and n <= 3 * power // 4 else power


def bucket_size(n: int, choices: Sequence[int] | None, minimum: int, what: str, *, fine: bool = False) -> int:
    """The smallest bucket >= n.

    Args:
      n: the size to fit.
      choices: the configured bucket sizes; None or empty means powers of two.
      minimum: without choices, the smallest bucket (the result is the next power of two >= max(n, minimum)).
      what: what `n` counts, named in the error.
      fine: without choices, round up to 2**k or 3 * 2**k (`next_power_of_two_or_three_quarters`).

    Raises:
      ValueError: `n` is larger than every configured choice.
    """
    if not choices:
        size = max(n, minimum)
        return next_power_of_two_or_three_quarters(size) if fine else next_power_of_two(size)
    fitting = [c for c in choices if c >= n]
    if not fitting:
        raise ValueError(f"{what}={n} exceeds the largest bucket {max(choices)} (buckets: {tuple(choices)})")
    return int(min(fitting))


_MIN_TEXT_LENGTH_BUCKET = 8  # the shortest padded text length
_FINE_TEXT_LENGTH_LIMIT = 64  # up to here lengths round to a multiple of 8; above, to 2**k or 3 * 2**k


def text_length_bucket(n: int, limit: int) -> int:
    """Padded length of a text of `n` tokens: a multiple of 8 up to 64, then 96, 128, 192, 256, 384, ...

    Capped at `limit` (the encoder's maximum length). Short texts (most questions and sentences) waste at most
    7 tokens, long ones at most a third; a corpus compiles at most 8 shapes up to 64 tokens and two per
    doubling above.
    """
    if n <= _FINE_TEXT_LENGTH_LIMIT:
        return min(limit, max(_MIN_TEXT_LENGTH_BUCKET, -(-n // 8) * 8))
    return min(limit, next_power_of_two_or_three_quarters(n))
