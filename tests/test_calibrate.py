"""Calibrated targets: anchors reproduced at their own shapes, the "output" mix, layer choices."""

import jax
import numpy as np
import pytest
from random_params import random_params

from cbd_jax import align, calibrate, importance, interpolate, model, resize
from cbd_jax.config import FAMILIES, ModelConfig


def _config(family, **kw):
  base = dict(family=family, vocab_size=53, hidden_size=32, num_layers=3, num_heads=4,
              num_kv_heads=2, head_dim=8, intermediate_size=48, max_position_embeddings=24,
              tie_embeddings=family == "gpt2")
  return ModelConfig(**{**base, **kw})


def _chain(family="llama"):
  """A large anchor and a small one cut from it (scattered units, like an importance Shrink)
  and perturbed, as a chain's anchors are."""
  large_cfg = _config(family, num_layers=6, hidden_size=48, num_heads=6, num_kv_heads=3,
                      intermediate_size=96)
  small_cfg = _config(family)
  large = random_params(large_cfg, 1)
  small = resize.shrink(large_cfg, large, small_cfg, method="weight_norm")
  rng = np.random.default_rng(2)
  small = jax.tree.map(lambda x: x + 0.02 * rng.standard_normal(x.shape).astype(x.dtype), small)
  return (small_cfg, small), (large_cfg, large)


IDS = np.random.default_rng(3).integers(0, 53, (4, 9))


@pytest.mark.parametrize("family", FAMILIES)
def test_targets_of_the_anchors_shapes_reproduce_the_anchors(family):
  small, large = _chain(family)
  for anchor in (small, large):
    params, info = calibrate.make_target(small, large, anchor[0], rows=IDS, log=str)
    np.testing.assert_allclose(model.forward(anchor[0], params, IDS[:, :-1]),
                               model.forward(anchor[0], anchor[1], IDS[:, :-1]), atol=1e-5,
                               rtol=0)
    assert info["alpha"] == (1.0 if anchor is small else 0.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_output_mix_is_the_small_anchor_at_alpha_one_and_shrink_at_zero(family):
  small, large = _chain(family)
  target = small[0].replace(num_layers=5, hidden_size=40, num_heads=5, num_kv_heads=5,
                            intermediate_size=64)
  views = interpolate.anchor_views(small, large, target)
  ids = IDS[:, :-1]
  want = model.forward(small[0], small[1], ids)
  if family in ("gpt2",):  # LayerNorm averages over the new channels: not function-preserving.
    views = interpolate.anchor_views(small, large, target.replace(hidden_size=32, num_heads=4,
                                                                  num_kv_heads=4))
    target = target.replace(hidden_size=32, num_heads=4, num_kv_heads=4)
  else:
    views = interpolate.anchor_views(small, large, target, rescale_norms=True)
  got = model.forward(target, interpolate.mix(views, 1.0, "output"), ids)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
  jax.tree.map(np.testing.assert_array_equal, interpolate.mix(views, 0.0, "output"), views.shrunk)


def test_output_mix_scales_only_what_padded_units_write():
  small, large = _chain()
  target = small[0].replace(num_layers=5, intermediate_size=64)
  views = interpolate.anchor_views(small, large, target)
  alpha = 0.3
  out = resize.flatten(interpolate.mix(views, alpha, "output"))
  shrunk, grown = resize.flatten(views.shrunk), resize.flatten(views.grown)
  new_layers = np.flatnonzero(np.all(grown["layers/attn/q/weight"] == 0, axis=(1, 2, 3)))
  assert len(new_layers) == 2
  for path, x in out.items():
    if not path.startswith("layers/"):
      continue
    scale = 1 - alpha if path in ("layers/attn/o/weight", "layers/mlp/down/weight") else 1.0
    np.testing.assert_allclose(x[new_layers], scale * shrunk[path][new_layers], atol=1e-7,
                               err_msg=path)
  kept = np.setdiff1d(np.arange(5), new_layers)
  up, down = out["layers/mlp/up/weight"][kept], out["layers/mlp/down/weight"][kept]
  s_up, s_down = shrunk["layers/mlp/up/weight"][kept], shrunk["layers/mlp/down/weight"][kept]
  np.testing.assert_array_equal(up[:, 48:], s_up[:, 48:])  # New neurons read whole ...
  np.testing.assert_allclose(down[..., 48:], (1 - alpha) * s_down[..., 48:], atol=1e-7)
  np.testing.assert_allclose(up[:, :48], alpha * resize.flatten(views.grown)[
      "layers/mlp/up/weight"][kept][:, :48] + (1 - alpha) * s_up[:, :48], atol=1e-6)


@pytest.mark.parametrize("family", ("llama", "gpt2"))
def test_intermediate_targets_are_finite_and_the_choices_are_the_calibration_minima(family):
  small, large = _chain(family)
  target = small[0].replace(num_layers=4, hidden_size=40, num_heads=5, num_kv_heads=5,
                            intermediate_size=64)
  lines = []
  params, info = calibrate.make_target(small, large, target, calibrate.Recipe(gains=False),
                                       rows=IDS, log=lines.append)
  assert np.isfinite(np.asarray(model.forward(target, params, IDS))).all()
  losses = info["alpha_losses"]
  assert info["alpha"] == min(losses, key=losses.get) and len(losses) >= 5
  assert info["layer_choice"] == min(info["layer_losses"], key=info["layer_losses"].get)
  # The recorded calibration loss is the target's own loss on the calibration rows.
  assert losses[info["alpha"]] == pytest.approx(interpolate.heldout_loss(target, params, IDS),
                                                rel=1e-5)
  assert any("alpha =" in line for line in lines)


def test_residual_gains_move_the_target_towards_the_large_anchor_and_are_checked():
  small, large = _chain()
  target = small[0].replace(num_layers=4, intermediate_size=64)
  views = interpolate.anchor_views(small, large, target)
  params = interpolate.mix(views, 0.5, "output")
  gains, kls = calibrate.fit_residual_gains(target, params, large, IDS, steps=8)
  assert gains.shape == (4, 2) and min(kls) < kls[0]
  # scale_outputs multiplies exactly the o and down weights of each layer.
  scaled = resize.flatten(calibrate.scale_outputs(params, gains))
  flat = resize.flatten(params)
  for path, x in scaled.items():
    if path == "layers/attn/o/weight":
      np.testing.assert_allclose(x, flat[path] * gains[:, 0, None, None, None], rtol=1e-6)
    elif path == "layers/mlp/down/weight":
      np.testing.assert_allclose(x, flat[path] * gains[:, 1, None, None], rtol=1e-6)
    else:
      np.testing.assert_array_equal(x, flat[path])
  _, info = calibrate.make_target(small, large, target, rows=IDS, log=str)
  before, after = info["gain_check_losses"]
  assert (info["gains"] is not None) == (after < before)


def test_calibration_depends_only_on_the_rows_it_is_given():
  small, large = _chain()
  target = small[0].replace(num_layers=5)
  a, info_a = calibrate.make_target(small, large, target, rows=IDS, log=str)
  b, info_b = calibrate.make_target(small, large, target, rows=IDS.copy(), log=str)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert info_a == info_b
  other = np.random.default_rng(4).integers(0, 53, (4, 9))
  _, info_c = calibrate.make_target(small, large, target, rows=other, log=str)
  assert info_c["alpha_losses"] != info_a["alpha_losses"]
  paper, info = calibrate.make_target(small, large, target, calibrate.Recipe(method="paper"),
                                      rows=IDS, log=str)
  assert info["calibration_tokens"] == 0 and info["rule"] == "plain"
  want = interpolate.interpolate(small, large, target, rule="plain")
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-7), paper, want)


def test_greedy_layers_keep_the_counterparts_and_drop_the_least_influential():
  small, large = _chain()
  aligned = (large[0], align.align_units(*small, *large))
  m = align.depth_counterparts(*small, *aligned)
  layers = importance.greedy_layers(*aligned, 4, IDS, keep=m)
  assert len(layers) == 4 and np.isin(m, layers).all() and np.all(np.diff(layers) > 0)
  # A layer whose o and down are zero is an identity: block influence 0, dropped first.
  flat = resize.flatten(aligned[1])
  free = np.setdiff1d(np.arange(6), m)
  for path in ("layers/attn/o/weight", "layers/mlp/down/weight"):
    flat[path] = np.array(flat[path])
    flat[path][free[-1]] = 0
  scores = importance.block_influence(large[0], resize.unflatten(flat), IDS)
  assert scores[free[-1]] == pytest.approx(0.0, abs=1e-6) and scores.min() >= -1e-6
  kept = importance.greedy_layers(large[0], resize.unflatten(flat), 5, IDS, keep=m)
  assert free[-1] not in kept


def test_bad_recipes_are_refused():
  with pytest.raises(ValueError, match="unknown method"):
    calibrate.Recipe(method="magic")
  with pytest.raises(ValueError, match="unknown layers"):
    calibrate.Recipe(layers="best")
  with pytest.raises(ValueError, match="outside"):
    calibrate.Recipe(alpha=2.0)
