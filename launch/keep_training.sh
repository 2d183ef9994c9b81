#!/usr/bin/env bash
# Keeps one training run going on a spot / preemptible queued resource until it ends: requests the queued
# resource, and once it is ACTIVE brings the workers up (launch/tpu_vm.sh up: code, Python 3.11 + jax[tpu], data)
# and starts the trainer on all of them; when the TPU is preempted (queued resource SUSPENDED, or FAILED) it
# deletes the queued resource and requests it again, and the new trainer resumes from the latest checkpoint in
# the gs:// WORKDIR by itself. A trainer that exits 75 (it saved a checkpoint on a preemption notice while the VM
# survived) or that is gone without an exit status is started again. Exit 0 of the trainer deletes the queued
# resource and ends the loop; any other exit status ends the loop with status 1 and leaves the VM for
# inspection (launch/tpu_vm.sh logs, then delete-queued).
#
#   export TPU_NAME=m2io-v5e ZONE=us-west4-a ACCELERATOR=v5litepod-8 WORKDIR=gs://my-bucket/runs/inserter_3b
#   export DATA_GCS=gs://my-bucket/m2io_data TRAIN_FLAGS='--config.data.tfds_dir=$HOME/m2io_data/tfds'
#   nohup bash launch/keep_training.sh > keep_training.log 2>&1 &
#
# Settings: those of launch/common.sh, plus POLL_SECONDS (between state checks; default 60) and MAX_RECREATE
# (recreations before giving up; default 0: no limit). --dry-run (or DRY_RUN=1) prints the gcloud commands of
# one preemption cycle, in order, instead of looping.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --dry-run ]; then
  export DRY_RUN=1
  shift
fi
# shellcheck source=launch/common.sh
source launch/common.sh
export DRY_RUN
POLL_SECONDS="${POLL_SECONDS:-60}"
MAX_RECREATE="${MAX_RECREATE:-0}"
launch=(bash launch/tpu_vm.sh)
require_workdir

log() {
  echo "keep_training.sh $(date -u +%H:%M:%S): $*"
}

if [ "$DRY_RUN" = 1 ]; then
  echo "# polled every ${POLL_SECONDS} s: the queued resource's state, and once ACTIVE worker 0's trainer"
  "${launch[@]}" status-queued
  "${launch[@]}" train-status
  echo "# no queued resource: request it"
  "${launch[@]}" queue
  echo "# ACTIVE, no trainer on the workers: bring them up and start it"
  "${launch[@]}" up
  "${launch[@]}" train
  echo "# SUSPENDED or FAILED (preempted): delete and request again; the new trainer resumes from WORKDIR"
  "${launch[@]}" delete-queued
  "${launch[@]}" queue
  echo "# trainer exit 75 (saved on a preemption notice, VM still ACTIVE) or gone: start it again"
  "${launch[@]}" train
  echo "# trainer exit 0: the run is done"
  "${launch[@]}" delete-queued
  exit 0
fi

# The queued resource's state, or ABSENT when it does not exist (or cannot be read).
queued_state() {
  "${launch[@]}" status-queued 2> /dev/null || echo ABSENT
}

# Worker 0's trainer: "absent" (no checkout yet), "none", "running", "exit N", or "unreachable" (ssh failed).
trainer_status() {
  local out
  if out="$("${launch[@]}" train-status 2> /dev/null)"; then
    echo "${out##*$'\n'}"
  else
    echo unreachable
  fi
}

recreations=0
while true; do
  state="$(queued_state)"
  state="${state:-ABSENT}"
  case "$state" in
    ABSENT)
      log "no queued resource $QUEUED_NAME: requesting it"
      "${launch[@]}" queue || log "request failed; retrying in ${POLL_SECONDS} s"
      ;;
    ACTIVE)
      status="$(trainer_status)"
      case "$status" in
        absent | none)
          log "$TPU_NAME is ACTIVE without a trainer: bringing the workers up and starting it"
          if ! { "${launch[@]}" up && "${launch[@]}" train; }; then
            log "bring-up failed; retrying in ${POLL_SECONDS} s"
          fi
          ;;
        "exit 0")
          log "the trainer finished: deleting $QUEUED_NAME"
          "${launch[@]}" delete-queued
          exit 0
          ;;
        "exit 75")
          log "the trainer saved a checkpoint on preemption and the VM survived: starting it again"
          "${launch[@]}" train || log "restart failed; retrying in ${POLL_SECONDS} s"
          ;;
        "exit "*)
          log "the trainer failed ($status); the VM is kept: bash launch/tpu_vm.sh logs, then delete-queued"
          exit 1
          ;;
        *) ;;  # running, or unreachable for now
      esac
      ;;
    SUSPENDED | FAILED)
      if [ "$MAX_RECREATE" -gt 0 ] && [ "$recreations" -ge "$MAX_RECREATE" ]; then
        log "$QUEUED_NAME is $state after $recreations recreations (MAX_RECREATE=$MAX_RECREATE): giving up"
        exit 1
      fi
      recreations=$((recreations + 1))
      log "$QUEUED_NAME is $state (preempted or not served): deleting it and requesting it again ($recreations)"
      if "${launch[@]}" delete-queued; then
        "${launch[@]}" queue || log "request failed; retrying in ${POLL_SECONDS} s"
      else
        log "delete failed; retrying in ${POLL_SECONDS} s"
      fi
      ;;
    *) ;;  # WAITING_FOR_RESOURCES, ACCEPTED, CREATING, PROVISIONING, SUSPENDING, DELETING: wait
  esac
  sleep "$POLL_SECONDS"
done
