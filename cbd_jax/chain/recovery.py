"""Recovery training: a model (an ``init_model`` target or any checkpoint) trained further.

    loss = ce_weight * CE(y, q) + kd_weight * KD(p_teacher || q)     (token means)

With no teacher (``config.teacher = ""``) this is plain language-model training (the paper's
recovery pre-training); with a teacher of the same tokenizer (typically the nearest larger
anchor) the fused KD step mixes the two. It runs through the chain's link driver
(`cbd_jax.chain.link`): token or step budget, Orbax checkpoints and resume, progress bar,
metrics JSONL, held-out evaluation, and export to ``config.out`` as a `transformers` folder with
the model's tokenizer and ``cbd_recovery.json`` (what it was initialised from, tokens, teacher
FLOPs = 2 * N_teacher * training tokens). ``<workdir>/recovery.json`` records the run's state.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax

from cbd_jax import files
from cbd_jax.chain import checks, guards, source
from cbd_jax.chain.checks import link_steps
from cbd_jax.chain.driver import KDLink
from cbd_jax.chain.link import LinkRun, evaluate_lm, summarize_lm, train_link
from cbd_jax.checkpoints import hf_io, manifest
from cbd_jax.distill import lm_step
from cbd_jax.model.config import ModelConfig, num_params

log = logging.getLogger(__name__)
STATE, SUMMARY = "recovery.json", "cbd_recovery.json"


class RecoveryLink(KDLink):
  """The student is the model folder; the teacher, when named, distils into it (KD + CE)."""

  name = "recovery"

  @property
  def uses_teacher(self) -> bool:
    return self.run.t_config is not None

  def new_student(self):
    run = self.run
    config, params = hf_io.load_hf_numpy(run.link.model)
    if run.t_config is not None and config.vocab_limit != run.t_config.vocab_limit:
      raise ValueError(f"{run.link.model} has a vocabulary of {config.vocab_limit}, the teacher "
                       f"{run.teacher_path} {run.t_config.vocab_limit}; give a teacher with the "
                       "model's tokenizer")
    return config, params

  @functools.cached_property
  def _tokenizer(self):
    return hf_io.load_tokenizer(self.run.link.model)

  def build(self, student, teacher, optimizer, schedule, mesh, rules):
    if self.uses_teacher:
      return super().build(student, teacher, optimizer, schedule, mesh, rules)
    chunk = int(self.run.link.loss.chunk_size)
    self.train_step = lm_step.make_lm_step(student, optimizer, mesh, rules, schedule, chunk)
    self.eval_step = lm_step.make_lm_eval_step(student, mesh, rules, chunk)
    self.make_data()

  def step(self, state, teacher_params, batch):
    if self.uses_teacher:
      return self.train_step(state, teacher_params, batch)
    return self.train_step(state, batch)

  def evaluate(self, params, teacher_params, mesh):
    if self.uses_teacher:
      return super().evaluate(params, teacher_params, mesh)
    return evaluate_lm(self.eval_step, params, self.evals, mesh)

  def summarize(self, sums):
    if self.uses_teacher:
      return super().summarize(sums)
    return summarize_lm(sums)

  def meta(self):
    run = self.run
    tokens = link_steps(run.link) * run.tokens_per_step
    t_params = num_params(run.t_config) if run.t_config is not None else 0
    return {"initialised_from": str(run.link.model), "teacher": run.teacher_path or None,
            "teacher_flops": 2 * t_params * tokens}


def check_config(config) -> None:
  """Refuses, with one line naming the field and the fix, a recovery config that cannot run."""
  if not config.model and not config.get("random_init"):
    raise ValueError("config.model is empty; pass the folder to train, e.g. "
                     "--config.model=runs/smollm2_chain/targets/50m")
  loss = config.loss
  if loss.kd_weight and not config.teacher:
    raise ValueError(f"loss.kd_weight={loss.kd_weight} needs a teacher; pass "
                     "--config.teacher=DIR (e.g. the nearest larger anchor) or set kd_weight=0")
  checks.check_run(config)
  checks.check_link(config, "config")


def _paths(config) -> tuple[Path, Path]:
  """(workdir, export folder); the export may not replace the model or the teacher."""
  workdir = Path(os.path.expanduser(str(config.workdir)))
  out = Path(os.path.expanduser(str(config.out))) if config.out else workdir / "model"
  for role in ("model", "teacher"):
    if config[role] and Path(os.path.expanduser(str(config[role]))).resolve() == out.resolve():
      raise ValueError(f"config.out={out} is the {role} itself; give another output folder")
  return workdir, out


def _prepare_model(config) -> None:
  """Builds the random model of a smoke run (``config.random_init``) when it is missing."""
  path = os.path.expanduser(str(config.model))
  if config.get("random_init") and not os.path.exists(path):
    if jax.process_index() == 0:
      source.build_random_source(config.random_init, path, config.data.train)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("recovery-model")


def _load_state(workdir: Path, out: Path, config) -> dict[str, Any]:
  """The run's recorded state; a foreign non-empty ``out`` is refused, never replaced."""
  path = workdir / STATE
  state = json.loads(path.read_text()) if path.exists() else {}
  if state and state.get("model") != str(config.model):
    raise ValueError(f"{path} records a run on {state.get('model')}, the config names "
                     f"{config.model}; use another workdir")
  ours = state.get("out") == str(out)  # This run's own export (a rerun may replace it).
  if not ours and out.is_dir() and any(out.iterdir()) and not config.get("overwrite"):
    raise FileExistsError(f"{out} exists and is not empty; pass another --config.out or "
                          "--config.overwrite=True")
  return state


def train_target(config) -> dict[str, Any]:
  """Recovery-trains ``config.model`` (resuming if it can); returns the run's state entry."""
  check_config(config)
  config = checks.resolve_batches(config, jax.device_count())
  _prepare_model(config)
  workdir, out = _paths(config)
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"config.workdir={workdir} is a file; give a folder")
  with guards.WorkdirLock(workdir):
    state = _load_state(workdir, out, config)
    if state.get("status") == "done" and out.exists():
      log.info("%s already trained into %s; nothing to do", config.model, out)
      return state
    state = guards.check_fingerprint(state, guards.fingerprint(config, config),
                                     f"the recovery of {config.model}",
                                     bool(config.get("allow_changes")))
    return _train(config, workdir, out, state)


def _record(path: Path, doc: dict[str, Any]) -> None:
  """A JSON record of the run (its state, the export's summary), written by process 0."""
  if jax.process_index() == 0:
    files.write_json(path, doc)


def _train(config, workdir: Path, out: Path, state: dict[str, Any]) -> dict[str, Any]:
  """Runs the recovery link and records its state (and the export's summary when done)."""
  t_config = t_params = None
  if config.teacher:
    t_config, t_params = hf_io.load_hf_numpy(config.teacher)
  run = LinkRun(config, config, workdir, out, str(config.teacher) or None, str(config.model),
                t_config, t_params)

  def on_start(s_config: ModelConfig):
    entry = dict(state, name=config.name, model=str(config.model), out=str(out),
                 status="running", config=manifest.running_entry({}, s_config)["config"],
                 num_params=num_params(s_config))
    _record(workdir / STATE, entry)
    return entry

  try:
    done = train_link(RecoveryLink(run), dict(state, model=str(config.model)), on_start)
  except guards.Stopped as stop:
    _record(workdir / STATE, stop.entry)
    raise
  _record(workdir / STATE, done)
  if done["status"] == "done":
    summary = {k: done[k] for k in ("initialised_from", "teacher", "teacher_flops", "tokens",
                                    "steps", "eval", "num_params")}
    _record(out / SUMMARY, dict(summary, loss=dict(config.loss)))
  return done
