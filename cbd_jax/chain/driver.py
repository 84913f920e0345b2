"""The chain driver: distil anchor after anchor, each from its predecessor, resumably.

Link k's teacher is anchor k-1 (the source for k = 0). Its student starts from the link's public
checkpoint (``link.init``) or from Shrink of the teacher to ``link.shape``. A link is a strategy
(`KDLink` here, the bridged ones in `chain.bridge_link`) run by the one link driver
(`chain.link`): the sharded step, Orbax checkpoints every ``checkpoint.every`` steps
and at the end, evaluation and metrics. The finished anchor is exported as a Hugging Face folder
with its tokenizer under ``<workdir>/anchors/<name>`` and recorded in ``<workdir>/chain.json``.
Running the same command again skips finished links and resumes the running one at its last
checkpoint.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cbd_jax import data
from cbd_jax.chain import bridge_link, checks, guards, metrics, source
from cbd_jax.chain.checks import link_steps
from cbd_jax.chain.link import LinkRun, LinkStrategy, held_out_sums, train_link
from cbd_jax.checkpoints import hf_io, manifest
from cbd_jax.distill import hidden_bridge, teacher_cache
from cbd_jax.distill.train_step import LossSettings, make_eval_step, make_train_step, place_params
from cbd_jax.interpolation import prune
from cbd_jax.model.config import ModelConfig, export_refusal
from cbd_jax.model.decoder import init_params
from cbd_jax.model.sharding import make_mesh, sync, tree_shardings

log = logging.getLogger(__name__)
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                "intermediate_size")


@functools.lru_cache(maxsize=8)
def _make_steps(student, teacher, loss, mesh, rules, optimizer, schedule):
  """(train_step, eval_step), built once per link setting and process, so a resumed link in the
  same process reuses the compiled steps."""
  train_step = make_train_step(student, teacher, optimizer, loss, mesh, rules, schedule)
  return train_step, make_eval_step(student, teacher, loss, mesh, rules)


def check_config(config) -> None:
  """Refuses, with one line naming the field and the fix, a config the driver cannot run."""
  names = [link.name for link in config.chain]
  if not names:
    raise ValueError("config.chain is empty; give at least one link")
  if len(set(names)) != len(names):
    raise ValueError(f"link names {names} repeat; give every link its own name")
  checks.check_run(config)
  for i, link in enumerate(config.chain):
    where = f"config.chain[{i}] ({link.name})"
    if is_bridged(link):
      bridge_link.check_link(link, where)
    elif not link.get("init") and not any(dict(link.shape).values()):
      raise ValueError(f"{where}: give a public checkpoint (init) or a shape for Shrink")
    elif not link.get("init"):
      prune.check_link(link, where)
    checks.check_link(link, where)
    _check_hidden(link.loss, where)
    teacher_cache.check(link, where)


def preflight(config, source_path: str, tokenizer_path: str) -> None:
  """Checks every link against its teacher's and student's configs before any link trains:
  shapes, the tokenizer's size against the vocabulary, ``seq_len`` against learned positions,
  and batch divisibility over the mesh. Stops at the first bridged link (its student's
  tokenizer is another one; its own checks run when it starts)."""
  mesh = make_mesh(dict(config.mesh))
  teacher = hf_io.load_model_config(source_path)
  tokens = len(hf_io.load_tokenizer(tokenizer_path))
  for i, link in enumerate(config.chain):
    where = f"config.chain[{i}] ({link.name})"
    checks.check_batch(link.batch_size, mesh, where)
    if is_bridged(link):
      return
    student = (hf_io.load_model_config(link.init) if link.get("init") and os.path.isdir(link.init)
               else None if link.get("init") else student_config(link, teacher))
    for role, model_config in (("teacher", teacher), ("student", student)):
      if model_config is not None:
        _check_model(model_config, tokens, link.seq_len, f"{where}: the {role}")
    refusal = student is not None and export_refusal(student)
    if refusal:
      raise ValueError(f"{where}: the student's {refusal} (its anchor could not be loaded); "
                       "pick a hidden_size that num_heads divides")
    teacher = student or teacher


def _check_model(model_config: ModelConfig, tokens: int, seq_len: int, where: str) -> None:
  """The tokenizer's ids must have embedding rows; learned positions must cover ``seq_len``."""
  if tokens > model_config.vocab_size:
    raise ValueError(f"{where} has {model_config.vocab_size} embedding rows but the tokenizer "
                     f"{tokens} tokens (ids >= {model_config.vocab_size} would be out of range); "
                     "use the model's own tokenizer (source.tokenizer)")
  if model_config.family == "gpt2" and seq_len > model_config.max_position_embeddings:
    raise ValueError(f"{where} has {model_config.max_position_embeddings} positions, fewer than "
                     f"seq_len={seq_len}; lower seq_len")


def _check_hidden(loss, where: str) -> None:
  """Hidden-state distillation settings (``loss.hidden_*``, ``loss.projector``) are known ones."""
  if not loss.get("hidden_weight"):
    return
  allowed = {"hidden_kind": hidden_bridge.HIDDEN_LOSSES,
             "hidden_layers": ("uniform", "last"), "projector": ("identity", "orthogonal")}
  for key, values in allowed.items():
    if loss.get(key) is not None and loss[key] not in values:
      raise ValueError(f"{where}: loss.{key}={loss[key]!r}; use one of {values}")


def is_bridged(link) -> bool:
  """A link whose student has another tokenizer (and family) than its teacher."""
  return link.get("bridge", "none") not in ("none", "", None)


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


def evaluate_kd(eval_step, params, teacher_params, batches, mesh) -> dict[str, float]:
  """Held-out token means of a KD eval step (kl, kd, ce, teacher_ce) and both perplexities."""
  out = metrics.token_means(held_out_sums(eval_step, batches, mesh, params, teacher_params))
  out["ppl"] = metrics.perplexity(out["ce"])
  out["teacher_ppl"] = metrics.perplexity(out["teacher_ce"])
  return out


def _start_student(link, teacher: ModelConfig, teacher_params, calibration_rows
                   ) -> tuple[ModelConfig, Any]:
  """(config, host params) of a new student: its public checkpoint, or Shrink of the teacher
  (`prune.shrink`, by ``link.shrink`` and ``link.shrink_layers``, calibrated on
  ``calibration_rows()``: rows of the link's own training text)."""
  if link.get("init"):
    config, params = hf_io.load_hf_numpy(link.init)
    if config.vocab_limit != teacher.vocab_limit:
      raise ValueError(f"link {link.name}: {link.init} has a vocabulary of {config.vocab_limit}, "
                       f"its teacher {teacher.vocab_limit}; such a link needs a vocabulary bridge")
    return config, params
  target = student_config(link, teacher)
  method = link.get("shrink") or "activation"
  layers = link.get("shrink_layers") or "greedy"
  if method == "random":  # A control: the same link from random weights.
    log.info("link %s: random init of %s", link.name, {k: getattr(target, k) for k in SHAPE_FIELDS})
    return target, jax.tree.map(np.asarray, init_params(target, jax.random.key(0)))
  log.info("link %s: Shrink of the teacher to %s (%s units, %s layers)", link.name,
           {k: getattr(target, k) for k in SHAPE_FIELDS}, method, layers)
  rows = calibration_rows() if method == "activation" or layers == "greedy" else None
  params, _ = prune.shrink(teacher, teacher_params, target, method, rows, layers,
                           rescale=bool(link.get("shrink_rescale", True)),
                           refit=bool(link.get("shrink_refit", False)),
                           log=lambda line: log.info("link %s: %s", link.name, line))
  return target, jax.tree.map(np.asarray, params)


class KDLink(LinkStrategy):
  """Token-level KD from a teacher of the same tokenizer, with an optional CE mix."""

  name = "kd"

  def new_student(self):
    run = self.run
    return _start_student(run.link, run.t_config, run.t_params, self.calibration_rows)

  def calibration_rows(self) -> np.ndarray:
    """The first ``link.calib_tokens`` tokens of the link's training order, as rows [N, T + 1],
    the same on every process."""
    run = self.run
    if not hasattr(self, "train"):
      self.make_data()
    tokens = int(run.link.get("calib_tokens") or 2048)
    return data.calibration_rows(self.train, run.link, tokens, jax.process_index(),
                                 jax.process_count())

  @functools.cached_property
  def _tokenizer(self):
    return hf_io.load_tokenizer(self.run.tokenizer_path)

  def tokenizer(self):
    return self._tokenizer

  def build(self, student, teacher, optimizer, schedule, mesh, rules):
    self.loss = LossSettings(**dict(self.run.link.loss))
    self.train_step, self.eval_step = _make_steps(student, teacher, self.loss, mesh, rules,
                                                  optimizer, schedule)
    if not hasattr(self, "train"):  # Made already when the student was cut from the teacher.
      self.make_data()

  def make_data(self) -> None:
    """Packed training sequences and held-out batches through the student's tokenizer."""
    run, pi, pc = self.run, jax.process_index(), jax.process_count()
    cache = Path(run.config.data.get("cache_dir") or run.workdir / "data_cache")
    self.train = data.make_train_data(run.config.data, self.tokenizer(), run.link.seq_len, cache,
                                      pi, pc)
    self.evals = data.make_eval_batches(run.config.data, self.tokenizer(), run.link.seq_len,
                                        run.config.eval.batch_size, run.config.eval.num_batches,
                                        cache, pi, pc)

  def evaluate(self, params, teacher_params, mesh):
    return evaluate_kd(self.eval_step, params, teacher_params, self.evals, mesh)

  def summarize(self, sums):
    count, loss = max(sums["count"], 1.0), self.loss
    out = {"kd": sums["kd_sum"] / count, "ce": sums["ce_sum"] / count}
    out["loss"] = loss.kd_weight * out["kd"] + loss.ce_weight * out["ce"]
    if "hidden_sum" in sums:
      out["hidden"] = sums["hidden_sum"] / count
      out["loss"] += loss.hidden_weight * out["hidden"]
    return out


class CachedKDLink(KDLink):
  """KD from the link's teacher cache (`distill.teacher_cache`): the teacher runs once over the
  budget; the training steps read its top-k log-probabilities from disk."""

  name = "kd-cached"

  def build(self, student, teacher, optimizer, schedule, mesh, rules):
    super().build(student, teacher, optimizer, schedule, mesh, rules)  # Data; eval step.
    run, spec = self.run, teacher_cache.settings(self.run.link)
    self.folder = Path(os.path.expanduser(spec["dir"]) if spec["dir"]
                       else run.workdir / "teacher_cache" / run.link.name)
    link = run.link
    teacher_cache.check_index(self.folder, teacher_cache.cache_key(
        link, run.config.data, run.teacher_path, data.tokenizer_fingerprint(self.tokenizer())))
    self.train_step = teacher_cache.make_cached_step(student, optimizer, self.loss, mesh, rules,
                                                     schedule)
    topk = teacher_cache.make_topk(teacher, spec["k"], float(link.loss.temperature),
                                   int(link.loss.chunk_size), mesh, rules)
    self.computed = teacher_cache.fill(
        self.folder, link_steps(link), self.train_batch, topk, lambda: place_params(
            run.t_params, tree_shardings(run.t_params, mesh, rules), jnp.dtype(teacher.dtype)),
        mesh, spec["dtype"])
    sync(f"teacher-cache-{link.name}")

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    return super().batch(step)

  def batch(self, step):
    return dict(self.train_batch(step), **teacher_cache.read_step(self.folder, step))

  def step(self, state, teacher_params, batch):
    return self.train_step(state, None, batch)

  def meta(self):
    spec = teacher_cache.settings(self.run.link)
    return {"teacher_cache": {"dir": str(self.folder), "k": spec["k"],
                              "steps_computed_now": self.computed}}


def make_strategy(config, index: int, workdir: Path, entry: dict[str, Any], teacher_path: str,
                  tokenizer_path: str) -> LinkStrategy:
  """The strategy of link ``index``: plain KD (from its teacher cache when it has one), or its
  bridge's."""
  link = config.chain[index]
  t_config, t_params = hf_io.load_hf_numpy(teacher_path)
  run = LinkRun(config, link, workdir, workdir / entry["path"], teacher_path, tokenizer_path,
                t_config, t_params)
  if is_bridged(link):
    return bridge_link.make_strategy(run)
  return CachedKDLink(run) if teacher_cache.settings(link) else KDLink(run)


def run_chain(config) -> dict[str, Any]:
  """Builds (or resumes) every anchor of ``config.chain``; returns the final manifest.

  Everything is checked before any link trains (`check_config`, `preflight`, the links' config
  fingerprints); one run at a time holds the workdir (`guards.WorkdirLock`).
  """
  check_config(config)
  config = checks.resolve_batches(config, jax.device_count())
  workdir = Path(os.path.expanduser(str(config.workdir)))
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"config.workdir={workdir} is a file; give a folder")
  source_path, tokenizer_path = source.prepare_source(config)
  preflight(config, source_path, tokenizer_path)
  with guards.WorkdirLock(workdir):
    doc = manifest.load_or_create(workdir, config, source_path)
    for index, link in enumerate(config.chain):
      doc["anchors"][index] = guards.check_fingerprint(
          doc["anchors"][index], guards.fingerprint(link, config), f"link {link.name}",
          bool(config.get("allow_changes")))
    manifest.save(workdir, doc)
    return _run_links(config, workdir, doc, source_path, tokenizer_path)


def _run_links(config, workdir: Path, doc: dict[str, Any], source_path: str,
               tokenizer_path: str) -> dict[str, Any]:
  """Trains the links that are not done, in order; each link's teacher is the anchor before."""
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

      strategy = make_strategy(config, index, workdir, entry, teacher_path, tokenizer_path)
      try:
        done = train_link(strategy, entry, on_start)
      except guards.Stopped as stop:  # The manifest records the step the link stopped at.
        doc["anchors"][index] = stop.entry
        manifest.save(workdir, doc)
        raise
      doc["anchors"][index] = done
      manifest.save(workdir, doc)
      if done["status"] != "done":
        return doc
    teacher_path = tokenizer_path = str(workdir / doc["anchors"][index]["path"])
  return doc
