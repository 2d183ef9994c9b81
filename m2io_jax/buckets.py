"""Static-shape buckets: the padded size a dynamic length or count rounds up to, so jit compiles few shapes.

Every padded dimension (prompt length, batch rows, images, vision windows) is either one of a configured list
of sizes or, with none configured, the next power of two.
"""

from __future__ import annotations

from collections.abc import Sequence


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def bucket_size(n: int, choices: Sequence[int] | None, minimum: int, what: str) -> int:
    """The smallest bucket >= n.

    Args:
      n: the size to fit.
      choices: the configured bucket sizes; None or empty means powers of two.
      minimum: without choices, the smallest bucket (the result is the next power of two >= max(n, minimum)).
      what: what `n` counts, named in the error.

    Raises:
      ValueError: `n` is larger than every configured choice.
    """
    if not choices:
        return next_power_of_two(max(n, minimum))
    fitting = [c for c in choices if c >= n]
    if not fitting:
        raise ValueError(f"{what}={n} exceeds the largest bucket {max(choices)} (buckets: {tuple(choices)})")
    return int(min(fitting))
