"""A bridged link: a student of another family and tokenizer than its teacher.

``link.bridge`` picks how the teacher's knowledge crosses the vocabulary gap:

* ``"vocab"``: token-level KD through the vocabulary-projection bridge (`cbd_jax.bridge_step`),
  on training windows tokenised by both sides and aligned by byte offsets (`cbd_jax.bridge_data`).
* ``"seqkd"``: sequence-level KD (the paper's bridge): the teacher writes a corpus from prompts of
  the training text (`cbd_jax.seqkd`, cached in ``<workdir>/seqkd/<link>``) and the student
  trains on it with plain cross-entropy (`cbd_jax.lm_step`); no teacher during training.

The student starts from ``link.init`` (a checkpoint with the student's tokenizer) or random
weights of shape ``link.student`` (Shrink cannot cross families). Checkpoints, metrics, resume
and export follow the plain chain driver: the finished anchor is an HF folder with the *student's*
tokenizer, so the next link of the chain distils from it like any other anchor.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc

from cbd_jax import (
  bridge_data,
  bridge_step,
  checkpoint,
  data,
  heldout,
  hf_io,
  lm_step,
  metrics,
  seqkd,
  source,
  vocab_bridge,
)
from cbd_jax.config import ModelConfig, num_params
from cbd_jax.sharding import make_mesh, parse_rules, tree_shardings
from cbd_jax.train_step import (
  LossSettings,
  abstract_params,
  init_train_state,
  make_optimizer,
  place_params,
  state_shardings,
)

log = logging.getLogger(__name__)
BRIDGES = ("vocab", "seqkd")
OPT_FIELDS = ("lr", "warmup_steps", "schedule", "min_lr_ratio", "weight_decay", "b1", "b2", "eps",
              "grad_clip")
STUDENT_FIELDS = ("family", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                  "intermediate_size", "max_position_embeddings", "tie_embeddings", "norm_eps",
                  "rope_theta")


def check_link(link, where: str) -> None:
  """Refuses a bridged link the driver cannot run, naming the field."""
  if link.bridge not in BRIDGES:
    raise ValueError(f"{where}: unknown bridge {link.bridge!r}; use 'none' or one of {BRIDGES}")
  if not link.get("tokenizer"):
    raise ValueError(f"{where}: a bridged link needs the student's tokenizer (link.tokenizer: a "
                     "folder, or 'vocab.json,merges.txt')")
  if not link.get("init"):
    spec = dict(link.get("student") or {})
    unknown = set(spec) - set(STUDENT_FIELDS) - {"vocab_multiple", "seed"}
    if unknown or not spec.get("family"):
      raise ValueError(f"{where}: link.student needs a family and fields of {STUDENT_FIELDS}"
                       f"{f'; unknown {sorted(unknown)}' if unknown else ''}")


def student_from_spec(link, tokenizer) -> tuple[ModelConfig, dict]:
  """(config, host params) of a new student: ``link.init`` or random weights of ``link.student``."""
  if link.get("init"):
    config, params = hf_io.load_hf_numpy(link.init)
    if config.vocab_limit < len(tokenizer):
      raise ValueError(f"link {link.name}: {link.init} has {config.vocab_limit} tokens, the "
                       f"student tokenizer {len(tokenizer)}; give the checkpoint's own tokenizer")
    return config, params
  spec = dict(link.student)
  multiple = int(spec.pop("vocab_multiple", 64))
  seed = int(spec.pop("seed", 0))
  real = len(tokenizer)
  eos = tokenizer.eos_token_id
  config = ModelConfig(vocab_size=-(-real // multiple) * multiple, real_vocab_size=real,
                       eos_token_id=eos, bos_token_id=tokenizer.bos_token_id, **spec)
  log.info("link %s: random %s student (%s params)", link.name, config.family,
           f"{num_params(config):,}")
  return config, source.init_host_params(config, seed)


def _heldout_quality(config, params, tokenizer, data_cfg, eval_tokens: int, seq_len: int):
  """Held-out loss, ppl and bits per byte of a model with its own tokenizer (no teacher)."""
  text = heldout.load_heldout(tokenizer, data_cfg.heldout, eval_tokens, seq_len)
  return heldout.evaluate(config, params, text)


class _Seqkd:
  """seqkd plumbing: corpus, packed CE batches, the LM step."""

  def __init__(self, config, link, workdir, teacher, t_params, t_tok, s_tok, student, mesh,
               rules, optimizer, schedule, teacher_name):
    settings = seqkd.SeqKDSettings(**dict(link.seqkd))
    out = workdir / "seqkd" / link.name
    if jax.process_index() == 0:
      paragraphs = bridge_data.read_paragraphs(config.data.train, config.data.text_field)
      self.meta = seqkd.build_corpus(teacher, t_params, t_tok, paragraphs, out, settings,
                                     teacher_name)
    _sync(f"seqkd-{link.name}")
    self.meta = seqkd.load_meta(out)
    corpus_cfg = mlc.ConfigDict(dict(train=str(seqkd.corpus_path(out)), text_field="text",
                                     seed=int(config.data.seed), streaming=False,
                                     heldout=str(config.data.heldout)))
    cache = Path(config.data.get("cache_dir") or workdir / "data_cache")
    pi, pc = jax.process_index(), jax.process_count()
    self.train = data.make_train_data(corpus_cfg, s_tok, link.seq_len, cache, pi, pc)
    self.evals = data.make_eval_batches(corpus_cfg, s_tok, link.seq_len, config.eval.batch_size,
                                        config.eval.num_batches, cache, pi, pc)
    chunk = int(link.loss.chunk_size)
    self.step_fn = lm_step.make_lm_step(student, optimizer, mesh, rules, schedule, chunk)
    self.eval_fn = lm_step.make_lm_eval_step(student, mesh, rules, chunk)
    self.leading = 1

  def step(self, state, batch):
    return self.step_fn(state, batch)

  def evaluate(self, params, mesh) -> dict[str, float]:
    avg = metrics.TokenAverager()
    for b in self.evals:
      avg.add(jax.device_get(self.eval_fn(params, _global(mesh, b, 0))))
    out = avg.means()
    return {"ce": out["ce"], "ppl": metrics.perplexity(out["ce"])}


class _Vocab:
  """vocab-bridge plumbing: aligned windows, the token map, the bridged step."""

  def __init__(self, config, link, teacher, teacher_params, t_tok, s_tok, student, mesh, rules,
               optimizer, schedule):
    from cbd_jax.chain import link_steps

    teacher_len = int(link.get("teacher_len") or link.seq_len + link.seq_len // 2)
    seed = int(config.data.seed)
    self.train = bridge_data.load_aligned_windows(
        config.data.train, t_tok, s_tok, link.seq_len, teacher_len, seed, config.data.text_field,
        max_windows=int(link.get("max_windows") or 0))
    held = bridge_data.load_aligned_windows(
        config.data.heldout, t_tok, s_tok, link.seq_len, teacher_len, 0, config.data.text_field,
        max_windows=config.eval.batch_size * config.eval.num_batches)
    self.evals = [bridge_step.as_device_batch(b) for b in
                  held.in_order(config.eval.batch_size, config.eval.num_batches)]
    self.token_map = vocab_bridge.build_token_map(t_tok, s_tok)
    log.info("link %s: token map %s", link.name, self.token_map.coverage())
    loss = LossSettings(**dict(link.loss))
    self.step_fn = bridge_step.make_bridge_step(student, teacher, optimizer, loss,
                                                self.token_map, mesh, rules, schedule)
    self.eval_fn = bridge_step.make_bridge_eval_step(student, teacher, loss, self.token_map,
                                                     mesh, rules)
    self.teacher_params = teacher_params
    # The teacher reads teacher_len tokens of every training window (padding included).
    windows = link_steps(link) * link.batch_size * link.microbatches
    self.meta = {"token_map": self.token_map.coverage(), "teacher_tokens": windows * teacher_len,
                 "teacher_flops": 2 * num_params(teacher) * windows * teacher_len}

  def step(self, state, batch):
    return self.step_fn(state, self.teacher_params, batch)

  def evaluate(self, params, mesh) -> dict[str, float]:
    sums: dict[str, float] = {"kd_sum": 0.0, "pairs": 0.0, "ce_sum": 0.0, "count": 0.0}
    for b in self.evals:
      m = jax.device_get(self.eval_fn(params, self.teacher_params, _global(mesh, b, 0)))
      for k in sums:
        sums[k] += float(m[k])
    ce = sums["ce_sum"] / max(sums["count"], 1.0)
    return {"kl": sums["kd_sum"] / max(sums["pairs"], 1.0), "ce": ce,
            "ppl": metrics.perplexity(ce)}


def _global(mesh, local, leading):
  from cbd_jax.chain import global_batch

  if "pair_mask" in local:
    local = bridge_step.as_device_batch(local)
  return global_batch(mesh, local, leading)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def train_bridge_link(config, index: int, teacher_path: str, tokenizer_path: str,
                      entry: dict[str, Any], workdir: Path, on_start) -> dict[str, Any]:
  """Trains bridged link ``index`` to completion (resuming if it can); returns its entry."""
  from cbd_jax.chain import host_params, link_steps

  link = config.chain[index]
  lead = jax.process_index() == 0
  t_config, t_params = hf_io.load_hf_numpy(teacher_path)
  t_tok = hf_io.load_tokenizer(tokenizer_path)
  s_tok = bridge_data.load_student_tokenizer(link.tokenizer)
  ckpt_dir = workdir / "checkpoints" / link.name
  s_params = None
  if entry.get("config") is not None and ckpt_dir.exists():
    s_config = ModelConfig.from_dict(entry["config"])
  else:
    s_config, s_params = student_from_spec(link, s_tok)
  entry = on_start(s_config)
  student = s_config.replace(dtype=link.dtype, remat=bool(link.get("remat")))
  teacher = t_config.replace(dtype=link.get("teacher_dtype") or link.dtype)
  steps = link_steps(link)
  mesh = make_mesh(dict(config.mesh))
  rules = parse_rules(config.get("sharding_rules"))
  optimizer, schedule = make_optimizer(*(link.optimizer[k] for k in OPT_FIELDS[:1]), steps,
                                       *(link.optimizer[k] for k in OPT_FIELDS[1:]))
  sh = state_shardings(student, optimizer, mesh, rules)
  manager = checkpoint.make_checkpoint_manager(ckpt_dir, config.checkpoint.every,
                                               config.checkpoint.keep)
  shapes = jax.eval_shape(lambda p: init_train_state(p, optimizer), abstract_params(student))
  state = checkpoint.restore_latest(manager, checkpoint.abstract_with_shardings(shapes, sh))
  if state is None:
    if s_params is None:
      s_config, s_params = student_from_spec(link, s_tok)
    placed = place_params(s_params, sh.params, jnp.float32)
    state = jax.jit(lambda p: init_train_state(p, optimizer), out_shardings=sh)(placed)
  del s_params
  teacher_params = place_params(t_params, tree_shardings(t_params, mesh, rules),
                                jnp.dtype(teacher.dtype))
  if link.bridge == "seqkd":
    plan = _Seqkd(config, link, workdir, teacher, t_params, t_tok, s_tok, student, mesh, rules,
                  optimizer, schedule, teacher_path)
  else:
    plan = _Vocab(config, link, teacher, teacher_params, t_tok, s_tok, student, mesh, rules,
                  optimizer, schedule)
  writer = metrics.MetricsWriter(workdir / "metrics" / f"{link.name}.jsonl", None, enabled=lead)
  tokens_per_step = link.batch_size * link.microbatches * link.seq_len
  start = int(jax.device_get(state.step))
  log.info("link %s (%s bridge): %s student (%s params) <- %s, steps %d..%d", link.name,
           link.bridge, s_config.family, f"{num_params(s_config):,}", teacher_path, start, steps)
  pi, pc = jax.process_index(), jax.process_count()
  stop = steps if not config.get("stop_after") else min(steps, start + config.stop_after)
  t0 = time.time()
  for step in range(start, stop):
    local = plan.train.batch(step, link.microbatches, link.batch_size, pi, pc)
    state, m = plan.step(state, _global(mesh, local, 1))
    if (step + 1) % config.log.every == 0 or step + 1 == stop:
      m = jax.device_get(m)
      row = {"loss": float(m["loss"]), "ce": float(m["ce_sum"]) / max(float(m["count"]), 1.0),
             "tokens_per_s": (step + 1 - start) * tokens_per_step / (time.time() - t0)}
      if "pairs" in m:
        row["kd"] = float(m["kd_sum"]) / max(float(m["pairs"]), 1.0)
      writer.write(step + 1, row, "train/")
      if lead:
        log.info("link %s step %d/%d %s", link.name, step + 1, steps,
                 " ".join(f"{k} {v:.4f}" for k, v in row.items()))
    if (step + 1) % config.checkpoint.every == 0:
      checkpoint.save_state(manager, state, force=True)
  checkpoint.save_state(manager, state, force=True)
  manager.wait_until_finished()
  manager.close()
  if stop < steps:
    writer.close()
    return dict(entry, tokens=stop * tokens_per_step, steps=stop)
  evals = plan.evaluate(state.params, mesh)
  params = host_params(state.params)
  report = config.get("report") or {}
  eval_tokens = int(report.get("eval_tokens", 8192))
  quality = _heldout_quality(s_config, params, s_tok, config.data, eval_tokens, link.seq_len)
  teacher_q = _heldout_quality(t_config, t_params, t_tok, config.data, eval_tokens, link.seq_len)
  evals.update(bpb=quality["bpb"], heldout_ppl=quality["ppl"], teacher_bpb=teacher_q["bpb"],
               teacher_ppl=teacher_q["ppl"])
  writer.write(steps, evals, "eval/")
  writer.close()
  log.info("link %s done: held-out ppl %.2f, %.3f bits/byte (teacher %.3f bits/byte)",
           link.name, quality["ppl"], quality["bpb"], teacher_q["bpb"])
  if lead:
    hf_io.save_hf(s_config, params, workdir / entry["path"], tokenizer=s_tok,
                  dtype=config.get("export_dtype") or None, overwrite=True)
  _sync(f"export-{link.name}")
  meta = {k: v for k, v in plan.meta.items()} if plan.meta else {}
  return dict(entry, status="done", tokens=steps * tokens_per_step, steps=steps, eval=evals,
              bridge=dict(kind=link.bridge, **meta))
