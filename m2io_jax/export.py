"""Writes a training run's checkpoint as a Hugging Face Qwen2.5-VL directory.

    python -m m2io_jax.export --workdir=/tmp/run --out=/tmp/run_hf
    python -m m2io_jax.export --workdir=/tmp/run --out=/tmp/run_hf_step200 --step=200

Reads the run's `{workdir}/config.json` (written by `m2io_jax.train`) for the model it started from
(`config.model.checkpoint`, or the tiny build in `{workdir}/init`) and the processor settings, restores the
parameters of checkpoint `--step` (default: the latest) of `{workdir}/checkpoints`, and writes them with the
tokenizer, image processor and chat template files to `--out`: transformers' `from_pretrained` and
`m2io_jax.models.from_pretrained` both load it. A GRPO checkpoint of a run with LoRA (`config.lora.rank` > 0)
holds the adapters alone: they are applied to their base (`{workdir}/sft`, the model the SFT stage ended with,
or the starting model when the run had no SFT stage) and written merged into the weights. Step numbers count
the run's steps (SFT step s is s, GRPO step g follows the SFT stage's last step); `--step` that is not kept
lists the kept ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import flags
from etils import epath
from flax import nnx

from m2io_jax import cli, models
from m2io_jax.models import lora
from m2io_jax.models.qwen2_5_vl_processor import Qwen2_5_VLProcessor
from m2io_jax.rl import steps
from m2io_jax.rl.checkpoint import CHECKPOINT_DIR, RunCheckpoints, save_hf_model

# allow_override: m2io_jax.train defines the same --workdir and m2io_jax.data.demo.generate an --out; the
# commands may be imported into one process (only the running command's flags are parsed)
_WORKDIR = flags.DEFINE_string("workdir", None, "a training run's directory (m2io_jax.train --workdir; required)",
                               allow_override=True)
_OUT = flags.DEFINE_string("out", None, "directory to write the Hugging Face checkpoint to (required)",
                           allow_override=True)
_STEP = flags.DEFINE_integer("step", None, "the checkpoint's run step (default: the latest)")


def run_config(workdir: str) -> dict[str, Any]:
    """The run's config.json as a dict."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise cli.UserError(f"--workdir={workdir}: no config.json there (expected the workdir of m2io_jax.train)")
    return json.loads(path.read_text())


def source_model(workdir: str, config: dict[str, Any]) -> str:
    """The Hugging Face directory the run started from: config.model.checkpoint or `{workdir}/init`."""
    source = config["model"]["checkpoint"] or os.path.join(workdir, "init")
    if not os.path.isfile(os.path.join(source, "config.json")):
        raise cli.UserError(f"the run's model {source} has no config.json (the export needs the directory the run "
                            f"started from)")
    return source


def export(workdir: str, out: str, step: int | None = None) -> int:
    """Writes the parameters of checkpoint `step` (None: the latest) of the run in `workdir` to `out`; returns
    the step written."""
    config = run_config(workdir)
    if not (epath.Path(workdir) / CHECKPOINT_DIR).exists():
        raise cli.UserError(f"--workdir={workdir}: no {CHECKPOINT_DIR}/ there (the run saved no checkpoint yet)")
    checkpoints = RunCheckpoints(workdir, ml_collections.ConfigDict(config["checkpoint"]), read_only=True)
    try:
        step = checkpoints.latest_step() if step is None else step
        if step is None:
            raise cli.UserError(f"--workdir={workdir}: {CHECKPOINT_DIR}/ holds no finished checkpoint")
        source = source_model(workdir, config)
        position = checkpoints.saved(step).position
        adapted = position.stage == "grpo" and config.get("lora", {}).get("rank", 0) > 0
        # a LoRA checkpoint holds the adapters alone: their base is the model the SFT stage ended with
        base = os.path.join(workdir, "sft") if adapted and position.sft_steps > 0 else source
        model = models.from_pretrained(base)
        processor = Qwen2_5_VLProcessor.from_pretrained(source, config=model.config, **config["model"]["processor"])
        if adapted:
            model = lora.apply_config(model, ml_collections.ConfigDict(config["lora"]))
        graphdef, params = nnx.split(model)
        trained, frozen = steps.split_trainable(adapted, params)
        model = lora.merge(nnx.merge(graphdef, steps.join_trainable(checkpoints.restore_params(step, trained),
                                                                     frozen)))
    finally:
        checkpoints.close()
    save_hf_model(model, processor, source, out)
    return step


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    cli.require(_WORKDIR, _OUT)
    step = export(_WORKDIR.value, _OUT.value, _STEP.value)
    print(f"wrote step {step} of {_WORKDIR.value} to {_OUT.value}", flush=True)


if __name__ == "__main__":
    cli.run(main)
