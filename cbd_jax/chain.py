"""The chain driver: distil anchor after anchor, each from its predecessor, resumably.

Link k's teacher is anchor k-1 (the source for k = 0). Its student starts from the link's public
checkpoint (``link.init``) or from Shrink of the teacher to ``link.shape``. The student trains
with the sharded distillation step; Orbax checkpoints are written every ``checkpoint.every``
steps and at the end; the finished anchor is exported as a Hugging Face folder with the teacher's
tokenizer under ``<workdir>/anchors/<name>`` and recorded in ``<workdir>/chain.json``. Running the
same command again skips finished links and resumes the running one at its last checkpoint.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from cbd_jax import checkpoint, data, hf_io, losses, manifest, metrics, resize, source
from cbd_jax.config import ModelConfig, num_params
from cbd_jax.sharding import (
  MESH_AXES,
  batch_sharding,
  data_parallel_size,
  make_mesh,
  parse_rules,
  tree_shardings,
)
from cbd_jax.train_step import (
  LossSettings,
  abstract_params,
  init_train_state,
  make_eval_step,
  make_optimizer,
  make_train_step,
  place_params,
  state_shardings,
)

log = logging.getLogger(__name__)
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                "intermediate_size")


_OPT_FIELDS = ("lr", "warmup_steps", "schedule", "min_lr_ratio", "weight_decay", "b1", "b2", "eps",
               "grad_clip")


@functools.lru_cache(maxsize=8)
def _make_steps(student, teacher, loss, mesh, rules, opt: tuple, steps: int):
  """(optimizer, schedule, train_step, eval_step), built once per link setting and process, so a
  resumed link in the same process reuses the compiled steps."""
  optimizer, schedule = make_optimizer(*opt[:1], steps, *opt[1:])
  train_step = make_train_step(student, teacher, optimizer, loss, mesh, rules, schedule)
  return optimizer, schedule, train_step, make_eval_step(student, teacher, loss, mesh, rules)


def link_steps(link) -> int:
  """Optimizer steps of a link: ``steps``, or ceil(tokens / tokens_per_step) when tokens > 0."""
  per_step = link.batch_size * link.microbatches * link.seq_len
  if link.get("tokens", 0):
    return max(1, math.ceil(link.tokens / per_step))
  if link.steps <= 0:
    raise ValueError(f"link {link.name}: set steps > 0 or a token budget (tokens > 0)")
  return int(link.steps)


def check_config(config) -> None:
  """Refuses, with one line naming the field and the fix, a config the driver cannot run."""
  names = [link.name for link in config.chain]
  if not names:
    raise ValueError("config.chain is empty; give at least one link")
  if len(set(names)) != len(names):
    raise ValueError(f"link names {names} repeat; give every link its own name")
  unknown = set(dict(config.mesh)) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; use {MESH_AXES}")
  for i, link in enumerate(config.chain):
    where = f"config.chain[{i}] ({link.name})"
    if is_bridged(link):
      _bridge_module(link, where).check_link(link, where)
    elif not link.get("init") and not any(dict(link.shape).values()):
      raise ValueError(f"{where}: give a public checkpoint (init) or a shape for Shrink")
    losses.check_kind(link.loss.kind)
    link_steps(link)
    for key in ("batch_size", "microbatches", "seq_len"):
      if int(link[key]) < 1:
        raise ValueError(f"{where}: {key} must be >= 1")
  if config.checkpoint.every < 1:
    raise ValueError("config.checkpoint.every must be >= 1")


def is_bridged(link) -> bool:
  """A link whose student has another tokenizer (and family) than its teacher."""
  return link.get("bridge", "none") not in ("none", "", None)


def _bridge_module(link, where: str):
  """The driver of bridged links (``cbd_jax.bridge_link``), imported only when a link needs it."""
  try:
    from cbd_jax import bridge_link
  except ImportError:
    raise ValueError(f"{where}: bridge {link.bridge!r} needs cbd_jax.bridge_link, which is not "
                     "installed; use bridge='none' with a teacher of the same tokenizer") from None
  return bridge_link


def student_config(link, teacher: ModelConfig) -> ModelConfig:
  """The shape a Shrink-started student takes: the teacher's config with ``link.shape`` set."""
  shape = {k: int(v) for k, v in dict(link.shape).items() if v}
  unknown = set(shape) - set(SHAPE_FIELDS)
  if unknown:
    raise ValueError(f"link {link.name}: unknown shape fields {sorted(unknown)}; use "
                     f"{SHAPE_FIELDS}")
  if not shape:
    raise ValueError(f"link {link.name}: give a public checkpoint (init) or a shape")
  return teacher.replace(**shape)


def _compute(config: ModelConfig, link, dtype_key: str) -> ModelConfig:
  return config.replace(dtype=link.get(dtype_key) or link.dtype, remat=bool(link.get("remat")))


def global_batch(mesh, local: dict[str, np.ndarray], leading: int) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over (data, fsdp) on axis ``leading``.

  Each batch shard must live on one process's devices (true when the tensor axis stays within a
  host, as ``jax.make_mesh`` lays meshes out); the rows' order across processes does not matter,
  since losses are token sums.
  """
  pc = jax.process_count()
  sh = batch_sharding(mesh, ndim=local["ids"].ndim, leading=leading)
  def one(x):
    shape = list(x.shape)
    shape[leading] *= pc
    return jax.make_array_from_process_local_data(sh, x, tuple(shape))
  return {k: one(v) for k, v in local.items()}


def host_params(params: Any) -> Any:
  """Full numpy copies of (possibly multi-host sharded) arrays on every process."""
  if jax.process_count() == 1:
    return jax.device_get(params)
  return multihost_utils.process_allgather(params, tiled=True)


def _evaluate(eval_step, params, teacher_params, batches, mesh) -> dict[str, float]:
  avg = metrics.TokenAverager()
  for b in batches:
    avg.add(jax.device_get(eval_step(params, teacher_params, global_batch(mesh, b, 0))))
  out = avg.means()
  out["ppl"] = metrics.perplexity(out["ce"])
  out["teacher_ppl"] = metrics.perplexity(out["teacher_ce"])
  return out


def _progress(total: int, initial: int, name: str, enabled: bool):
  from tqdm.auto import tqdm

  return tqdm(total=total, initial=initial, desc=name, unit="step", dynamic_ncols=True,
              disable=not enabled, mininterval=1.0, smoothing=0.1)


def _start_student(link, teacher: ModelConfig, teacher_params) -> tuple[ModelConfig, Any]:
  """(config, host params) of a new student: its public checkpoint, or Shrink of the teacher."""
  if link.get("init"):
    config, params = hf_io.load_hf_numpy(link.init)
    if config.vocab_limit != teacher.vocab_limit:
      raise ValueError(f"link {link.name}: {link.init} has a vocabulary of {config.vocab_limit}, "
                       f"its teacher {teacher.vocab_limit}; such a link needs a vocabulary bridge")
    return config, params
  target = student_config(link, teacher)
  log.info("link %s: Shrink of the teacher to %s", link.name,
           {k: getattr(target, k) for k in SHAPE_FIELDS})
  params = resize.shrink(teacher, teacher_params, target, method=link.get("shrink", "leading"))
  return target, jax.tree.map(np.asarray, params)


class _Reporter:
  """Token-weighted training metrics per logging window -> JSONL, the progress bar, log lines."""

  def __init__(self, link, loss: LossSettings, steps: int, start: int, writer, config, lead):
    self.link, self.loss, self.steps, self.writer = link, loss, steps, writer
    self.every, self.quiet = config.log.every, not config.log.progress
    self.lead = lead
    self.tokens_per_step = link.batch_size * link.microbatches * link.seq_len
    self.kd_name = "kl" if loss.kind == "fkl" and loss.temperature == 1.0 else loss.kind
    self.bar = _progress(steps, start, link.name, lead and config.log.progress)
    self.window, self.t_window, self.timed = metrics.TokenAverager(), time.time(), -1
    self.rate = float("nan")

  def add(self, step: int, m: dict[str, Any]) -> None:
    """One step's host metrics; writes the window's means every ``log.every`` steps.

    Throughput leaves out the run's first step (mostly compilation) and evaluation time.
    """
    m = dict(m, loss_sum=self.loss.kd_weight * m["kd_sum"] + self.loss.ce_weight * m["ce_sum"])
    m.pop("loss")
    self.window.add(m)
    if self.timed < 0:
      self.t_window, self.timed = time.time(), 0
    else:
      self.timed += 1
    if step % self.every and step != self.steps:
      return
    means = self.window.means()
    elapsed = time.time() - self.t_window
    if self.timed:  # Else (a window of one step after a pause) the last rate stands.
      self.rate = self.timed * self.tokens_per_step / elapsed
    means["tokens_per_s"] = self.rate
    self.writer.write(step, means, "train/")
    self.bar.set_postfix(loss=f"{means['loss']:.4f}", **{self.kd_name: f"{means['kd']:.4f}"},
                         tok_s=f"{means['tokens_per_s']:.0f}", refresh=False)
    if self.quiet and self.lead:
      log.info("link %s step %d/%d loss %.4f %s %.4f tok/s %.0f", self.link.name, step,
               self.steps, means["loss"], self.kd_name, means["kd"], means["tokens_per_s"])
    self.window.reset()
    self.t_window, self.timed = time.time(), 0

  def evaluated(self, step: int, evals: dict[str, float]) -> None:
    """Writes held-out metrics; throughput restarts after the time spent evaluating."""
    self.timed = -1
    self.writer.write(step, evals, "eval/")
    self.bar.set_postfix_str(f"eval kl {evals['kl']:.4f} ppl {evals['ppl']:.2f}", refresh=False)

  def close(self) -> None:
    self.bar.close()
    self.writer.close()


def _initial_state(student, optimizer, sh, manager, start_student):
  """The latest checkpoint of the link, else a fresh state from ``start_student()``."""
  shapes = jax.eval_shape(lambda p: init_train_state(p, optimizer), abstract_params(student))
  state = checkpoint.restore_latest(manager, checkpoint.abstract_with_shardings(shapes, sh))
  if state is None:
    placed = place_params(start_student(), sh.params, jnp.float32)
    state = jax.jit(lambda p: init_train_state(p, optimizer), out_shardings=sh)(placed)
  return state


def _run_steps(state, stop: int, train_step, eval_step, teacher_params, train_data,
               eval_batches, mesh, manager, reporter, config):
  """Optimizer steps from ``state.step`` to ``stop``: checkpoints, evals and metrics on the way."""
  link, pi, pc = reporter.link, jax.process_index(), jax.process_count()
  pending = None
  for step in range(int(jax.device_get(state.step)), stop):
    local = train_data.batch(step, link.microbatches, link.batch_size, pi, pc)
    state, m = train_step(state, teacher_params, global_batch(mesh, local, 1))
    if pending is not None:  # Pulled one step late, so the device never waits for the host.
      reporter.add(pending[0], jax.device_get(pending[1]))
    pending = (step + 1, m)
    reporter.bar.update(1)
    if (step + 1) % config.checkpoint.every == 0:
      checkpoint.save_state(manager, state, force=True)
    if config.eval.every and (step + 1) % config.eval.every == 0 and step + 1 < reporter.steps:
      reporter.evaluated(step + 1, _evaluate(eval_step, state.params, teacher_params,
                                             eval_batches, mesh))
  if pending is not None:
    reporter.add(pending[0], jax.device_get(pending[1]))
  checkpoint.save_state(manager, state, force=True)
  manager.wait_until_finished()
  return state


def train_link(config, index: int, teacher_path: str, tokenizer_path: str,
               entry: dict[str, Any], workdir: Path, on_start) -> dict[str, Any]:
  """Trains link ``index`` to completion (resuming if it can); returns its manifest entry."""
  link, lead = config.chain[index], jax.process_index() == 0
  t_config, t_params = hf_io.load_hf_numpy(teacher_path)
  tokenizer = hf_io.load_tokenizer(tokenizer_path)
  ckpt_dir = workdir / "checkpoints" / link.name
  fresh = None
  if entry.get("config") is not None and ckpt_dir.exists():  # Resuming: the shape is known.
    s_config = ModelConfig.from_dict(entry["config"])
  else:
    s_config, fresh = _start_student(link, t_config, t_params)
  entry = on_start(s_config)

  student, teacher = _compute(s_config, link, "dtype"), _compute(t_config, link, "teacher_dtype")
  steps, mesh = link_steps(link), make_mesh(dict(config.mesh))
  for key, rows in (("batch_size", link.batch_size), ("eval.batch_size", config.eval.batch_size)):
    if rows % data_parallel_size(mesh):
      raise ValueError(f"link {link.name}: {key}={rows} must be a multiple of the mesh's "
                       f"data x fsdp = {data_parallel_size(mesh)} batch shards")
  rules = parse_rules(config.get("sharding_rules"))
  loss = LossSettings(**dict(link.loss))
  optimizer, schedule, train_step, eval_step = _make_steps(
      student, teacher, loss, mesh, rules, tuple(link.optimizer[k] for k in _OPT_FIELDS), steps)
  manager = checkpoint.make_checkpoint_manager(ckpt_dir, config.checkpoint.every,
                                               config.checkpoint.keep)

  def start_params():
    return fresh if fresh is not None else _start_student(link, t_config, t_params)[1]
  state = _initial_state(student, optimizer, state_shardings(student, optimizer, mesh, rules),
                         manager, start_params)
  teacher_params = place_params(t_params, tree_shardings(t_params, mesh, rules),
                                jnp.dtype(teacher.dtype))
  fresh = t_params = None  # The host copies are no longer needed.

  pi, pc = jax.process_index(), jax.process_count()
  cache = Path(config.data.get("cache_dir") or workdir / "data_cache")
  train_data = data.make_train_data(config.data, tokenizer, link.seq_len, cache, pi, pc)
  eval_batches = data.make_eval_batches(config.data, tokenizer, link.seq_len,
                                        config.eval.batch_size, config.eval.num_batches, cache,
                                        pi, pc)
  writer = metrics.MetricsWriter(workdir / "metrics" / f"{link.name}.jsonl",
                                 workdir / "tensorboard" / link.name if config.log.tensorboard
                                 else None, enabled=lead)
  start = int(jax.device_get(state.step))
  reporter = _Reporter(link, loss, steps, start, writer, config, lead)
  log.info("link %s: %s (%s params) <- %s, steps %d..%d of %d tokens each", link.name,
           s_config.family, f"{num_params(s_config):,}", teacher_path, start, steps,
           reporter.tokens_per_step)
  stop = steps if not config.get("stop_after") else min(steps, start + config.stop_after)
  state = _run_steps(state, stop, train_step, eval_step, teacher_params, train_data,
                     eval_batches, mesh, manager, reporter, config)
  tokens = stop * reporter.tokens_per_step
  if stop < steps:  # This run's step budget (stop_after) is spent: the link stays "running".
    log.info("link %s: stopping at step %d of %d (stop_after); run again to resume", link.name,
             stop, steps)
    reporter.close()
    manager.close()
    return dict(entry, tokens=tokens, steps=stop)
  evals = _evaluate(eval_step, state.params, teacher_params, eval_batches, mesh)
  reporter.evaluated(steps, evals)
  reporter.close()
  log.info("link %s done: held-out KL %.4f, student ppl %.2f (teacher %.2f)", link.name,
           evals["kl"], evals["ppl"], evals["teacher_ppl"])
  params = host_params(state.params)
  if lead:
    hf_io.save_hf(s_config, params, workdir / entry["path"], tokenizer=tokenizer,
                  dtype=config.get("export_dtype") or None, overwrite=True)
  _sync(f"export-{link.name}")
  manager.close()
  return dict(entry, status="done", tokens=tokens, steps=steps, eval=evals)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def run_chain(config) -> dict[str, Any]:
  """Builds (or resumes) every anchor of ``config.chain``; returns the final manifest."""
  check_config(config)
  workdir = Path(os.path.expanduser(str(config.workdir)))
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
  source_path, tokenizer_path = source.prepare_source(config)
  doc = manifest.load_or_create(workdir, config, source_path)
  teacher_path = source_path
  for index, link in enumerate(config.chain):
    entry = doc["anchors"][index]
    if entry["status"] == "done" and (workdir / entry["path"]).exists():
      log.info("link %s already done; skipping", link.name)
    else:
      def on_start(s_config, index=index):
        doc["anchors"][index] = manifest.running_entry(doc["anchors"][index], s_config)
        manifest.save(workdir, doc)
        return doc["anchors"][index]

      train = (_bridge_module(link, link.name).train_bridge_link if is_bridged(link)
               else train_link)
      done = train(config, index, teacher_path, tokenizer_path, entry, workdir, on_start)
      doc["anchors"][index] = done
      manifest.save(workdir, doc)
      if done["status"] != "done":
        return doc
    teacher_path = tokenizer_path = str(workdir / doc["anchors"][index]["path"])
  return doc
