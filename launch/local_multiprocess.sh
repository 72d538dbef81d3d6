#!/usr/bin/env bash
# N processes on this machine, each with D fake CPU devices, coordinated over localhost:
# the multi-host code path (jax.distributed, per-process data shards, global batches,
# multi-process Orbax checkpoints) without a cluster.
#
#   launch/local_multiprocess.sh 2 4 experiments/tiny_cpu.py runs/tiny_mp [--config.train.steps=50]
set -euo pipefail
NUM=${1:?number of processes}; DEVICES=${2:?devices per process}
CONFIG=${3:?config}; WORKDIR=${4:?workdir}; shift 4
PORT=${PORT:-$((20000 + RANDOM % 20000))}
PY=${PY:-.venv/bin/python}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < NUM; i++)); do
  MIRAGE_COORDINATOR_ADDRESS=127.0.0.1:$PORT MIRAGE_NUM_PROCESSES=$NUM MIRAGE_PROCESS_ID=$i \
  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES \
    "$PY" -m mirage_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@" \
    > >(sed "s/^/[p$i] /") 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
