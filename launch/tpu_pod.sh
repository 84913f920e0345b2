#!/usr/bin/env bash
# Build a chain on a Cloud TPU pod slice: the same command runs on every TPU VM worker.
#
#   export TPU_NAME=cbd-pod ZONE=us-central2-b ACCELERATOR=v4-32   # (and PROJECT if not default)
#   launch/tpu_pod.sh create                 # once: create the TPU VM slice
#   launch/tpu_pod.sh setup                  # copy this checkout to every worker, install it
#   launch/tpu_pod.sh run --config=configs/qwen_chain.py --config.workdir=/mnt/shared/qwen_chain
#   launch/tpu_pod.sh delete                 # when done
#
# `run` starts launch/train_chain.py on all workers at once (--worker=all) with CBD_DISTRIBUTED=1,
# so each process calls jax.distributed.initialize(), which finds the pod's coordinator itself.
# The workdir must be a filesystem every worker sees (NFS / Filestore, or a bucket mounted with
# gcsfuse at the same path on every worker): Orbax writes
# checkpoints from all hosts, host 0 writes chain.json and the exported anchors. Re-running `run`
# resumes where the chain stopped (e.g. after a preemption).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE, e.g. us-central2-b}"
ACCELERATOR="${ACCELERATOR:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
REMOTE_DIR="${REMOTE_DIR:-cbd-jax}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project "$PROJECT"); fi

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all \
    --command "$1"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
      --accelerator-type "$ACCELERATOR" --version "$RUNTIME_VERSION"
    ;;
  setup)
    cd "$(dirname "$0")/.."
    tar czf /tmp/cbd-jax.tgz --exclude .git --exclude .venv --exclude runs .
    gcloud compute tpus tpu-vm scp /tmp/cbd-jax.tgz "$TPU_NAME":/tmp/cbd-jax.tgz --zone "$ZONE" \
      "${PROJECT_FLAG[@]}" --worker=all
    ssh_all "mkdir -p ~/$REMOTE_DIR && tar xzf /tmp/cbd-jax.tgz -C ~/$REMOTE_DIR && \
      cd ~/$REMOTE_DIR && pip install -q -e . 'jax[tpu]' \
      -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
    ;;
  run)
    args=$(printf '%q ' "$@")
    ssh_all "cd ~/$REMOTE_DIR && CBD_DISTRIBUTED=1 python3 launch/train_chain.py $args"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --quiet
    ;;
  *)
    echo "usage: $0 create|setup|run [train_chain flags...]|delete (see the header)" >&2
    exit 2
    ;;
esac
