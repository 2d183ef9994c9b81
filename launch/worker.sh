#!/usr/bin/env bash
# Runs on each TPU VM worker (launch/tpu_vm.sh calls it over ssh): starts the trainer detached from the ssh
# session, or reports how it stands. Every worker runs the same command; jax.distributed finds the slice.
#
#   bash launch/worker.sh start --workdir=gs://bucket/run --config=configs/inserter_3b.py:... [flags]
#       python -m m2io_jax.train with these flags, in the background; output to logs/train.log, its exit
#       status to logs/train.exit when it ends (0: done; 75: saved a checkpoint on preemption)
#   bash launch/worker.sh status
#       prints "running", "exit N" (the trainer ended with status N) or "none" (never started here)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p logs

case "${1:-}" in
  start)
    shift
    if [ -f logs/train.pid ] && kill -0 "$(cat logs/train.pid)" 2>/dev/null; then
      echo "worker.sh: the trainer already runs here (pid $(cat logs/train.pid)); see logs/train.log" >&2
      exit 1
    fi
    rm -f logs/train.exit
    # The exit status goes to a file only once the trainer has ended, so "exit N" is never half-written.
    # shellcheck disable=SC2016  # $@ and $? belong to the inner shell
    nohup bash -c '.venv/bin/python -m m2io_jax.train "$@"; echo $? > logs/train.exit.tmp; mv logs/train.exit.tmp logs/train.exit' \
      worker.sh "$@" >> logs/train.log 2>&1 < /dev/null &
    echo $! > logs/train.pid
    echo "worker.sh: trainer started on $(hostname) (pid $!), output in ~/m2io_jax/logs/train.log"
    ;;
  status)
    if [ -f logs/train.exit ]; then
      echo "exit $(cat logs/train.exit)"
    elif [ -f logs/train.pid ] && kill -0 "$(cat logs/train.pid)" 2>/dev/null; then
      echo running
    else
      echo none
    fi
    ;;
  *)
    sed -n '2,10p' "$0"
    exit 2
    ;;
esac
