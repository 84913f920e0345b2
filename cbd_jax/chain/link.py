"""One link driver for every link strategy: plain KD, bridged KD, sequence-level KD, recovery.

A link trains one student. What differs between strategies (where the student starts, which data
and which step it trains with, how it is evaluated) is a small object, a `LinkStrategy`; what
does not is written here once: resume, optimizer, restore-or-init, teacher placement, the
checkpoint loop, ``stop_after``, evaluation, metrics (pulled one step late, so the device never
waits for the host), export and the multi-host sync points.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cbd_jax.chain import guards, metrics
from cbd_jax.chain.checks import check_batch, link_steps
from cbd_jax.checkpoints import hf_io, orbax_io
from cbd_jax.distill.train_step import (
  init_train_state,
  make_optimizer,
  place_params,
  state_shardings,
)
from cbd_jax.model.config import ModelConfig, num_params
from cbd_jax.model.decoder import abstract_params
from cbd_jax.model.sharding import (
  global_batch,
  host_params,
  make_mesh,
  pad_rows,
  parse_rules,
  sync,
  tree_shardings,
)

log = logging.getLogger(__name__)
OPT_FIELDS = ("lr", "warmup_steps", "schedule", "min_lr_ratio", "weight_decay", "b1", "b2", "eps",
              "grad_clip")


@dataclasses.dataclass
class LinkRun:
  """One link's settings and places: the run config, the link's fields, teacher, output paths."""

  config: Any                 # The run's config (data, mesh, checkpoint, eval, log, ...).
  link: Any                   # The link's fields (name, budget, loss, optimizer, batch, dtypes).
  workdir: Path
  out: Path                   # Where the finished student is exported.
  teacher_path: str | None = None
  tokenizer_path: str | None = None
  t_config: ModelConfig | None = None
  t_params: Any = None        # Host (numpy) teacher params.

  @property
  def ckpt_dir(self) -> Path:
    return self.workdir / "checkpoints" / self.link.name

  @property
  def tokens_per_step(self) -> int:
    return int(self.link.batch_size * self.link.microbatches * self.link.seq_len)


class LinkStrategy:
  """What a link strategy decides; the driver calls these in order (see `train_link`)."""

  name = "kd"
  uses_teacher = True         # The step reads the teacher's params, placed on the mesh.
  keeps_host_teacher = False  # ``final`` reads the teacher's host params.

  def __init__(self, run: LinkRun):
    self.run = run

  def new_student(self) -> tuple[ModelConfig, Any]:
    """(config, host params) of a student that starts now."""
    raise NotImplementedError

  def tokenizer(self):
    """The student's tokenizer (exported with it)."""
    raise NotImplementedError

  def build(self, student: ModelConfig, teacher: ModelConfig | None, optimizer, schedule, mesh,
            rules) -> None:
    """Makes the data and compiles the steps."""
    raise NotImplementedError

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows [M, B / P, ...] of training batch ``step``."""
    link = self.run.link
    return self.train.batch(step, link.microbatches, link.batch_size, jax.process_index(),
                            jax.process_count())

  def step(self, state, teacher_params, batch):
    return self.train_step(state, teacher_params, batch)

  def evaluate(self, params, teacher_params, mesh) -> dict[str, float]:
    raise NotImplementedError

  def summarize(self, sums: dict[str, float]) -> dict[str, float]:
    """Means of a window of summed step metrics (``loss`` and the strategy's own)."""
    raise NotImplementedError

  def final(self, s_config: ModelConfig, params) -> dict[str, float]:
    """Extra evaluations of the finished student (host params)."""
    return {}

  def meta(self) -> dict[str, Any]:
    """Extra fields of the finished link's manifest entry."""
    return {}


def optimizer_for(link, total_steps: int):
  """(optimizer, schedule) of ``link.optimizer``, passed by name; the same objects for the same
  settings within a process, so compiled steps keyed on them are reused when a link resumes."""
  return _optimizer(tuple((k, link.optimizer[k]) for k in OPT_FIELDS if k in link.optimizer),
                    total_steps)


@functools.lru_cache(maxsize=8)
def _optimizer(settings: tuple, total_steps: int):
  return make_optimizer(total_steps=total_steps, **dict(settings))


def compute_config(config: ModelConfig, link, teacher: bool = False) -> ModelConfig:
  """The model's config with the link's compute dtype (and remat for the student)."""
  dtype = (link.get("teacher_dtype") if teacher else None) or link.dtype
  return config.replace(dtype=dtype, remat=bool(link.get("remat")) and not teacher)


@dataclasses.dataclass
class _Loop:
  """What the step loop runs with."""

  strategy: LinkStrategy
  teacher_params: Any
  mesh: Any
  manager: Any
  reporter: metrics.Reporter


class NonFiniteError(ValueError):
  """A training step produced a non-finite loss, gradient or parameter."""


def check_step_finite(name: str, step: int, m: dict[str, Any], last_checkpoint) -> None:
  """Stops the link, in one line, when a step's loss, gradient or new params are not finite."""
  bad = [k for k in ("loss", "grad_norm", "param_norm") if k in m and not np.isfinite(m[k])]
  if bad:
    kept = f"step {last_checkpoint}" if last_checkpoint is not None else "none yet"
    raise NonFiniteError(
        f"link {name}: non-finite {'/'.join(bad)} at step {step}; likely causes: a learning rate "
        "too high (optimizer.lr), a damaged teacher, checkpoint or token cache, token ids outside "
        f"the model's vocabulary; last finite checkpoint kept: {kept}; nothing was exported")


def _pull(loop: _Loop, pending) -> None:
  """Reports one step's metrics (host copy) and stops the link if they are not finite."""
  step, m = pending[0], jax.device_get(pending[1])
  loop.reporter.add(step, m)
  check_step_finite(loop.reporter.name, step, m, loop.manager.latest_step())


def _save(loop: _Loop, state) -> None:
  """A checkpoint of ``state`` and the metrics window open at its step."""
  orbax_io.save_state(loop.manager, state, force=True)
  loop.reporter.save_window(int(jax.device_get(state.step)))


def _run_steps(state, stop: int, loop: _Loop, config):
  """Optimizer steps from ``state.step`` to ``stop``: checkpoints, evals and metrics on the way.

  Metrics are pulled one step late, except before a checkpoint or an evaluation: a state is only
  saved once its step's loss, gradient and parameters are known to be finite. A SIGTERM / SIGINT
  (`guards.StopSignals`) stops the loop after the current step with a checkpoint there.
  """
  strategy, reporter, pending = loop.strategy, loop.reporter, None
  with guards.StopSignals() as signals:
    for step in range(int(jax.device_get(state.step)), stop):
      state, m = strategy.step(state, loop.teacher_params,
                               global_batch(loop.mesh, strategy.batch(step), 1))
      if pending is not None:  # Pulled one step late, so the device never waits for the host.
        _pull(loop, pending)
      pending = (step + 1, m)
      reporter.bar.update(1)
      signum = signals.requested(step + 1)
      save = (step + 1) % config.checkpoint.every == 0 or signum is not None
      evaluate = (config.eval.every and (step + 1) % config.eval.every == 0
                  and step + 1 < reporter.steps and signum is None)
      if save or evaluate:
        _pull(loop, pending)
        pending = None
      if evaluate:  # Before the save: a resume from this checkpoint never lacks this row.
        evals = strategy.evaluate(state.params, loop.teacher_params, loop.mesh)
        reporter.evaluated(step + 1, evals)
      if save:
        _save(loop, state)
      if signum is not None:
        loop.manager.wait_until_finished()
        raise guards.Stopped(
            f"stopped: link {reporter.name} stopped by {signal.Signals(signum).name} at step "
            f"{step + 1} of {reporter.steps}; checkpoint saved; run the same command again to "
            "resume", signum)
  if pending is not None:
    _pull(loop, pending)
  _save(loop, state)
  loop.manager.wait_until_finished()
  return state


def _initial_state(student: ModelConfig, optimizer, sh, manager, start_params):
  """The latest checkpoint of the link, else a fresh state from ``start_params()``."""
  shapes = jax.eval_shape(lambda p: init_train_state(p, optimizer), abstract_params(student))
  state = orbax_io.restore_latest(manager, orbax_io.abstract_with_shardings(shapes, sh))
  if state is None:
    placed = place_params(start_params(), sh.params, jnp.float32)
    state = jax.jit(lambda p: init_train_state(p, optimizer), out_shardings=sh)(placed)
  return state


def _student(strategy: LinkStrategy, entry: dict[str, Any], on_start):
  """(config, host params or None, entry): a resumed link keeps its recorded shape."""
  if entry.get("config") is not None and strategy.run.ckpt_dir.exists():
    s_config, fresh = ModelConfig.from_dict(entry["config"]), None
  else:
    s_config, fresh = strategy.new_student()
  return s_config, fresh, on_start(s_config)


def _setup(strategy: LinkStrategy, s_config: ModelConfig, fresh):
  """(student, steps, mesh, optimizer, state, placed teacher params, manager) of a link."""
  run, link = strategy.run, strategy.run.link
  student, steps = compute_config(s_config, link), link_steps(link)
  mesh = make_mesh(dict(run.config.mesh))
  check_batch(link.batch_size, mesh, f"link {link.name}")
  rules = parse_rules(run.config.get("sharding_rules"))
  optimizer, schedule = optimizer_for(link, steps)
  teacher = compute_config(run.t_config, link, teacher=True) if run.t_config else None
  strategy.build(student, teacher, optimizer, schedule, mesh, rules)
  manager = orbax_io.make_checkpoint_manager(run.ckpt_dir, run.config.checkpoint.every,
                                             run.config.checkpoint.keep)
  state = _initial_state(student, optimizer, state_shardings(student, optimizer, mesh, rules),
                         manager,
                         lambda: fresh if fresh is not None else strategy.new_student()[1])
  teacher_params = None
  if strategy.uses_teacher and run.t_params is not None:
    teacher_params = place_params(run.t_params, tree_shardings(run.t_params, mesh, rules),
                                  jnp.dtype(teacher.dtype))
  return steps, mesh, state, teacher_params, manager


def _finish(strategy: LinkStrategy, s_config, state, loop: _Loop, steps: int,
            entry) -> dict[str, Any]:
  """Final evaluation, export of the student, the finished entry."""
  run, lead = strategy.run, jax.process_index() == 0
  evals = strategy.evaluate(state.params, loop.teacher_params, loop.mesh)
  params = host_params(state.params)
  evals.update(strategy.final(s_config, params))
  loop.reporter.evaluated(steps, evals)
  loop.reporter.close()
  log.info("link %s done: %s", run.link.name,
           ", ".join(f"{k} {v:.4f}" for k, v in evals.items()))
  if lead:
    hf_io.save_hf(s_config, params, run.out, tokenizer=strategy.tokenizer(),
                  dtype=run.config.get("export_dtype") or None, overwrite=True)
  sync(f"export-{run.link.name}")
  loop.manager.close()
  return dict(entry, status="done", tokens=steps * run.tokens_per_step, steps=steps, eval=evals,
              **strategy.meta())


def train_link(strategy: LinkStrategy, entry: dict[str, Any], on_start) -> dict[str, Any]:
  """Trains ``strategy.run``'s link to completion (resuming if it can); returns its entry.

  ``on_start(config)`` is called once the student's shape is known and returns the entry to
  update (the chain records the running link there).
  """
  run = strategy.run
  s_config, fresh, entry = _student(strategy, entry, on_start)
  steps, mesh, state, teacher_params, manager = _setup(strategy, s_config, fresh)
  if not strategy.keeps_host_teacher:
    run.t_params = None  # The host copy is no longer needed.
  start = int(jax.device_get(state.step))
  reporter = metrics.Reporter(run, strategy, steps, start, jax.process_index() == 0)
  log.info("link %s (%s): %s (%s params) <- %s, steps %d..%d of %d tokens each", run.link.name,
           strategy.name, s_config.family, f"{num_params(s_config):,}",
           run.teacher_path or "data",
           start, steps, run.tokens_per_step)
  stop_after = int(run.config.get("stop_after") or 0)
  stop = steps if not stop_after else min(steps, start + stop_after)
  loop = _Loop(strategy, teacher_params, mesh, manager, reporter)
  try:
    state = _run_steps(state, stop, loop, run.config)
  except (NonFiniteError, guards.Stopped) as e:  # Checkpoints stay; nothing is exported.
    reporter.close()
    manager.wait_until_finished()
    manager.close()
    if isinstance(e, guards.Stopped):
      stopped = int(manager.latest_step() or 0)
      e.entry = dict(entry, tokens=stopped * run.tokens_per_step, steps=stopped)
    raise
  if stop < steps:  # This run's step budget (stop_after) is spent: the link stays "running".
    log.info("link %s: stopping at step %d of %d (stop_after); run again to resume",
             run.link.name, stop, steps)
    reporter.close()
    manager.close()
    return dict(entry, tokens=stop * run.tokens_per_step, steps=stop)
  return _finish(strategy, s_config, state, loop, steps, entry)


def held_out_sums(eval_step, batches, mesh, *args) -> dict[str, float]:
  """The token sums of ``eval_step(*args, batch)`` over held-out batches, added up on the host
  (each batch padded with masked rows to the mesh's batch shards: `pad_rows`)."""
  sums: dict[str, float] = defaultdict(float)
  for b in batches:
    batch = global_batch(mesh, pad_rows(mesh, b), 0)
    for key, value in jax.device_get(eval_step(*args, batch)).items():
      sums[key] += float(value)
  return dict(sums)


def evaluate_lm(eval_step, params, batches, mesh) -> dict[str, float]:
  """{"ce", "ppl"} of an LM eval step (`lm_step.make_lm_eval_step`) over held-out batches,
  token-weighted."""
  ce = metrics.token_means(held_out_sums(eval_step, batches, mesh, params))["ce"]
  return {"ce": ce, "ppl": metrics.perplexity(ce)}


def summarize_lm(sums) -> dict[str, float]:
  """The mean cross entropy of summed LM-step metrics, as the loss."""
  ce = sums["ce_sum"] / max(sums["count"], 1.0)
  return {"loss": ce, "ce": ce}
