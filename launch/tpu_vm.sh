#!/usr/bin/env bash
# TPU VM / pod slice lifecycle with gcloud: create (a VM, or a queued resource), copy this checkout and install
# it on every worker, copy the data from gs://, start the trainer on every worker (jax.distributed finds the
# slice by itself), follow its log, delete. Settings are environment variables (launch/common.sh lists them).
#
#   export TPU_NAME=m2io-v5e ZONE=us-west4-a ACCELERATOR=v5litepod-8 WORKDIR=gs://my-bucket/runs/inserter_3b
#   export DATA_GCS=gs://my-bucket/m2io_data TRAIN_FLAGS='--config.data.tfds_dir=$HOME/m2io_data/tfds'
#   bash launch/tpu_vm.sh [--dry-run] create   # a TPU VM now (CAPACITY=spot | preemptible | on-demand)
#   bash launch/tpu_vm.sh queue                # or a queued resource, $QUEUED_NAME, served when capacity frees
#   bash launch/tpu_vm.sh status               # the VM's state (READY, PREEMPTED, ...)
#   bash launch/tpu_vm.sh status-queued        # the queued resource's (WAITING_FOR_RESOURCES, ACTIVE, ...)
#   bash launch/tpu_vm.sh up                   # sync + install + data
#   bash launch/tpu_vm.sh sync                 # copies this checkout's HEAD to ~/m2io_jax on every worker
#   bash launch/tpu_vm.sh install              # launch/install.sh $INSTALL_EXTRAS on every worker (Python 3.11)
#   bash launch/tpu_vm.sh data                 # gcloud storage rsync $DATA_GCS -> $DATA_DIR on every worker
#   bash launch/tpu_vm.sh train                # python -m m2io_jax.train --workdir=$WORKDIR on every worker
#   bash launch/tpu_vm.sh train-status         # worker 0's trainer: running, exit N, none or absent (no code)
#   bash launch/tpu_vm.sh logs                 # follows worker 0's training log (WORKER=3 for another)
#   bash launch/tpu_vm.sh ssh "<command>"      # any command on every worker, e.g. "tail -n 3 m2io_jax/logs/train.log"
#   bash launch/tpu_vm.sh delete               # deletes the VM (one made by create)
#   bash launch/tpu_vm.sh delete-queued        # deletes the queued resource and its VM
# --dry-run (or DRY_RUN=1) prints every gcloud command instead of running it. launch/keep_training.sh
# recreates a preempted queued resource and resumes until the run ends.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --dry-run ]; then
  export DRY_RUN=1
  shift
fi
# shellcheck source=launch/common.sh
source launch/common.sh

usage() {
  sed -n '2,24p' "$0" >&2
  exit 2
}

create_vm() {
  local runtime capacity
  runtime="${RUNTIME:-$(runtime_for "${ACCELERATOR:?set ACCELERATOR, e.g. v5litepod-8}")}"
  capacity="$(capacity_flag)"
  tpus tpu-vm create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$runtime" ${capacity:+"$capacity"}
}

create_queued() {
  local runtime capacity
  runtime="${RUNTIME:-$(runtime_for "${ACCELERATOR:?set ACCELERATOR, e.g. v5litepod-8}")}"
  capacity="$(capacity_flag)"
  tpus queued-resources create "$QUEUED_NAME" --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR" \
    --runtime-version="$runtime" ${capacity:+"$capacity"}
}

sync_code() {
  local archive
  archive="$(mktemp --suffix=.tar.gz)"
  if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo "tpu_vm.sh: note: uncommitted changes are not copied (the workers get HEAD, $(git rev-parse --short HEAD))" >&2
  fi
  run git archive --format=tar.gz -o "$archive" HEAD
  tpus tpu-vm scp "$archive" "$TPU_NAME:m2io_jax.tar.gz" --worker=all
  on_workers all "mkdir -p $REMOTE_DIR && tar -xzf m2io_jax.tar.gz -C $REMOTE_DIR && rm m2io_jax.tar.gz"
  rm -f "$archive"
}

install_workers() {
  on_workers all "cd $REMOTE_DIR && bash launch/install.sh $INSTALL_EXTRAS"
}

copy_data() {
  if [ -z "${DATA_GCS:-}" ]; then
    echo "tpu_vm.sh: DATA_GCS is not set: no data copied (the config must find its data another way)" >&2
    return 0
  fi
  on_workers all "mkdir -p $DATA_DIR && gcloud storage rsync --recursive $DATA_GCS $DATA_DIR"
}

start_training() {
  require_workdir
  on_workers all "$(start_command)"
}

case "${1:-}" in
  create) create_vm ;;
  queue) create_queued ;;
  status)
    tpus tpu-vm describe "$TPU_NAME" --format='value(state)'
    ;;
  status-queued)
    tpus queued-resources describe "$QUEUED_NAME" --format='value(state.state)'
    ;;
  up) sync_code && install_workers && copy_data ;;
  sync) sync_code ;;
  install) install_workers ;;
  data) copy_data ;;
  train) start_training ;;
  train-status)
    on_workers 0 "if [ -f $REMOTE_DIR/launch/worker.sh ]; then bash $REMOTE_DIR/launch/worker.sh status; else echo absent; fi"
    ;;
  logs) on_workers "${WORKER:-0}" "tail -n +1 -F $REMOTE_DIR/logs/train.log" ;;
  ssh)
    [ -n "${2:-}" ] || usage
    on_workers all "$2"
    ;;
  delete) tpus tpu-vm delete "$TPU_NAME" --quiet ;;
  delete-queued) tpus queued-resources delete "$QUEUED_NAME" --force --quiet ;;
  *) usage ;;
esac
