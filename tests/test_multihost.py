"""Two processes x 4 CPU devices through jax.distributed give the loss of one process, and fill
a teacher cache that one of them lost part of (a killed host) without hanging.

The tests start this file twice as a script (``--worker I PORT OUT [CACHE]``); each worker joins
the distributed runtime over gloo, feeds only its own rows of every batch and trains the same
steps as the single-process reference of tests/test_train_step.py, or fills the cache.
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
  from test_train_step import LOSS, STUDENT, TEACHER, _batches, host_params, optimizer

  from cbd_jax.distill.train_step import (
    make_init_state,
    make_train_step,
    place_params,
  )
  from cbd_jax.model.sharding import global_batch, make_mesh, tree_shardings
  from cbd_jax.model.sharding import host_params as gather

  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  opt, sched = optimizer()
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


CACHE_STEPS, CACHE_K = 3, 6


def fill_cache(process_index: int, folder: Path) -> dict:
  """Fills a teacher cache of CACHE_STEPS steps, then, as a host killed mid-fill leaves it,
  process 1 loses its files of steps 0 and 2 and both fill again: returns how many steps the
  teacher ran each time."""
  import jax.numpy as jnp

  sys.path.insert(0, str(HERE))
  from test_train_step import TEACHER, _batches, host_params

  from cbd_jax.distill import teacher_cache
  from cbd_jax.distill.train_step import place_params
  from cbd_jax.model.sharding import DEFAULT_RULES, make_mesh, sync, tree_shardings

  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  teacher = host_params(TEACHER, 2)
  place = lambda: place_params(teacher, tree_shardings(teacher, mesh), jnp.float32)  # noqa: E731
  topk = teacher_cache.make_topk(TEACHER, CACHE_K, 2.0, 32, mesh, DEFAULT_RULES)
  rows = slice(process_index * BATCH // 2, (process_index + 1) * BATCH // 2)
  batches = _batches(3, CACHE_STEPS, MICRO, BATCH, SEQ)
  batch_fn = lambda step: {"ids": batches[step]["ids"][:, rows]}  # noqa: E731
  key = {"teacher": "test_train_step.TEACHER", "k": CACHE_K}
  teacher_cache.check_index(folder, key)  # The folder does not exist yet.
  first = teacher_cache.fill(folder, CACHE_STEPS, batch_fn, topk, place, mesh, "float32")
  sync("cache-filled")
  if process_index == 1:
    for step in (0, 2):
      next(folder.glob(f"step_{step:08d}.p1of2.npz")).unlink()
  sync("cache-damaged")
  teacher_cache.check_index(folder, key)
  second = teacher_cache.fill(folder, CACHE_STEPS, batch_fn, topk, place, mesh, "float32")
  return {"first": first, "second": second}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(outs: list[Path], *extra: str, timeout: float = 300) -> None:
  """Runs the two workers of this file; fails with their logs if either fails or hangs."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(i), str(port),
                             str(outs[i]), *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = []
  try:
    for p in procs:
      try:
        logs.append(p.communicate(timeout=timeout)[0])
      except subprocess.TimeoutExpired:
        for q in procs:
          q.kill()
        logs.append(p.communicate()[0])
        raise AssertionError(f"the workers hung (no exit in {timeout} s); worker log tails: " +
                             " | ".join(log[-1500:] for log in logs)) from None
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 0, log[-3000:]


def test_two_processes_match_one(tmp_path):
  outs = [tmp_path / f"worker{i}.npz" for i in range(2)]
  _run_workers(outs)
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


def test_a_cache_fill_after_one_host_lost_steps_agrees_and_equals_one_process(tmp_path):
  """Each host used to run the teacher over its own missing steps, a collective step called a
  different number of times per host: a hang. They now run the union and finish alike."""
  folder = tmp_path / "cache"
  outs = [tmp_path / f"cache_worker{i}.json" for i in range(2)]
  _run_workers(outs, str(folder), timeout=180)
  for out in outs:
    assert json.loads(out.read_text()) == {"first": CACHE_STEPS, "second": 2}
  assert sorted(p.name for p in folder.glob("step_*")) == [
      f"step_{s:08d}.p{i}of2.npz" for s in range(CACHE_STEPS) for i in range(2)]
  sys.path.insert(0, str(HERE))
  import jax
  from test_train_step import TEACHER, _batches, host_params

  from cbd_jax.distill import teacher_cache
  from cbd_jax.model.sharding import make_mesh

  topk = teacher_cache.make_topk(TEACHER, CACHE_K, 2.0, 32, make_mesh({"data": -1}), ())
  for step, batch in enumerate(_batches(3, CACHE_STEPS, MICRO, BATCH, SEQ)):
    want = dict(zip(("idx", "logp", "rest"),
                    jax.device_get(topk(host_params(TEACHER, 2), batch["ids"])), strict=True))
    for i in range(2):  # Process i's file holds its rows of the batch, as one process makes them.
      with np.load(folder / f"step_{step:08d}.p{i}of2.npz") as got:
        rows = slice(i * BATCH // 2, (i + 1) * BATCH // 2)
        np.testing.assert_array_equal(got["idx"], want["idx"][:, rows])
        np.testing.assert_allclose(got["logp"], want["logp"][:, rows], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["rest"], want["rest"][:, rows], rtol=1e-5, atol=1e-6)


def _worker(process_id: int, port: int, out: str, cache: str = "") -> None:
  sys.path.insert(0, str(HERE.parent))
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_default_matmul_precision", "highest")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id, initialization_timeout=120)
  assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
  if cache:
    Path(out).write_text(json.dumps(fill_cache(jax.process_index(), Path(cache))))
  else:
    losses, params = train(jax.process_index(), jax.process_count())
    flat = {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(out, losses=json.dumps(losses), **flat)
  jax.distributed.shutdown()


if __name__ == "__main__":
  if sys.argv[1:2] == ["--worker"]:
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], *sys.argv[5:6])
