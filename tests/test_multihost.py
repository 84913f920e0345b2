"""Two processes x 4 CPU devices through jax.distributed give the loss of one process.

The test starts this file twice as a script (``--worker I PORT OUT``); each worker joins the
distributed runtime over gloo, feeds only its own rows of every batch and trains the same steps
as the single-process reference of tests/test_train_step.py.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
STEPS, MICRO, BATCH, SEQ = 2, 2, 8, 16


def train(process_index: int, process_count: int):
  """Losses and final params of two distillation steps on a (2, 2, 2) mesh of all devices."""
  import jax.numpy as jnp

  sys.path.insert(0, str(HERE))
  from test_train_step import LOSS, STUDENT, TEACHER, _batches, host_params

  from cbd_jax.chain import global_batch
  from cbd_jax.chain import host_params as gather
  from cbd_jax.sharding import make_mesh, tree_shardings
  from cbd_jax.train_step import make_init_state, make_optimizer, make_train_step, place_params

  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  opt, sched = make_optimizer(1e-2, total_steps=10, warmup_steps=1, weight_decay=0.1)
  state = make_init_state(STUDENT, opt, mesh)(host_params(STUDENT, 1))
  teacher = host_params(TEACHER, 2)
  teacher = place_params(teacher, tree_shardings(teacher, mesh), jnp.float32)
  step = make_train_step(STUDENT, TEACHER, opt, LOSS, mesh, schedule=sched)
  per = BATCH // process_count
  rows = slice(process_index * per, (process_index + 1) * per)
  losses = []
  for batch in _batches(0, STEPS, MICRO, BATCH, SEQ):
    local = {k: v[:, rows] for k, v in batch.items()}  # This process's rows only.
    state, metrics = step(state, teacher, global_batch(mesh, local, 1))
    losses.append(float(np.asarray(metrics["loss"].addressable_data(0))))
  return losses, gather(state.params)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  outs = [tmp_path / f"worker{i}.npz" for i in range(2)]
  procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(i), str(port),
                             str(outs[i])], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=300)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 0, log[-3000:]
  sys.path.insert(0, str(HERE))
  from test_train_step import _reference  # One device, same batches (shared with that file).

  ref_params, history = _reference()
  ref_losses = [float(h["loss"]) for h in history]
  for out in outs:
    got = np.load(out)
    np.testing.assert_allclose(json.loads(str(got["losses"])), ref_losses, rtol=1e-5)
    flat = {k: got[k] for k in got.files if k != "losses"}
    import jax

    for path, leaf in jax.tree_util.tree_flatten_with_path(ref_params)[0]:
      key = jax.tree_util.keystr(path)
      np.testing.assert_allclose(flat[key], leaf, rtol=1e-4, atol=1e-6, err_msg=key)


def _worker(process_id: int, port: int, out: str) -> None:
  sys.path.insert(0, str(HERE.parent))
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_default_matmul_precision", "highest")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id, initialization_timeout=120)
  assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
  losses, params = train(jax.process_index(), jax.process_count())
  flat = {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  np.savez(out, losses=json.dumps(losses), **flat)
  jax.distributed.shutdown()


if __name__ == "__main__":
  if sys.argv[1:2] == ["--worker"]:
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
