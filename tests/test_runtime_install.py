"""The runtime alone (`pip install .`, no extras) installs everything that building a model prompt uses.

A fresh venv gets the package without extras, so that nothing arrives through torch or the test peers
(jinja2, which renders chat templates, once did). The check then runs from a directory outside the checkout,
so that the source tree cannot shadow the installed package, and builds one Qwen2.5-VL prompt with an image
through `Qwen2_5_VLProcessor.from_pretrained` on a tiny tokenizer trained with `tokenizers`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Runs inside the fresh venv, with a checkpoint directory as argv[1]; prints one JSON line.
PROMPT_SCRIPT = r'''
import importlib.util, json, sys
import numpy as np
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2_5_VLConfig, Qwen2TokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import m2io_jax
from m2io_jax.models.qwen2_5_vl_processor import Qwen2_5_VLProcessor

path = sys.argv[1]
specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
tk = Tokenizer(models.BPE())
tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tk.decoder = decoders.ByteLevel()
tk.train_from_iterator(["Where does the picture of the bridge go?", "system user assistant"],
                       trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
Qwen2TokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                   bos_token=None, additional_special_tokens=specials[3:]).save_pretrained(path)
Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224).save_pretrained(path)
Qwen2_5_VLConfig(
    text_config=dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=1024,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
    vision_config=dict(depth=1, hidden_size=32, intermediate_size=44, num_heads=2, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=64,
                       fullatt_block_indexes=[0]),
    image_token_id=specials.index("<|image_pad|>"), video_token_id=specials.index("<|video_pad|>"),
    vision_start_token_id=specials.index("<|vision_start|>"), vision_end_token_id=specials.index("<|vision_end|>"),
    vocab_size=512).save_pretrained(path)

processor = Qwen2_5_VLProcessor.from_pretrained(path)
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 170, 3), dtype=np.uint8))
conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where does it go?"}]}]
batch = processor([conversation], [[image]])
print(json.dumps({
    "package_file": m2io_jax.__file__,
    "torch_installed": importlib.util.find_spec("torch") is not None,
    "text": processor.apply_chat_template(conversation),
    "image_pad_tokens": int((batch.input_ids == processor.config.image_token_id).sum()),
    "image_grid_thw": batch.image_grid_thw.tolist(),
    "merge": processor.config.vision.spatial_merge_size,
    "pixel_values_shape": list(batch.pixel_values.shape),
}))
'''


def _copy_source(destination: Path) -> Path:
    """The checkout without its venv, VCS and build outputs, so that the install leaves the working tree as it is."""
    ignored = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", "out",
                                     "runs")
    return Path(shutil.copytree(ROOT, destination, ignore=ignored))


@pytest.mark.slow
def test_runtime_install_builds_a_vl_prompt(tmp_path):
    source = _copy_source(tmp_path / "source")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_PROGRESS_BAR="off")
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", str(source)], env=env,
                             capture_output=True, text=True, timeout=1800)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-4000:]

    workdir = tmp_path / "elsewhere"
    (workdir / "checkpoint").mkdir(parents=True)
    (workdir / "prompt.py").write_text(PROMPT_SCRIPT)
    run = subprocess.run([str(python), "prompt.py", "checkpoint"], cwd=workdir, env={**env, "JAX_PLATFORMS": "cpu"},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])

    assert Path(out["package_file"]).is_relative_to(venv), out["package_file"]
    assert not out["torch_installed"]
    assert out["text"].count("<|image_pad|>") == 1 and "Where does it go?" in out["text"], out["text"]
    (t, h, w), = out["image_grid_thw"]
    assert out["image_pad_tokens"] == t * h * w // out["merge"] ** 2 > 0, out
    assert out["pixel_values_shape"][0] == t * h * w, out
