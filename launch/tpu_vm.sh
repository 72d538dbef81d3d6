#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: the same command on every worker, JAX finds its peers.
#
#   TPU_NAME=my-v5p ZONE=us-east5-a CONFIG=experiments/pod_v5p_128.py:denoiser \
#   WORKDIR=gs://BUCKET/runs/pod_dit launch/tpu_vm.sh --config.data.data_dir=gs://BUCKET/datasets \
#       --config.denoiser.autoencoder_checkpoint=gs://BUCKET/exports/pod_ae [--config.train.steps=1000 ...]
#
# WORKDIR and the dataset's data_dir must be storage every worker reads: gs:// URLs directly,
# not a gcsfuse mount (through gcsfuse a checkpoint's commit-by-rename is copy + delete, so a
# preempted save can look finished; README "Cloud Storage (gs://) paths"). Extra arguments
# are passed to mirage_jax.main.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${CONFIG:?set CONFIG}" "${WORKDIR:?set WORKDIR}"
REPO_URL="${REPO_URL:-$(git config --get remote.origin.url)}"
REF="${REF:-$(git rev-parse HEAD)}"
ARGS="$*"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e
  if [ ! -d ~/mirage_jax ]; then git clone '$REPO_URL' ~/mirage_jax; fi
  cd ~/mirage_jax && git fetch -q && git checkout -q '$REF'
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q -e '.[tpu,gcs]'
  .venv/bin/python -m mirage_jax.main --config='$CONFIG' --workdir='$WORKDIR' \
      --distributed=auto $ARGS
"
