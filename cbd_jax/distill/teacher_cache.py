"""A link's teacher, run once: its top-k log-probabilities over the link's token budget, on disk.

With ``link.teacher_cache.k > 0`` a KD link first runs its teacher over every training batch of
its budget and stores, per optimizer step and process, the teacher's top-k token ids and their
log-probabilities at the link's temperature (``<dir>/step_00000012.p0of1.npz``: ``idx`` int32
and ``logp`` [M, B / P, T, k] in ``teacher_cache.dtype``, and ``rest`` fp32 [M, B / P, T], the log
of the teacher's mass outside its top-k, computed from the full logits: ``1 - sum p_topk`` of
rounded values is 0 or less for a confident teacher). Training then reads batch ``s`` with its
cached teacher and distils with the top-k loss (`losses.kd_loss_topk_sum`, the tail mass against
the student's mass outside the top-k), so the training steps never call the teacher: later
epochs, reruns and ablations of the link (other learning rates, student shapes, loss weights)
read the same cache. Only held-out evaluation still runs the teacher (KL and teacher perplexity
are measured against the real one).

The cache is resumable (a killed fill keeps every finished step file; each is written beside and
renamed; the processes agree on the union of their missing steps, so every one runs the teacher
the same number of times), and ``cache.json`` records what it was built from, by content (the
teacher's weight files and the training data files by size and modification time, the
tokenizer's fingerprint, k, temperature, batch shape and the data settings that change the
tokens): a cache built for other settings is refused, naming the field.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from cbd_jax import data
from cbd_jax.distill import losses, step_core
from cbd_jax.distill.fused_loss import fused_distill_loss, map_chunks
from cbd_jax.distill.train_step import LossSettings, state_shardings
from cbd_jax.model import decoder
from cbd_jax.model.config import ModelConfig
from cbd_jax.model.decoder import abstract_params
from cbd_jax.model.sharding import batch_sharding, global_batch, tree_shardings

log = logging.getLogger(__name__)
INDEX = "cache.json"
FORMAT = 2  # 2: step files hold ``rest``, the teacher's tail mass.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".npz", ".msgpack")


def settings(link) -> dict[str, Any] | None:
  """{k, dir, dtype} of a link's teacher cache, or None when it is off (k = 0 or no field)."""
  spec = link.get("teacher_cache")
  if not spec or not int(spec.get("k") or 0):
    return None
  return {"k": int(spec.k), "dir": str(spec.get("dir") or ""),
          "dtype": str(spec.get("dtype") or "float32")}


def check(link, where: str) -> None:
  """One-line errors for teacher-cache settings a link cannot use."""
  spec = settings(link)
  if spec is None:
    return
  if spec["k"] < 1:
    raise ValueError(f"{where}: teacher_cache.k={spec['k']} must be >= 1 (0 = off)")
  if spec["dtype"] not in ("float32", "float16", "bfloat16"):
    raise ValueError(f"{where}: teacher_cache.dtype={spec['dtype']!r}; use float32, float16 or "
                     "bfloat16")
  if link.loss.get("hidden_weight"):
    raise ValueError(f"{where}: hidden-state distillation needs the live teacher's states; set "
                     "loss.hidden_weight=0 or teacher_cache.k=0")


def _file(folder: Path, step: int) -> Path:
  return folder / f"step_{step:08d}.p{jax.process_index()}of{jax.process_count()}.npz"


def weights_stamp(path: str | os.PathLike) -> list | str:
  """[name, size, mtime] of a model's files: the file itself, or a folder's weight files and
  ``config.json``; the path as given when it is not local (a hub id)."""
  p = Path(os.path.expanduser(str(path)))
  if p.is_file():
    files = [p]
  elif p.is_dir():
    files = sorted(f for f in p.iterdir() if f.is_file() and (
        f.suffix in _WEIGHT_SUFFIXES or f.name == "config.json"))
  else:
    return str(path)
  return [[f.name, f.stat().st_size, f.stat().st_mtime] for f in files]


def cache_key(link, data_cfg, teacher_path: str, tokenizer_fingerprint: str) -> dict[str, Any]:
  """What a link's cache is built from, by content: the teacher's files, the tokenizer, the
  training tokens (`data.training_tokens_key`), k, dtype, temperature and the batch shape."""
  spec = settings(link)
  return {"format": FORMAT, "teacher": weights_stamp(teacher_path), "k": spec["k"],
          "dtype": spec["dtype"], "temperature": float(link.loss.temperature),
          "seq_len": int(link.seq_len), "batch_size": int(link.batch_size),
          "microbatches": int(link.microbatches), "processes": jax.process_count(),
          "tokenizer": tokenizer_fingerprint, "data": data.training_tokens_key(data_cfg)}


def make_topk(teacher: ModelConfig, k: int, temperature: float, chunk_size: int, mesh, rules):
  """Returns topk(teacher_params, ids [M, B, T]) -> (idx int32 [M, B, T, k], logp fp32
  [M, B, T, k], rest fp32 [M, B, T]) (`losses.topk_teacher`), one microbatch at a time and
  ``chunk_size`` tokens of logits per device at a time."""
  def one(params, ids_BxT):
    hidden, _ = decoder.apply_hidden(teacher, params, ids_BxT)
    head = decoder.head_weight(teacher, params)

    def chunk_topk(h_BxCxD):
      return losses.topk_teacher(h_BxCxD @ head.T.astype(h_BxCxD.dtype), k, temperature,
                                 teacher.vocab_limit)
    return map_chunks(chunk_topk, hidden, chunk_size)

  def topk(params, ids_MxBxT):
    return jax.lax.map(lambda ids: one(params, ids), ids_MxBxT)

  in_sh = (tree_shardings(abstract_params(teacher), mesh, rules),
           batch_sharding(mesh, ndim=3, leading=1))
  out_sh = (batch_sharding(mesh, ndim=4, leading=1), batch_sharding(mesh, ndim=4, leading=1),
            batch_sharding(mesh, ndim=3, leading=1))
  return jax.jit(step_core.under_mesh(topk, mesh), in_shardings=in_sh, out_shardings=out_sh)


def _every_process(x: np.ndarray) -> np.ndarray:
  """[P, ...]: ``x`` of every process, in process order (a collective on several processes)."""
  if jax.process_count() == 1:
    return np.asarray(x)[None]
  return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


def check_index(folder: Path, key: dict[str, Any]) -> None:
  """Refuses a cache built for other settings; creates the folder and index of a new one.

  Every process calls it: a refusal seen by any process is raised by all (so none goes on to
  the teacher's collective steps alone), and the folder exists on every process when it returns.
  """
  key = json.loads(json.dumps(key))  # As stored: tuples are lists.
  path, shown = folder / INDEX, ""
  if path.exists():
    try:
      old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
      old = {"unreadable cache.json": type(e).__name__}
    changed = {f: (old.get(f), v) for f, v in key.items() if old.get(f) != v}
    shown = ", ".join(f"{f} {a!r} -> {b!r}" for f, (a, b) in changed.items())
  refused = _every_process(np.array([bool(shown)]))[:, 0]
  if refused.any():
    where = "" if shown else f" on process {int(np.argmax(refused))}"
    raise ValueError(f"{folder}: a teacher cache built for other settings{where} "
                     f"({shown or 'see its log'}); delete it or set another teacher_cache.dir")
  folder.mkdir(parents=True, exist_ok=True)
  if not path.exists():
    tmp = path.with_name(f"{INDEX}.{jax.process_index()}.{os.getpid()}.part")
    tmp.write_text(json.dumps(key, indent=2) + "\n")
    os.replace(tmp, path)


def missing_steps(folder: Path, steps: int) -> list[int]:
  """Steps whose file is missing on any process: the same list on every process."""
  have = np.array([_file(folder, s).exists() for s in range(steps)], bool)
  return np.flatnonzero(~_every_process(have).all(axis=0)).tolist()


def fill(folder: Path, steps: int, batch_fn, topk_fn, place_teacher, mesh, dtype: str) -> int:
  """Writes the cache files of steps 0..steps-1 that are missing; returns how many steps the
  teacher ran (the same on every process).

  ``batch_fn(step)`` gives this process's rows of a batch (the link's own data order);
  ``topk_fn`` is `make_topk`'s function; ``place_teacher()`` puts the teacher's params on the
  mesh, called only when a step is missing. Every process runs the teacher over the union of the
  steps missing on any process (it is a collective) and writes the files it lacks.
  """
  todo = missing_steps(folder, steps)
  if not todo:
    return 0
  teacher_params = place_teacher()
  log.info("teacher cache %s: running the teacher over %d of %d steps", folder, len(todo), steps)
  start, store = time.time(), np.dtype(jnp.dtype(dtype))
  for n, step in enumerate(todo, 1):
    ids = global_batch(mesh, {"ids": batch_fn(step)["ids"]}, 1)["ids"]
    idx, logp, rest = topk_fn(teacher_params, ids)
    path = _file(folder, step)
    if not path.exists():
      _write(path, _local(idx), _local(logp).astype(store), _local(rest))
    if n % 50 == 0 or n == len(todo):
      log.info("teacher cache: %d/%d steps (%.1f steps/s)", n, len(todo),
               n / max(time.time() - start, 1e-9))
  return len(todo)


def _local(x: jax.Array) -> np.ndarray:
  """This process's rows (axis 1) of a global array, in order."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  shards = sorted(x.addressable_shards, key=lambda s: s.index[1].start or 0)
  rows, seen = [], set()
  for s in shards:
    if (s.index[1].start, s.index[1].stop) not in seen:
      seen.add((s.index[1].start, s.index[1].stop))
      rows.append(np.asarray(s.data))
  return np.concatenate(rows, axis=1)


def _write(path: Path, idx: np.ndarray, logp: np.ndarray, rest: np.ndarray) -> None:
  tmp = path.with_name(path.name + f".{os.getpid()}.part")
  with open(tmp, "wb") as f:
    np.savez(f, idx=idx.astype(np.int32), logp=logp, rest=rest.astype(np.float32))
  os.replace(tmp, path)


def read_step(folder: Path, step: int) -> dict[str, np.ndarray]:
  """``{"t_idx", "t_logp", "t_rest"}`` of a step (this process's rows), fp32 log-probs."""
  path = _file(folder, step)
  try:
    with np.load(path) as z:
      logp = z["logp"]
      if logp.dtype == np.dtype("V2"):  # np.save writes bfloat16 as raw 2-byte records.
        logp = logp.view(jnp.bfloat16)
      return {"t_idx": z["idx"], "t_logp": logp.astype(np.float32),
              "t_rest": z["rest"].astype(np.float32)}
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: damaged or missing teacher-cache file ({type(e).__name__}); delete "
                     "it and run again (the teacher recomputes it)") from None


@functools.lru_cache(maxsize=8)
def make_cached_step(student: ModelConfig, optimizer, loss: LossSettings, mesh, rules, schedule):
  """step(state, None, batch) -> (state, metrics): KD from the batch's cached top-k teacher
  (``t_idx``, ``t_logp`` [M, B, T, k], ``t_rest`` [M, B, T]) plus the CE mix; metrics as the
  live KD step's."""
  def objective(params, _, mb, total):
    s_params = step_core.compute_params(student, params)
    hidden, _ = decoder.apply_hidden(student, s_params, mb["ids"])
    mask = mb["mask"].astype(jnp.float32)
    value, sums = fused_distill_loss(
        hidden, decoder.head_weight(student, s_params), labels_BxT=mb["labels"] if loss.ce_weight
        else None, kind=loss.kind, temperature=loss.temperature, mask=mask,
        vocab_limit=student.vocab_limit, kd_weight=loss.kd_weight, ce_weight=loss.ce_weight,
        chunk_size=loss.chunk_size, teacher_topk=(mb["t_idx"], mb["t_logp"], mb["t_rest"]))
    return value / total, {"kd_sum": sums["kd_sum"], "ce_sum": sums["ce_sum"],
                           "count": jnp.sum(mask)}

  def totals(batch):
    return jnp.maximum(jnp.sum(batch["mask"].astype(jnp.float32)), 1.0)

  def mean_loss(sums, total):
    return (loss.kd_weight * sums["kd_sum"] + loss.ce_weight * sums["ce_sum"]) / total

  return step_core.make_step(objective, totals, mean_loss, optimizer,
                             state_shardings(student, optimizer, mesh, rules), None,
                             batch_sharding(mesh, ndim=3, leading=1), mesh, schedule)
