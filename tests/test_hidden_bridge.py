"""Hidden-dim bridge: projector initialisations, layer maps and hidden-state losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbd_jax.distill import hidden_bridge
from cbd_jax.model import decoder
from cbd_jax.model.config import ModelConfig


def _one_state_sum(s, t, projector=None, kind="mse", mask=None):
  """The loss of one student state against one teacher state: a layer map of one entry."""
  return hidden_bridge.layered_hidden_loss_sum(s[None], t[None], np.zeros(1, np.int32), projector,
                                               kind, mask)


_loss_sum = jax.jit(_one_state_sum, static_argnames="kind")
_layered_sum = jax.jit(hidden_bridge.layered_hidden_loss_sum, static_argnames="kind")


def _x(shape, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def test_identity_projector_is_a_no_op_for_equal_sizes():
  x = _x((2, 5, 16))
  proj = hidden_bridge.init_projector(16, 16, "identity")
  np.testing.assert_array_equal(hidden_bridge.apply_projector(proj, x), x)
  for kind in hidden_bridge.HIDDEN_LOSSES:
    total, count = _loss_sum(x, x, proj, kind=kind)
    assert float(count) == 10
    np.testing.assert_allclose(total, 0.0, atol=1e-5)


def test_identity_projector_truncates_or_zero_pads():
  x = _x((3, 8))
  shrink = hidden_bridge.apply_projector(hidden_bridge.init_projector(8, 5), x)
  grow = hidden_bridge.apply_projector(hidden_bridge.init_projector(8, 11), x)
  np.testing.assert_array_equal(shrink, x[:, :5])
  np.testing.assert_array_equal(grow[:, :8], x)
  np.testing.assert_array_equal(grow[:, 8:], 0.0)


@pytest.mark.parametrize(("d_in", "d_out"), [(6, 10), (10, 6), (7, 7)])
def test_orthogonal_projector_is_semi_orthogonal(d_in, d_out):
  proj = hidden_bridge.init_projector(d_in, d_out, "orthogonal", jax.random.PRNGKey(1))
  w = np.asarray(proj["weight"], np.float64)
  assert w.shape == (d_out, d_in)
  small = min(d_in, d_out)
  gram = w.T @ w if d_out >= d_in else w @ w.T
  np.testing.assert_allclose(gram, np.eye(small), atol=1e-5)
  if d_out >= d_in:
    x = _x((4, d_in), 2)
    np.testing.assert_allclose(jnp.linalg.norm(hidden_bridge.apply_projector(proj, x), axis=-1),
                               jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_lstsq_recovers_a_linear_map_and_ridge_shrinks_it():
  x = np.asarray(_x((200, 6), 3), np.float64)
  a = np.asarray(_x((9, 6), 4), np.float64)
  c = np.asarray(_x((9,), 5), np.float64)
  y = x @ a.T + c
  proj = hidden_bridge.init_projector(6, 9, "lstsq", x_NxDin=x, y_NxDout=y)
  np.testing.assert_allclose(proj["weight"], a, atol=1e-4)
  np.testing.assert_allclose(proj["bias"], c, atol=1e-4)
  ridged = hidden_bridge.fit_projector(x, y, ridge=1e3)
  assert np.linalg.norm(ridged["weight"]) < 0.8 * np.linalg.norm(a)


def test_lstsq_on_model_activations_beats_identity_and_orthogonal():
  small = ModelConfig(hidden_size=32, num_heads=2, num_kv_heads=2, head_dim=16, num_layers=2,
                      intermediate_size=64, vocab_size=64)
  big = small.replace(hidden_size=48, num_heads=3, num_kv_heads=3, num_layers=3)
  ids = jax.random.randint(jax.random.PRNGKey(6), (4, 32), 0, 64)
  apply = jax.jit(decoder.apply_hidden, static_argnums=0)
  s_hidden, _ = apply(small, decoder.init_params(small, jax.random.PRNGKey(7)), ids)
  t_hidden, _ = apply(big, decoder.init_params(big, jax.random.PRNGKey(8)), ids)
  fit, held = slice(0, 3), slice(3, 4)
  projs = {
      "identity": hidden_bridge.init_projector(32, 48),
      "orthogonal": hidden_bridge.init_projector(32, 48, "orthogonal", jax.random.PRNGKey(9)),
      "lstsq": hidden_bridge.init_projector(32, 48, "lstsq", x_NxDin=s_hidden[fit],
                                            y_NxDout=t_hidden[fit], ridge=1e-3),
  }
  loss = {k: float(_loss_sum(s_hidden[held], t_hidden[held], p)[0])
          for k, p in projs.items()}
  assert loss["lstsq"] < 0.9 * min(loss["identity"], loss["orthogonal"]), loss


def test_hidden_losses_match_numpy_with_mask_and_gradients():
  s, t = _x((2, 4, 6), 10), _x((2, 4, 9), 11)
  proj = hidden_bridge.init_projector(6, 9, "orthogonal", jax.random.PRNGKey(12))
  proj["bias"] = _x((9,), 13)
  mask = np.array([[1, 1, 0, 1], [0, 1, 1, 1]], bool)
  ps = np.asarray(s, np.float64) @ np.asarray(proj["weight"], np.float64).T + np.asarray(
      proj["bias"])
  tn = np.asarray(t, np.float64)
  mse = ((ps - tn) ** 2).mean(-1)
  cos = 1 - (ps * tn).sum(-1) / np.linalg.norm(ps, axis=-1) / np.linalg.norm(tn, axis=-1)
  for kind, ref in (("mse", mse), ("cosine", cos)):
    total, count = _loss_sum(s, t, proj, kind=kind, mask=mask)
    np.testing.assert_allclose(total, (ref * mask).sum(), rtol=1e-5)
    assert float(count) == mask.sum()
  grads = jax.jit(jax.grad(
      lambda p, s_, t_: _one_state_sum(s_, t_, p, "cosine", mask)[0], (0, 1, 2)))(
          proj, s, t)
  assert np.asarray(grads[0]["weight"]).any() and np.asarray(grads[1]).any()
  assert not np.asarray(grads[2]).any()
  assert not np.asarray(grads[1][0, 2]).any()  # masked token


def test_layer_map_endpoints_and_monotone():
  np.testing.assert_array_equal(hidden_bridge.layer_map(4, 4), np.arange(5))
  uniform = hidden_bridge.layer_map(12, 30)
  assert uniform[0] == 0 and uniform[-1] == 30 and (np.diff(uniform) > 0).all()
  np.testing.assert_array_equal(hidden_bridge.layer_map(2, 5, "last"), [0, 4, 5])
  with pytest.raises(ValueError, match="no deeper"):
    hidden_bridge.layer_map(6, 3, "last")


def test_layered_loss_uses_the_mapped_teacher_layers():
  s_layers, t_layers = _x((3, 2, 4, 8), 14), _x((5, 2, 4, 8), 15)
  layers = hidden_bridge.layer_map(2, 4)
  total, count = _layered_sum(s_layers, t_layers, layers)
  s_np, t_np = np.asarray(s_layers, np.float64), np.asarray(t_layers, np.float64)
  want = sum(((s_np[i] - t_np[j]) ** 2).mean(-1).sum() for i, j in enumerate(layers))
  np.testing.assert_allclose(total, want, rtol=1e-5)
  assert float(count) == 3 * 2 * 4
  same, _ = _layered_sum(t_layers[layers], t_layers, layers)
  np.testing.assert_allclose(same, 0.0, atol=1e-6)


def test_bad_arguments_raise_one_line_errors():
  with pytest.raises(ValueError, match="unknown projector init"):
    hidden_bridge.init_projector(4, 4, "random")
  with pytest.raises(ValueError, match="needs rng"):
    hidden_bridge.init_projector(4, 4, "orthogonal")
  with pytest.raises(ValueError, match="paired activations"):
    hidden_bridge.init_projector(4, 4, "lstsq")
  with pytest.raises(ValueError, match="hidden size to the teacher"):
    _one_state_sum(_x((2, 3, 4)), _x((2, 3, 5)))


TEACHER_CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, num_layers=3, num_heads=2,
                          num_kv_heads=1, head_dim=16, intermediate_size=64)


def _hidden_distance(student, s_params, teacher, t_params, ids, loss):
  """Mean over tokens and student states of the hidden loss, computed directly (no step)."""
  from cbd_jax.distill.train_step import hidden_setup

  layers, projector, kind = hidden_setup(student, teacher, loss)
  _, s = decoder.apply_hidden(student, s_params, ids, output_hidden=True)
  _, t = decoder.apply_hidden(teacher, t_params, ids, output_hidden=True)
  total, count = hidden_bridge.layered_hidden_loss_sum(s, t, layers, projector, kind)
  return float(total) / float(count)


@pytest.mark.parametrize(("width", "projector"), [(32, "identity"), (24, "orthogonal")])
def test_hidden_distillation_moves_student_states_toward_the_teacher(width, projector):
  from cbd_jax.chain.source import init_host_params
  from cbd_jax.distill.train_step import (
    LossSettings,
    make_init_state,
    make_optimizer,
    make_train_step,
  )
  from cbd_jax.model.sharding import make_mesh

  student = TEACHER_CFG.replace(hidden_size=width, num_layers=2, head_dim=width // 2)
  teacher_params = init_host_params(TEACHER_CFG, 1)
  tokens = np.random.default_rng(0).integers(0, 64, (1, 8, 17)).astype(np.int32)
  batch = {"ids": tokens[..., :-1], "labels": tokens[..., 1:],
           "mask": np.ones((1, 8, 16), np.float32)}
  ids = batch["ids"][0]
  probe = LossSettings(hidden_weight=1.0, projector=projector)
  start = _hidden_distance(student, init_host_params(student, 2), TEACHER_CFG, teacher_params,
                           ids, probe)
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  opt, _ = make_optimizer(lr=3e-3, total_steps=30, grad_clip=0.0)
  after = {}
  for weight in (0.0, 1.0):  # Logit KD alone, then hidden-state distillation alone.
    loss = LossSettings(kd_weight=1.0 - weight, hidden_weight=weight, projector=projector,
                        chunk_size=64)
    state = make_init_state(student, opt, mesh)(init_host_params(student, 2))
    step = make_train_step(student, TEACHER_CFG, opt, loss, mesh)
    for i in range(30):
      state, m = step(state, teacher_params, batch)
      if weight and i == 0:  # The step's hidden term is the directly computed distance.
        np.testing.assert_allclose(float(m["hidden_sum"]) / float(m["count"]), start,
                                   rtol=1e-5)
    after[weight] = _hidden_distance(student, jax.device_get(state.params), TEACHER_CFG,
                                     teacher_params, ids, probe)
  print(f"hidden distance: start {start:.3e}, logit KD {after[0.0]:.3e}, hidden {after[1.0]:.3e}")
  assert after[1.0] < 0.5 * start and after[1.0] < 0.5 * after[0.0]
