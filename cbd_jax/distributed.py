"""Multi-host launch: the arguments of ``jax.distributed.initialize`` from the environment."""

from __future__ import annotations


def distributed_args(env) -> dict | None:
  """Arguments for jax.distributed.initialize, or None for a single-process run.

  Explicit: JAX_COORDINATOR_ADDRESS (host:port) + JAX_NUM_PROCESSES + JAX_PROCESS_ID. Detected
  by JAX itself: SLURM or Open MPI with more than one task, or CBD_DISTRIBUTED=1 (Cloud TPU VMs,
  Kubernetes), which launch/tpu_pod.sh sets on every worker.
  """
  if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
    if "JAX_PROCESS_ID" not in env:
      raise SystemExit("error: JAX_NUM_PROCESSES is set but JAX_PROCESS_ID is not; set it to "
                       "this host's rank (0 .. JAX_NUM_PROCESSES - 1)")
    return {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"],
            "num_processes": int(env["JAX_NUM_PROCESSES"]),
            "process_id": int(env["JAX_PROCESS_ID"])}
  if (env.get("CBD_DISTRIBUTED") == "1" or int(env.get("SLURM_NTASKS", "1")) > 1
      or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1):
    return {}
  return None
