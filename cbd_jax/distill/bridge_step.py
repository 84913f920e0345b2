"""The vocabulary-bridged distillation step: a teacher and a student with different tokenizers.

    loss = kd_weight * sum_(i,j) KD(P(p_i) || q_j) / N_pairs + ce_weight * sum_t CE(y_t, q_t) / N_t

over the aligned pairs (i, j) of teacher position i and student position j (both predict the text
after the same byte, see `distill.bridge_data`); P projects the teacher distribution onto the
student vocabulary (`vocab_bridge.project_logprobs`). Teacher logits are computed only at the
aligned positions; the student's logits only there for KD, and through the fused chunked loss for
CE. Gradients are summed over microbatches and divided once by the batch's totals, so the step
equals one big batch. The teacher is never differentiated and never part of the state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cbd_jax.distill import step_core, vocab_bridge
from cbd_jax.distill.fused_loss import fused_cross_entropy
from cbd_jax.distill.train_step import LossSettings, state_shardings
from cbd_jax.model import decoder
from cbd_jax.model.config import ModelConfig
from cbd_jax.model.decoder import abstract_params
from cbd_jax.model.sharding import DEFAULT_RULES, batch_sharding, tree_shardings

BATCH_KEYS = ("ids", "labels", "mask", "teacher_ids", "teacher_pos", "student_pos", "pair_mask")


def bridged_sums(student: ModelConfig, teacher: ModelConfig, loss: LossSettings,
                 token_map: vocab_bridge.TokenMap, params, teacher_params, mb):
  """Token sums of one microbatch: kd_sum (over pairs), ce_sum, pair and label counts."""
  t_params = jax.lax.stop_gradient(teacher_params)
  t_hidden, _ = decoder.apply_hidden(teacher, t_params, mb["teacher_ids"])
  t_hidden_BxAxD = vocab_bridge.gather_positions(t_hidden, mb["teacher_pos"])
  t_logits_BxAxW = decoder.logits_from_hidden(teacher, t_params, t_hidden_BxAxD)
  s_params = step_core.compute_params(student, params)
  s_hidden, _ = decoder.apply_hidden(student, s_params, mb["ids"])
  s_logits_BxAxV = decoder.logits_from_hidden(
      student, s_params, vocab_bridge.gather_positions(s_hidden, mb["student_pos"]))
  kd_sum, pairs = vocab_bridge.projected_kd_sum(
      s_logits_BxAxV, t_logits_BxAxW, token_map, mb["pair_mask"].astype(jnp.float32), loss.kind,
      loss.temperature, student.vocab_limit, teacher.vocab_limit)
  ce_sum, count = fused_cross_entropy(s_hidden, decoder.head_weight(student, s_params),
                                      mb["labels"], mb["mask"].astype(jnp.float32),
                                      student.vocab_limit, loss.chunk_size)
  return kd_sum, ce_sum, pairs, count


def make_bridge_step(student: ModelConfig, teacher: ModelConfig, optimizer, loss: LossSettings,
                     token_map: vocab_bridge.TokenMap, mesh: Mesh,
                     rules: Sequence = DEFAULT_RULES, schedule: Callable | None = None):
  """Returns step(state, teacher_params, batch) -> (state, metrics), jitted with shardings.

  ``batch`` holds `BATCH_KEYS`, each [M, B, ...]. Metrics: ``kd_sum``, ``pairs``, ``ce_sum``,
  ``count``, ``loss``, ``grad_norm``, ``lr``.
  """
  if token_map.student_vocab_size > student.vocab_size:
    raise ValueError(f"token map has {token_map.student_vocab_size} student tokens, the student "
                     f"head {student.vocab_size} rows; build the map with the student's tokenizer")

  def totals(batch):
    return (jnp.maximum(jnp.sum(batch["pair_mask"].astype(jnp.float32)), 1.0),
            jnp.maximum(jnp.sum(batch["mask"].astype(jnp.float32)), 1.0))

  def mean_loss(sums, tot):
    return loss.kd_weight * sums["kd_sum"] / tot[0] + loss.ce_weight * sums["ce_sum"] / tot[1]

  def objective(params, teacher_params, mb, tot):
    kd, ce, pairs, count = bridged_sums(student, teacher, loss, token_map, params,
                                        teacher_params, mb)
    sums = jax.lax.stop_gradient({"kd_sum": kd, "ce_sum": ce, "pairs": pairs, "count": count})
    return loss.kd_weight * kd / tot[0] + loss.ce_weight * ce / tot[1], sums

  return step_core.make_step(
      objective, totals, mean_loss, optimizer, state_shardings(student, optimizer, mesh, rules),
      tree_shardings(abstract_params(teacher), mesh, rules),
      {k: batch_sharding(mesh, ndim=3, leading=1) for k in BATCH_KEYS}, mesh, schedule)


def make_bridge_eval_step(student: ModelConfig, teacher: ModelConfig, loss: LossSettings,
                          token_map: vocab_bridge.TokenMap, mesh: Mesh,
                          rules: Sequence = DEFAULT_RULES):
  """Returns evaluate(params, teacher_params, batch[B, ...]) -> kd_sum, pairs, ce_sum, count."""
  s_sh = tree_shardings(abstract_params(student), mesh, rules)
  t_sh = tree_shardings(abstract_params(teacher), mesh, rules)
  batch_sh = {k: batch_sharding(mesh, ndim=2) for k in BATCH_KEYS}

  def evaluate(params, teacher_params, batch):
    kd, ce, pairs, count = bridged_sums(student, teacher, loss, token_map, params,
                                        teacher_params, batch)
    return {"kd_sum": kd, "pairs": pairs, "ce_sum": ce, "count": count}

  return jax.jit(step_core.under_mesh(evaluate, mesh), in_shardings=(s_sh, t_sh, batch_sh),
                 out_shardings=NamedSharding(mesh, P()))


def as_device_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Only the step's keys, in their dtypes (ints for ids / positions, fp32 for masks)."""
  out = {}
  for key in BATCH_KEYS:
    x = np.asarray(batch[key])
    out[key] = x.astype(np.float32 if key.endswith("mask") else np.int32)
  return out
