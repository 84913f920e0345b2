"""The sharded distillation step: one pure function, jitted once with shardings and donation.

    loss = (kd_weight * sum_t KD(p_t || q_t) + ce_weight * sum_t CE(y_t, q_t)) / sum_t mask_t

p = teacher, q = student, both from final hidden states through their output embeddings by the
fused head-and-loss, so no [batch, seq, vocab] logits tensor exists. Master params and Adam
moments are fp32; the forward passes run in ``config.dtype`` (e.g. bfloat16); losses are fp32.
Gradients are accumulated over microbatches (``lax.scan``) as sums and divided by the total token
count once, so the step equals one big batch exactly. The teacher's params enter sharded, under
``stop_gradient``, and are never part of the state (never differentiated, never checkpointed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cbd_jax.distill import hidden_bridge, step_core
from cbd_jax.distill.fused_loss import fused_cross_entropy, fused_distill_loss, fused_kd_loss
from cbd_jax.distill.step_core import TrainState, compute_params
from cbd_jax.model import decoder
from cbd_jax.model.config import ModelConfig
from cbd_jax.model.decoder import abstract_params
from cbd_jax.model.sharding import DEFAULT_RULES, batch_sharding, tree_shardings

Params = dict[str, Any]
Batch = dict[str, jax.Array]  # ids, labels, mask: [M, B, T] (M microbatches)


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """KD kind and temperature (see ``distill.losses``), the KD/CE mix, the fused chunk size, and
  hidden-state distillation (``hidden_weight`` > 0; see ``cbd_jax.distill.hidden_bridge``)."""

  kind: str = "fkl"
  temperature: float = 1.0
  kd_weight: float = 1.0
  ce_weight: float = 0.0
  chunk_size: int = 1024
  hidden_weight: float = 0.0
  hidden_kind: str = "mse"          # "mse" or "cosine"
  hidden_layers: str = "uniform"    # Layer map: "uniform" or "last".
  projector: str = "identity"       # Student -> teacher width: "identity" or "orthogonal".
  projector_seed: int = 0


def make_optimizer(lr: float, total_steps: int, *, warmup_steps: int = 0,
                   schedule: str = "cosine",
                   min_lr_ratio: float = 0.1, weight_decay: float = 0.0, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8, grad_clip: float = 1.0):
  """AdamW with linear warm-up then cosine/linear/constant decay to min_lr_ratio * lr.

  Returns (optimizer, schedule_fn). Weight decay applies to weight matrices and embeddings only.
  """
  decay_steps = max(total_steps - warmup_steps, 1)
  end = lr * min_lr_ratio
  if schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=min_lr_ratio)
  elif schedule == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  elif schedule == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise ValueError(f"unknown schedule {schedule!r}; use 'cosine', 'linear' or 'constant'")
  warm = optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps else None
  sched = optax.join_schedules([warm, decay], [warmup_steps]) if warm else decay

  def decay_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: str(getattr(path[-1], "key", "")) in ("weight", "embedding"), params)

  chain = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
  chain.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=decay_mask))
  return optax.chain(*chain), sched


def init_train_state(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
  """Step 0, fp32 master params, fresh optimizer state."""
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def state_shardings(config: ModelConfig, optimizer, mesh: Mesh,
                    rules: Sequence = DEFAULT_RULES) -> TrainState:
  """Shardings of the TrainState of a student with this config."""
  shapes = jax.eval_shape(lambda p: init_train_state(p, optimizer), abstract_params(config))
  return tree_shardings(shapes, mesh, rules)


def place_params(params: Params, shardings: Any, dtype=None) -> Params:
  """Host arrays -> global sharded arrays (each process supplies only its own shards)."""
  def one(a, sharding):
    a = a if dtype is None else a.astype(dtype)
    if isinstance(a, jax.Array) and a.sharding == sharding:
      return a
    host = jax.device_get(a) if isinstance(a, jax.Array) else a
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
  return jax.tree.map(one, params, shardings)


def make_init_state(config: ModelConfig, optimizer, mesh: Mesh, rules: Sequence = DEFAULT_RULES):
  """Returns init(params) -> sharded TrainState (params cast to fp32 master copies)."""
  sh = state_shardings(config, optimizer, mesh, rules)

  def init(params: Params) -> TrainState:
    placed = place_params(params, sh.params, jnp.float32)
    return jax.jit(lambda p: init_train_state(p, optimizer), out_shardings=sh)(placed)
  return init


def _common_vocab(s_head_VxD, t_head_VxD):
  """Both output heads cut to the rows they share (padding rows differ between checkpoints)."""
  rows = min(s_head_VxD.shape[0], t_head_VxD.shape[0])
  return s_head_VxD[:rows], t_head_VxD[:rows]


def _check_link(student: ModelConfig, teacher: ModelConfig):
  if student.vocab_limit != teacher.vocab_limit:
    raise ValueError(f"student vocabulary ({student.vocab_limit}) differs from the teacher's "
                     f"({teacher.vocab_limit}); such a link needs a vocabulary bridge")


def _hidden_term(student: ModelConfig, s_layers, t_layers, hidden, mask):
  """The student's per-layer states against the mapped teacher states: sum over tokens of the
  mean over the student's L + 1 states (so its token mean is a per-state mean)."""
  layers, projector, kind = hidden
  total, _ = hidden_bridge.layered_hidden_loss_sum(s_layers, t_layers, layers, projector, kind,
                                                   mask)
  return total / (student.num_layers + 1)


def _microbatch_sums(student: ModelConfig, teacher: ModelConfig, loss: LossSettings,
                     params: Params, teacher_params: Params, mb: Batch, total_count,
                     hidden=None):
  """(objective / total_count, {kd_sum, ce_sum, count[, hidden_sum]}) for one microbatch.

  ``hidden`` = (layer map, projector, loss kind) turns on the hidden-state term.
  """
  s_params = compute_params(student, params)
  t_hidden, t_layers = decoder.apply_hidden(teacher, teacher_params, mb["ids"],
                                            output_hidden=hidden is not None)
  t_hidden = jax.lax.stop_gradient(t_hidden)
  t_head = jax.lax.stop_gradient(decoder.head_weight(teacher, teacher_params))
  s_hidden, s_layers = decoder.apply_hidden(student, s_params, mb["ids"],
                                            output_hidden=hidden is not None)
  s_head = decoder.head_weight(student, s_params)
  mask = mb["mask"].astype(jnp.float32)
  s_head, t_head = _common_vocab(s_head, t_head)
  labels = mb["labels"] if loss.ce_weight else None
  objective, sums = fused_distill_loss(
      s_hidden, s_head, t_hidden, t_head, labels, kind=loss.kind, temperature=loss.temperature,
      mask=mask, vocab_limit=student.vocab_limit, kd_weight=loss.kd_weight,
      ce_weight=loss.ce_weight, chunk_size=loss.chunk_size)
  out = {"kd_sum": sums["kd_sum"], "ce_sum": sums["ce_sum"], "count": jnp.sum(mask)}
  if hidden is not None:
    h_sum = _hidden_term(student, s_layers, jax.lax.stop_gradient(t_layers), hidden, mask)
    objective = objective + loss.hidden_weight * h_sum
    out["hidden_sum"] = jax.lax.stop_gradient(h_sum)
  return objective / total_count, out


def hidden_setup(student: ModelConfig, teacher: ModelConfig, loss: LossSettings):
  """(layer map, projector, kind) of a link with hidden-state distillation, else None."""
  if not loss.hidden_weight:
    return None
  layers = hidden_bridge.layer_map(student.num_layers, teacher.num_layers, loss.hidden_layers)
  projector = hidden_bridge.link_projector(student.hidden_size, teacher.hidden_size,
                                           loss.projector, loss.projector_seed)
  return layers, projector, loss.hidden_kind


def make_train_step(student: ModelConfig, teacher: ModelConfig, optimizer, loss: LossSettings,
                    mesh: Mesh, rules: Sequence = DEFAULT_RULES,
                    schedule: Callable | None = None):
  """Returns step(state, teacher_params, batch) -> (state, metrics), jitted with shardings.

  ``batch`` holds ids, labels and mask of shape [M, B, T] (M microbatches of B sequences);
  ``teacher_params`` should already be in the teacher's compute dtype. The state is donated.
  Metrics are token sums and counts (``kd_sum``, ``ce_sum``, ``count``; ``hidden_sum`` with
  hidden-state distillation), ``loss`` (the mean objective), ``grad_norm`` and ``lr``.
  """
  _check_link(student, teacher)
  hidden = hidden_setup(student, teacher, loss)

  def objective(params, teacher_params, mb, total):
    return _microbatch_sums(student, teacher, loss, params, teacher_params, mb, total, hidden)

  def totals(batch):
    return jnp.maximum(jnp.sum(batch["mask"].astype(jnp.float32)), 1.0)

  def mean_loss(sums, total):
    h = loss.hidden_weight * sums["hidden_sum"] if hidden is not None else 0.0
    return (loss.kd_weight * sums["kd_sum"] + loss.ce_weight * sums["ce_sum"] + h) / total

  return step_core.make_step(
      objective, totals, mean_loss, optimizer, state_shardings(student, optimizer, mesh, rules),
      tree_shardings(abstract_params(teacher), mesh, rules),
      batch_sharding(mesh, ndim=3, leading=1), mesh, schedule)


def make_eval_step(student: ModelConfig, teacher: ModelConfig, loss: LossSettings, mesh: Mesh,
                   rules: Sequence = DEFAULT_RULES):
  """Returns evaluate(params, teacher_params, batch[B, T]) -> token sums and count.

  Sums: ``kd_sum`` (the link's objective kind), ``kl_sum`` (KL(teacher || student) at T = 1),
  ``ce_sum`` (student CE on the labels), ``teacher_ce_sum``; and ``count``.
  """
  _check_link(student, teacher)
  s_sh = tree_shardings(abstract_params(student), mesh, rules)
  t_sh = tree_shardings(abstract_params(teacher), mesh, rules)
  batch_sh = batch_sharding(mesh, ndim=2)

  def evaluate(params, teacher_params, batch):
    s_params = compute_params(student, params)
    mask = batch["mask"].astype(jnp.float32)
    s_hidden, _ = decoder.apply_hidden(student, s_params, batch["ids"])
    t_hidden, _ = decoder.apply_hidden(teacher, teacher_params, batch["ids"])
    s_head = decoder.head_weight(student, s_params)
    t_head = decoder.head_weight(teacher, teacher_params)
    s_head, t_head = _common_vocab(s_head, t_head)
    v, c = student.vocab_limit, loss.chunk_size

    def kd(kind, temperature):
      return fused_kd_loss(s_hidden, s_head, t_hidden, t_head, kind=kind,
                           temperature=temperature, mask=mask, vocab_limit=v, chunk_size=c)[0]
    kd_sum = kd(loss.kind, loss.temperature)
    same = loss.kind == "fkl" and loss.temperature == 1.0
    return {
        "kd_sum": kd_sum,
        "kl_sum": kd_sum if same else kd("fkl", 1.0),
        "ce_sum": fused_cross_entropy(s_hidden, s_head, batch["labels"], mask, v, c)[0],
        "teacher_ce_sum": fused_cross_entropy(t_hidden, t_head, batch["labels"], mask, v, c)[0],
        "count": jnp.sum(mask),
    }

  return jax.jit(step_core.under_mesh(evaluate, mesh), in_shardings=(s_sh, t_sh, batch_sh),
                 out_shardings=NamedSharding(mesh, P()))
