"""The step core shared by every training step (KD, vocabulary-bridged KD, plain LM).

Each step supplies only its loss: ``objective(params, extra, mb, totals) -> (value, sums)``,
where ``value`` is the microbatch's share of the batch objective (its sums divided by the whole
batch's ``totals``) and ``sums`` a dict of gradient-free token sums. The core writes the rest
once: gradients summed over microbatches with ``lax.scan`` under the parameters' sharding
constraint (so the step equals one big batch exactly), the optimizer update, the metrics
(``sums``, ``loss``, ``grad_norm``, ``param_norm`` of the updated params, ``lr``) and
``jax.jit`` with shardings and the state donated.
``extra`` holds what the loss reads but never trains (teacher params, a projector).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cbd_jax.model.config import ModelConfig

Params = dict[str, Any]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  """What a student's training carries from step to step (and what a checkpoint holds)."""

  step: jax.Array
  params: Params
  opt_state: Any


def compute_params(config: ModelConfig, params: Params) -> Params:
  """fp32 master params cast to the model's compute dtype (``config.dtype``)."""
  dt = jnp.dtype(config.dtype)
  return jax.tree.map(lambda a: a.astype(dt), params)


def _accumulate(objective: Callable, params: Params, extra: Any, batch: dict, totals: Any,
                grad_sharding: Any):
  """(summed gradients, summed token sums) over the microbatches of ``batch`` ([M, ...])."""
  grad_fn = jax.value_and_grad(objective, has_aux=True)
  first = jax.tree.map(lambda x: x[0], batch)
  sums_shape = jax.eval_shape(lambda: objective(params, extra, first, totals)[1])

  def micro(carry, mb):
    grads, sums = carry
    (_, aux), g = grad_fn(params, extra, mb, totals)
    g = jax.lax.with_sharding_constraint(g, grad_sharding)
    return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, aux)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
  (grads, sums), _ = jax.lax.scan(micro, (zeros, zero_sums), batch)
  return grads, sums


def under_mesh(fn: Callable, mesh: Mesh) -> Callable:
  """``fn`` traced under ``mesh`` (abstractly), so the model's activation constraints
  (`sharding.constrain_batch`) and the per-shard TPU attention apply inside the jitted step."""
  @functools.wraps(fn)
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)
  return wrapped


def make_step(objective: Callable, totals: Callable, mean_loss: Callable, optimizer,
              state_sharding: TrainState, extra_sharding: Any, batch_sharding: Any, mesh: Mesh,
              schedule: Callable | None = None):
  """Returns step(state, extra, batch) -> (state, metrics), jitted with shardings, state donated.

  ``totals(batch)`` gives the batch's normalisers (token or pair counts) once;
  ``mean_loss(sums, totals)`` the reported mean objective from the summed metrics.
  """
  def step(state: TrainState, extra, batch):
    tot = totals(batch)
    grads, sums = _accumulate(objective, state.params, extra, batch, tot, state_sharding.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(sums, loss=mean_loss(sums, tot), grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(params),  # Finite iff every new param is.
                   lr=schedule(state.step) if schedule is not None else jnp.zeros(()))
    return TrainState(state.step + 1, params, opt_state), metrics

  return jax.jit(under_mesh(step, mesh),
                 in_shardings=(state_sharding, extra_sharding, batch_sharding),
                 out_shardings=(state_sharding, NamedSharding(mesh, P())), donate_argnums=(0,))
