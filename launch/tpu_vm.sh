#!/usr/bin/env bash
# TPU VM / pod-slice lifecycle with gcloud: create, copy the code, install on every worker, run a command on
# every worker (jax.distributed picks up the TPU topology by itself), fetch logs, delete.
#
#   export TPU_NAME=m2io-v5e-16 ZONE=us-west4-a ACCELERATOR=v5litepod-16 RUNTIME=v2-alpha-tpuv5-lite
#   bash launch/tpu_vm.sh create
#   bash launch/tpu_vm.sh sync                 # copies this checkout to ~/m2io_jax on all workers
#   bash launch/tpu_vm.sh install              # runs launch/install.sh tpu on all workers
#   bash launch/tpu_vm.sh run "python -c 'import jax; print(jax.device_count())'"   # any command, all workers, logs kept
#   bash launch/tpu_vm.sh logs                 # copies ~/m2io_jax/logs from every worker to ./logs/<worker>
#   bash launch/tpu_vm.sh delete
# Optional: PROJECT (gcloud project), SPOT=1 (spot capacity), DATA_DIR (local MRAMG-Bench / checkpoints,
# synced with `sync-data` to the same path on every worker).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
project_flag=()
[ -n "${PROJECT:-}" ] && project_flag=(--project "$PROJECT")
remote_dir='~/m2io_jax'

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${project_flag[@]}" --worker=all --command "$1"
}

case "${1:-}" in
  create)
    : "${ACCELERATOR:?set ACCELERATOR, e.g. v5litepod-16}" "${RUNTIME:?set RUNTIME, e.g. v2-alpha-tpuv5-lite}"
    spot=()
    [ "${SPOT:-0}" = 1 ] && spot=(--spot)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" "${project_flag[@]}" \
      --accelerator-type "$ACCELERATOR" --version "$RUNTIME" "${spot[@]}"
    ;;
  sync)
    archive=$(mktemp --suffix=.tar.gz)
    git archive --format=tar.gz -o "$archive" HEAD
    gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":/tmp/m2io_jax.tar.gz --zone "$ZONE" "${project_flag[@]}" --worker=all
    ssh_all "mkdir -p $remote_dir && tar -xzf /tmp/m2io_jax.tar.gz -C $remote_dir"
    rm -f "$archive"
    ;;
  sync-data)
    : "${DATA_DIR:?set DATA_DIR}"
    ssh_all "mkdir -p $DATA_DIR"
    gcloud compute tpus tpu-vm scp --recurse "$DATA_DIR"/* "$TPU_NAME":"$DATA_DIR"/ --zone "$ZONE" "${project_flag[@]}" --worker=all
    ;;
  install)
    ssh_all "cd $remote_dir && bash launch/install.sh tpu"
    ;;
  run)
    shift
    command="$*"
    [ -n "$command" ] || { echo "usage: $0 run \"<command>\"" >&2; exit 2; }
    ssh_all "cd $remote_dir && mkdir -p logs && (.venv/bin/$command) 2>&1 | tee logs/\$(hostname).log"
    ;;
  logs)
    workers=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" "${project_flag[@]}" \
      --format='value(networkEndpoints.len())')
    for ((w = 0; w < ${workers:-1}; w++)); do
      mkdir -p "logs/worker-$w"
      gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME:$remote_dir/logs/*" "logs/worker-$w/" \
        --zone "$ZONE" "${project_flag[@]}" --worker="$w"
    done
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" "${project_flag[@]}" --quiet
    ;;
  *)
    sed -n '2,16p' "$0"
    exit 2
    ;;
esac
