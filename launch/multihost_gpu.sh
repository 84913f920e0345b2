#!/usr/bin/env bash
# Build a chain on several GPU hosts: run this script once on every host (same arguments).
#
#   # on host 0 (its address must be reachable from the others):
#   NUM_HOSTS=2 HOST_ID=0 COORDINATOR=10.0.0.1:8476 launch/multihost_gpu.sh \
#       --config=configs/qwen_chain.py --config.workdir=/shared/runs/qwen_chain
#   # on host 1:
#   NUM_HOSTS=2 HOST_ID=1 COORDINATOR=10.0.0.1:8476 launch/multihost_gpu.sh \
#       --config=configs/qwen_chain.py --config.workdir=/shared/runs/qwen_chain
#
# Each host runs one process that drives all of its local GPUs; jax.distributed.initialize() joins
# the processes through the coordinator (host 0). The mesh in the config spans every GPU of every
# host (e.g. --config.mesh.data=-1 --config.mesh.fsdp=8 shards params within a host and
# replicates across hosts). The workdir must be a shared filesystem. Under SLURM, skip this
# script: `srun --ntasks-per-node=1 python launch/train_chain.py ...` is detected by JAX itself.
set -euo pipefail

: "${NUM_HOSTS:?set NUM_HOSTS to the number of hosts}"
: "${HOST_ID:?set HOST_ID to this host's rank, 0 .. NUM_HOSTS-1}"
: "${COORDINATOR:?set COORDINATOR to host 0's address:port, e.g. 10.0.0.1:8476}"

cd "$(dirname "$0")/.."
export JAX_COORDINATOR_ADDRESS="$COORDINATOR"
export JAX_NUM_PROCESSES="$NUM_HOSTS"
export JAX_PROCESS_ID="$HOST_ID"
# Let XLA overlap collectives with compute and keep memory for the models.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
exec python launch/train_chain.py "$@"
