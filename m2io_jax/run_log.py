"""Where a training run's records go besides metrics.jsonl: TensorBoard event files, and the workdir check.

`RunLog` writes `{workdir}/tensorboard` with tensorboardX (`flax.metrics.tensorboard` would import
TensorFlow): scalars under the stage as a prefix ("sft/loss", "grpo/reward/mean", "eval/reward"), and text
(a few sampled completions). Only process 0 writes (`jax.process_index() == 0`); on the other processes
every call does nothing, so callers need no branches.

`check_writable` fails fast, before data preparation or step 0, when the workdir cannot be written.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import sys
from collections.abc import Iterator, Mapping, Sequence

import jax
from etils import epath

from m2io_jax import cli


@contextlib.contextmanager
def _torch_hidden() -> Iterator[None]:
    """Makes `import torch` fail inside the block when torch is installed but not imported yet.

    tensorboardX imports torch whenever it can (for graphs and tensors, which we never log); the runtime must
    not import torch, so tensorboardX is imported with torch hidden and falls back to numpy.
    """
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None  # `import torch` raises ImportError while this entry is None
    try:
        yield
    finally:
        del sys.modules["torch"]


with _torch_hidden():
    from tensorboardX import SummaryWriter

TENSORBOARD_DIR = "tensorboard"
_PROBE = ".m2io_write_probe"


def check_writable(workdir: str) -> None:
    """Creates `workdir` if missing and writes (then removes) a probe file in it; a failure is one clear line."""
    try:
        path = epath.Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        probe = path / _PROBE
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise cli.UserError(f"--workdir={workdir} is not writable ({type(error).__name__}: {error}); choose a "
                            f"directory this user can create and write") from error


class RunLog:
    """TensorBoard scalars and text of one run, written by process 0 only (module docstring)."""

    def __init__(self, workdir: str, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.directory = os.path.join(workdir, TENSORBOARD_DIR)
        self._writer = SummaryWriter(logdir=self.directory) if self.enabled else None

    def scalars(self, prefix: str, step: int, metrics: Mapping[str, float]) -> None:
        """Each metric as the scalar "{prefix}/{name}" at `step` (non-numbers are left out, NaN kept)."""
        if self._writer is None:
            return
        for name, value in metrics.items():
            if isinstance(value, numbers.Real):
                self._writer.add_scalar(f"{prefix}/{name}", float(value), global_step=step)
        self._writer.flush()

    def texts(self, tag: str, step: int, texts: Sequence[str]) -> None:
        """`texts` as one markdown text entry at `step` (each as a numbered, fenced block)."""
        if self._writer is None or not texts:
            return
        body = "\n\n".join(f"**{i}**\n\n```\n{text}\n```" for i, text in enumerate(texts))
        self._writer.add_text(tag, body, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

