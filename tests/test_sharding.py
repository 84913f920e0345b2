"""Mesh construction and name-based sharding rules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from cbd_jax.model.config import ModelConfig
from cbd_jax.model.decoder import abstract_params
from cbd_jax.model.sharding import (
  batch_sharding,
  constrain_batch,
  make_mesh,
  pad_rows,
  padded_rows,
  parse_rules,
  spec_for,
  tree_shardings,
)

CONFIG = ModelConfig(family="qwen2", vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, intermediate_size=64)


def test_make_mesh_fills_minus_one_and_adds_missing_axes():
  mesh = make_mesh({"data": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 4, "tensor": 2, "fsdp": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("shape, message", [
    ({"data": 3}, "does not fit"), ({"data": -1, "fsdp": -1}, "at most one"),
    ({"dp": 8}, "unknown mesh axes"), ({"data": 2}, "set one axis to -1")])
def test_make_mesh_refuses_bad_shapes(shape, message):
  with pytest.raises(ValueError, match=message):
    make_mesh(shape)


def test_rules_shard_params_and_adam_moments_alike():
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  params = abstract_params(CONFIG)
  sh = tree_shardings(params, mesh)
  assert sh["layers"]["attn"]["q"]["weight"].spec == P(None, "tensor", None, "fsdp")
  assert sh["layers"]["mlp"]["down"]["weight"].spec == P(None, "fsdp", "tensor")
  assert sh["embed"]["embedding"].spec == P("tensor", "fsdp")
  assert sh["final_norm"]["scale"].spec == P()
  opt_state = jax.eval_shape(optax.adam(1e-3).init, params)
  opt_sh = tree_shardings(opt_state, mesh)
  assert opt_sh[0].mu["layers"]["mlp"]["up"]["weight"].spec == P(None, "tensor", "fsdp")
  assert opt_sh[0].count.spec == P()


def test_axes_that_do_not_divide_a_dimension_are_dropped():
  mesh = make_mesh({"fsdp": 2, "tensor": 4})
  # 2 kv heads cannot be split 4 ways; 32 channels split 2 ways still can.
  assert spec_for("layers/attn/k/weight", (2, 2, 8, 32), mesh) == P(None, None, None, "fsdp")
  assert spec_for("layers/attn/q/weight", (2, 4, 8, 32), mesh) == P(None, "tensor", None, "fsdp")
  assert spec_for("anything/else", (3, 5), mesh) == P()


def test_fsdp_moves_to_a_dimension_it_divides():
  mesh = make_mesh({"fsdp": 8})
  # 12 channels cannot be split 8 ways; 64 FFN neurons can, so FSDP still shards the leaf.
  assert spec_for("layers/mlp/up/weight", (2, 64, 12), mesh) == P(None, "fsdp")
  assert spec_for("embed/embedding", (64, 12), mesh) == P("fsdp")
  # The layer axis of stacked leaves is never split; nothing else divides: replicated.
  assert spec_for("layers/mlp/down/weight", (8, 12, 12), mesh) == P()
  # Where the rule's dimension divides, nothing moves.
  assert spec_for("layers/mlp/up/weight", (2, 12, 64), mesh) == P(None, None, "fsdp")


def test_parse_rules_and_batch_sharding():
  rules = parse_rules([("mlp/.*/weight$", (None, ("fsdp", "tensor"), None))])
  mesh = make_mesh({"fsdp": 2, "tensor": 4})
  assert spec_for("layers/mlp/up/weight", (2, 64, 32), mesh, rules) == P(None, ("fsdp", "tensor"))
  assert spec_for("embed/embedding", (128, 32), mesh, rules) == P()
  assert batch_sharding(mesh, ndim=3, leading=1).spec == P(None, ("data", "fsdp"), None)


def test_constrain_batch_splits_the_batch_axis_only_under_a_mesh():
  x = jnp.ones((3, 8, 4))
  f = jax.jit(lambda a: constrain_batch(a * 2, 1))
  assert f(x).sharding.is_fully_replicated  # No mesh: a no-op.
  with jax.set_mesh(make_mesh({"data": 2, "fsdp": 4})):
    assert f(x).sharding.spec == P(None, ("data", "fsdp"))
    # Six rows split over data (2) but not also over fsdp (4): fsdp is dropped.
    assert f(jnp.ones((3, 6, 4))).sharding.spec == P(None, "data")


def test_step_with_activation_rules_equals_single_device():
  """Traced under the mesh, the model and loss constrain activations: numerics must not change."""
  from test_train_step import _assert_params_close, _batches, _reference, _run

  p1, h1 = _reference()
  mesh = make_mesh({"data": 2, "fsdp": 4})
  with jax.set_mesh(mesh):
    p8, h8 = _run(mesh, _batches(0, 2, 2, 8, 16))
  for a, b in zip(h1, h8, strict=True):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  _assert_params_close(p1, p8)


def test_held_out_rows_are_padded_to_the_batch_shards_without_changing_the_sums():
  from cbd_jax.chain.link import held_out_sums

  mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})  # 8 batch shards.
  assert padded_rows(3, mesh) == 8 and padded_rows(8, mesh) == 8 and padded_rows(9, mesh) == 16
  rng = np.random.default_rng(0)
  batch = {"ids": rng.integers(1, 50, (3, 5)).astype(np.int32),
           "mask": np.ones((3, 5), np.float32)}
  padded = pad_rows(mesh, batch)
  assert padded["ids"].shape == (8, 5) and not padded["mask"][3:].any()
  assert pad_rows(mesh, padded) is padded  # Already a multiple: as it is.

  @jax.jit
  def eval_step(b):
    return {"x_sum": jnp.sum(b["ids"] * b["mask"]), "count": jnp.sum(b["mask"])}

  sums = held_out_sums(eval_step, [batch, batch], mesh)
  assert sums == {"x_sum": 2.0 * batch["ids"].sum(), "count": 30.0}
