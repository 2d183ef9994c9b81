"""Where a training run's records go: JSON files, metrics.jsonl, TensorBoard events, progress lines, the
workdir check.

Every path goes through `etils.epath`, so the workdir may be a `gs://` path (with the `tpu` extra's gcsfs and
google-cloud-storage); only process 0 writes and prints. `write_json` writes one JSON file; `JsonLines` is
metrics.jsonl (appended in place on a local disk, rewritten whole on an object store, which cannot append);
`say` prints a progress line. `RunLog` writes `{workdir}/tensorboard` with tensorboardX
(`flax.metrics.tensorboard` would import TensorFlow): scalars under the stage as a prefix ("sft/loss",
"grpo/reward/mean", "eval/reward"), and text (a few sampled completions). On the other processes every call
does nothing, so callers need no branches.

`check_writable` fails fast, before data preparation or step 0, when the workdir cannot be written.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

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


def is_main_process() -> bool:
    """Whether this process writes the run's files (process 0 of a multi-process run)."""
    return jax.process_index() == 0


def say(message: object) -> None:
    """Prints a progress line from process 0 only (the others run the same steps in lockstep)."""
    if is_main_process():
        print(message, flush=True)


def is_local(path: str) -> bool:
    """Whether `path` is on this machine's filesystem (not an object store such as gs://)."""
    return "://" not in str(path)


def write_json(path: str, value: Any) -> None:
    """`value` as indented JSON at `path` (local or gs://), from process 0 only."""
    if is_main_process():
        epath.Path(path).write_text(json.dumps(value, indent=2, sort_keys=True, allow_nan=True) + "\n")


def read_json(path: str) -> Any:
    """The JSON value at `path` (local or gs://), or None when there is no such file."""
    path = epath.Path(path)
    return json.loads(path.read_text()) if path.exists() else None


class JsonLines:
    """A JSON-lines file of records (metrics.jsonl), written by process 0 only.

    Opening keeps the records for which `keep(record)` holds (a resumed run keeps the steps before its
    checkpoint and redoes the later ones); `keep=None` starts empty. Records are appended in place on a local
    disk and the file rewritten whole on an object store.
    """

    def __init__(self, path: str, keep: Callable[[dict[str, Any]], bool] | None = None):
        self.path = epath.Path(path)
        self.enabled = is_main_process()
        self._lines: list[str] = []
        if not self.enabled:
            return
        if keep is not None and self.path.exists():
            self._lines = [line if line.endswith("\n") else line + "\n"
                           for line in self.path.read_text().splitlines() if line and keep(json.loads(line))]
        self.path.write_text("".join(self._lines))

    def append(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(dict(record), allow_nan=True) + "\n"
        self._lines.append(line)
        if is_local(str(self.path)):
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
        else:
            self.path.write_text("".join(self._lines))


def check_writable(workdir: str) -> None:
    """Creates `workdir` if missing and writes (then removes) a probe file in it; a failure is one clear line."""
    try:
        path = epath.Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f"{_PROBE}.{jax.process_index()}"
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

