#!/usr/bin/env bash
# Train on GKE through xpk (https://github.com/AI-Hypercomputer/xpk): one JobSet, every TPU
# host runs the same command; JAX reads the cluster from the pod environment.
#
#   CLUSTER=my-cluster TPU_TYPE=v5p-128 NUM_SLICES=1 IMAGE=gcr.io/my-proj/mirage_jax:latest \
#   CONFIG=experiments/pod_v5p_128.py:denoiser WORKDIR=gs://BUCKET/runs/pod_dit launch/xpk.sh \
#       --config.data.data_dir=gs://BUCKET/datasets \
#       --config.denoiser.autoencoder_checkpoint=gs://BUCKET/exports/pod_ae
#
# WORKDIR and data_dir: gs:// URLs directly, not a gcsfuse mount (through gcsfuse a
# checkpoint's commit-by-rename is copy + delete, so a preempted save can look finished).
# Build IMAGE from this repository with `pip install -e '.[tpu,gcs]'`. With NUM_SLICES > 1 set the
# DCN mesh too, e.g. --config.dcn_mesh.data=$NUM_SLICES (extra arguments go to mirage_jax.main).
set -euo pipefail
: "${CLUSTER:?}" "${TPU_TYPE:?}" "${IMAGE:?}" "${CONFIG:?}" "${WORKDIR:?}"
NUM_SLICES="${NUM_SLICES:-1}"
WORKLOAD="${WORKLOAD:-mirage-$(date +%Y%m%d-%H%M%S)}"

xpk workload create \
  --cluster="$CLUSTER" \
  --workload="$WORKLOAD" \
  --tpu-type="$TPU_TYPE" \
  --num-slices="$NUM_SLICES" \
  --docker-image="$IMAGE" \
  --command="python -m mirage_jax.main --config=$CONFIG --workdir=$WORKDIR --distributed=auto $*"
