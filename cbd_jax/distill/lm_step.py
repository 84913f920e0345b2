"""The plain language-model step (no teacher): recovery training and sequence-level KD.

    loss = sum_t mask_t * -log q(y_t | y_<t) / sum_t mask_t

Same conventions as `cbd_jax.distill.train_step`: fp32 master params and Adam moments, compute in
``config.dtype``, the fused chunked head-and-loss (no [batch, seq, vocab] logits), gradients
summed over microbatches with ``lax.scan`` and divided once by the batch's token count, jitted
once with shardings over a mesh and the state donated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cbd_jax.distill import step_core
from cbd_jax.distill.fused_loss import fused_cross_entropy
from cbd_jax.distill.train_step import state_shardings
from cbd_jax.model import decoder
from cbd_jax.model.config import ModelConfig
from cbd_jax.model.decoder import abstract_params
from cbd_jax.model.sharding import DEFAULT_RULES, batch_sharding, tree_shardings


def _ce_sums(config: ModelConfig, params, ids_BxT, labels_BxT, mask_BxT, chunk_size: int):
  """(sum_t w_t CE_t, sum_t w_t) with w_t = mask_t [y_t >= 0], from the fused head-and-loss."""
  s_params = step_core.compute_params(config, params)
  hidden, _ = decoder.apply_hidden(config, s_params, ids_BxT)
  return fused_cross_entropy(hidden, decoder.head_weight(config, s_params), labels_BxT,
                             mask_BxT.astype(jnp.float32), config.vocab_limit, chunk_size)


def make_lm_step(config: ModelConfig, optimizer, mesh: Mesh, rules: Sequence = DEFAULT_RULES,
                 schedule: Callable | None = None, chunk_size: int = 1024):
  """Returns step(state, batch) -> (state, metrics); batch ids/labels/mask are [M, B, T].

  Metrics: ``ce_sum`` and ``count`` (token sums), ``loss`` (mean CE), ``grad_norm``, ``lr``.
  """
  def totals(batch):
    return jnp.maximum(jnp.sum(((batch["mask"] > 0) & (batch["labels"] >= 0)).astype(
        jnp.float32)), 1.0)

  def objective(params, _, mb, total):
    ce_sum, count = _ce_sums(config, params, mb["ids"], mb["labels"], mb["mask"], chunk_size)
    return ce_sum / total, jax.lax.stop_gradient({"ce_sum": ce_sum, "count": count})

  step = step_core.make_step(
      objective, totals, lambda sums, total: sums["ce_sum"] / total, optimizer,
      state_shardings(config, optimizer, mesh, rules), {},
      batch_sharding(mesh, ndim=3, leading=1), mesh, schedule)
  return lambda state, batch: step(state, {}, batch)


def make_lm_eval_step(config: ModelConfig, mesh: Mesh, rules: Sequence = DEFAULT_RULES,
                      chunk_size: int = 1024):
  """Returns evaluate(params, batch[B, T]) -> {"ce_sum", "count"} (held-out CE, no teacher)."""
  params_sh = tree_shardings(abstract_params(config), mesh, rules)

  def evaluate(params, batch):
    ce_sum, count = _ce_sums(config, params, batch["ids"], batch["labels"], batch["mask"],
                             chunk_size)
    return {"ce_sum": ce_sum, "count": count}

  return jax.jit(step_core.under_mesh(evaluate, mesh),
                 in_shardings=(params_sh, batch_sharding(mesh, ndim=2)),
                 out_shardings=NamedSharding(mesh, P()))
