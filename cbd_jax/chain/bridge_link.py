"""A bridged link: a student of another family and tokenizer than its teacher.

``link.bridge`` picks how the teacher's knowledge crosses the vocabulary gap:

* ``"vocab"``: token-level KD through the vocabulary-projection bridge (`distill.bridge_step`),
  on training windows tokenised by both sides and aligned by byte offsets (`distill.bridge_data`).
* ``"seqkd"``: sequence-level KD (the paper's bridge): the teacher writes a corpus from prompts of
  the training text (`distill.seqkd`, cached in ``<workdir>/seqkd/<link>``) and the student
  trains on it with plain cross-entropy (`distill.lm_step`); no teacher during training.

The student starts from ``link.init`` (a checkpoint with the student's tokenizer) or random
weights of shape ``link.student`` (Shrink cannot cross families). Both bridges are link strategies
(`chain.link.LinkStrategy`): checkpoints, metrics, resume and export are the one driver's.
The finished anchor is an HF folder with the *student's* tokenizer, so the next link of the chain
distils from it like any other anchor.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import jax
import ml_collections as mlc
import numpy as np

from cbd_jax import data
from cbd_jax.chain import metrics, source
from cbd_jax.chain.checks import link_steps
from cbd_jax.chain.link import (
  LinkRun,
  LinkStrategy,
  evaluate_lm,
  held_out_sums,
  summarize_lm,
)
from cbd_jax.checkpoints import hf_io
from cbd_jax.distill import bridge_data, bridge_step, lm_step, seqkd, vocab_bridge
from cbd_jax.distill.train_step import LossSettings
from cbd_jax.evaluation import heldout
from cbd_jax.model.config import ModelConfig, num_params
from cbd_jax.model.sharding import sync

log = logging.getLogger(__name__)
BRIDGES = ("vocab", "seqkd")
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


class _Bridged(LinkStrategy):
  """What both bridges share: the student's own tokenizer and spec, bits-per-byte at the end."""

  keeps_host_teacher = True

  @functools.cached_property
  def teacher_tokenizer(self):
    return hf_io.load_tokenizer(self.run.tokenizer_path)

  @functools.cached_property
  def _student_tokenizer(self):
    return bridge_data.load_student_tokenizer(self.run.link.tokenizer)

  def tokenizer(self):
    return self._student_tokenizer

  def new_student(self):
    return student_from_spec(self.run.link, self.tokenizer())

  def final(self, s_config, params):
    """Held-out bits per byte of student and teacher (comparable across tokenizers)."""
    run = self.run
    eval_tokens = int((run.config.get("report") or {}).get("eval_tokens", 8192))
    ours = _heldout_quality(s_config, params, self.tokenizer(), run.config.data, eval_tokens,
                            run.link.seq_len)
    theirs = _heldout_quality(run.t_config, run.t_params, self.teacher_tokenizer,
                              run.config.data, eval_tokens, run.link.seq_len)
    return {"bpb": ours["bpb"], "heldout_ppl": ours["ppl"], "teacher_bpb": theirs["bpb"],
            "teacher_ppl": theirs["ppl"]}

  def meta(self):
    return {"bridge": dict(name=self.run.link.bridge, **self.bridge_meta)}


class SeqkdLink(_Bridged):
  """The teacher writes a corpus (cached); the student trains on it with plain CE."""

  name = "seqkd"
  uses_teacher = False

  def build(self, student, teacher, optimizer, schedule, mesh, rules):
    run, link = self.run, self.run.link
    out = run.workdir / "seqkd" / link.name
    if jax.process_index() == 0:
      paragraphs = bridge_data.read_paragraphs(run.config.data.train, run.config.data.text_field)
      seqkd.build_corpus(teacher, run.t_params, self.teacher_tokenizer, paragraphs, out,
                         seqkd.SeqKDSettings(**dict(link.seqkd)), run.teacher_path)
    sync(f"seqkd-{link.name}")
    self.bridge_meta = seqkd.load_meta(out)
    corpus = mlc.ConfigDict(dict(train=str(seqkd.corpus_path(out)), text_field="text",
                                 seed=int(run.config.data.seed), streaming=False,
                                 heldout=str(run.config.data.heldout)))
    cache = Path(run.config.data.get("cache_dir") or run.workdir / "data_cache")
    pi, pc, ev = jax.process_index(), jax.process_count(), run.config.eval
    self.train = data.make_train_data(corpus, self.tokenizer(), link.seq_len, cache, pi, pc)
    self.evals = data.make_eval_batches(corpus, self.tokenizer(), link.seq_len, ev.batch_size,
                                        ev.num_batches, cache, pi, pc)
    chunk = int(link.loss.chunk_size)
    self.train_step = lm_step.make_lm_step(student, optimizer, mesh, rules, schedule, chunk)
    self.eval_step = lm_step.make_lm_eval_step(student, mesh, rules, chunk)

  def step(self, state, teacher_params, batch):
    return self.train_step(state, batch)

  def evaluate(self, params, teacher_params, mesh):
    return evaluate_lm(self.eval_step, params, self.evals, mesh)

  def summarize(self, sums):
    return summarize_lm(sums)


class VocabLink(_Bridged):
  """Token-level KD through the vocabulary-projection bridge on byte-aligned windows."""

  name = "vocab"

  def build(self, student, teacher, optimizer, schedule, mesh, rules):
    run, link, ev = self.run, self.run.link, self.run.config.eval
    teacher_len = int(link.get("teacher_len") or link.seq_len + link.seq_len // 2)
    t_tok, s_tok, text_field = self.teacher_tokenizer, self.tokenizer(), run.config.data.text_field
    self.train = bridge_data.load_aligned_windows(
        run.config.data.train, t_tok, s_tok, link.seq_len, teacher_len, int(run.config.data.seed),
        text_field, max_windows=int(link.get("max_windows") or 0))
    held = bridge_data.load_aligned_windows(
        run.config.data.heldout, t_tok, s_tok, link.seq_len, teacher_len, 0, text_field,
        max_windows=ev.batch_size * ev.num_batches)
    self.evals = [bridge_step.as_device_batch(b)
                  for b in held.in_order(ev.batch_size, ev.num_batches)]
    token_map = vocab_bridge.build_token_map(t_tok, s_tok)
    used = np.take_along_axis(self.train.teacher_ids, self.train.teacher_pos, 1)
    text = token_map.text_coverage(used[self.train.pair_mask])  # The tokens KD reads.
    log.info("link %s: token map %s; on the training text %s", link.name, token_map.coverage(),
             text)
    self.loss = LossSettings(**dict(link.loss))
    self.train_step = bridge_step.make_bridge_step(student, teacher, optimizer, self.loss,
                                                   token_map, mesh, rules, schedule)
    self.eval_step = bridge_step.make_bridge_eval_step(student, teacher, self.loss, token_map,
                                                       mesh, rules)
    # The teacher reads teacher_len tokens of every training window (padding included).
    windows = link_steps(link) * link.batch_size * link.microbatches
    self.bridge_meta = {"token_map": dict(token_map.coverage(), text=text),
                        "teacher_tokens": windows * teacher_len,
                        "teacher_flops": 2 * num_params(teacher) * windows * teacher_len}

  def batch(self, step):
    return bridge_step.as_device_batch(super().batch(step))

  def evaluate(self, params, teacher_params, mesh):
    means = self.summarize(held_out_sums(self.eval_step, self.evals, mesh, params,
                                         teacher_params))
    return {"kl": means["kd"], "ce": means["ce"], "ppl": metrics.perplexity(means["ce"])}

  def summarize(self, sums):
    kd = sums["kd_sum"] / max(sums["pairs"], 1.0)
    ce = sums["ce_sum"] / max(sums["count"], 1.0)
    return {"loss": self.loss.kd_weight * kd + self.loss.ce_weight * ce, "kd": kd, "ce": ce}


def make_strategy(run: LinkRun) -> LinkStrategy:
  """The strategy of a bridged link (``link.bridge``)."""
  check_link(run.link, f"link {run.link.name}")
  return SeqkdLink(run) if run.link.bridge == "seqkd" else VocabLink(run)
