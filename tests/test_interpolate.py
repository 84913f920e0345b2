"""Interpolation: exact endpoints, default alpha, renormalisation, a sweep that matches the loss."""

import jax
import numpy as np
import pytest
from random_params import random_params

import cbd_jax
from cbd_jax.evaluation import heldout
from cbd_jax.interpolation import align, mixing, resize
from cbd_jax.model import decoder, layout
from cbd_jax.model.config import FAMILIES, ModelConfig, num_params


def _config(family, **kw):
  base = dict(family=family, vocab_size=53, hidden_size=32, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=8, intermediate_size=48, max_position_embeddings=24,
              tie_embeddings=family == "gpt2")
  return ModelConfig(**{**base, **kw})



@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_one_and_zero_return_the_anchors_exactly(family):
  config = _config(family)
  small, large = random_params(config, 0), random_params(config, 1)
  for alpha, expect in ((1.0, small), (0.0, large)):
    for mix in mixing.MIXES:
      out = mixing.interpolate((config, small), (config, large), config, alpha, mix=mix,
                               align_units=False)
      jax.tree.map(np.testing.assert_array_equal, out, expect)
  # Aligned, the large endpoint is the large anchor with its units reordered: the same function.
  ids = np.random.default_rng(3).integers(0, 53, (2, 6))
  out = cbd_jax.interpolate((config, small), (config, large), config, 0.0)  # The public name.
  np.testing.assert_allclose(decoder.forward(config, out, ids), decoder.forward(config, large, ids),
                             atol=1e-5, rtol=0)
  half = mixing.interpolate((config, small), (config, large), config, 0.25,
                            align_units=False)
  jax.tree.map(lambda o, s, b: np.testing.assert_allclose(o, 0.25 * s + 0.75 * b, atol=1e-7),
               half, small, large)


def _anchors(family="llama"):
  small_config = _config(family)
  large_config = small_config.replace(num_layers=4, hidden_size=48, num_heads=6, num_kv_heads=3,
                                      intermediate_size=96)
  small = (small_config, random_params(small_config, 0))
  return small, (large_config, random_params(large_config, 1))


def test_default_alpha_follows_parameter_counts():
  (s, _), (b, _) = _anchors()
  t = s.replace(num_layers=3, hidden_size=40, num_heads=5, num_kv_heads=5, intermediate_size=64)
  p_s, p_b, p_t = num_params(s), num_params(b), num_params(t)
  assert mixing.default_alpha(s, b, t) == pytest.approx((p_b - p_t) / (p_b - p_s))
  assert mixing.default_alpha(s, b, s) == 1.0 and mixing.default_alpha(s, b, b) == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_between_sizes_equals_the_mix_of_grow_and_shrink(family):
  small, large = _anchors(family)
  target = small[0].replace(num_layers=3, hidden_size=40, num_heads=5, num_kv_heads=5,
                            intermediate_size=64)
  alpha = mixing.default_alpha(small[0], large[0], target)
  out = layout.flatten(mixing.interpolate(small, large, target, mix="plain", depth="identity",
                                          align_layers=False, align_units=False))
  grown = layout.flatten(resize.grow(*small, target))
  shrunk = layout.flatten(resize.shrink(*large, target))
  assert {p: x.shape for p, x in out.items()} == layout.param_shapes(target)
  for path, x in out.items():
    np.testing.assert_allclose(x, alpha * grown[path] + (1 - alpha) * shrunk[path], atol=1e-6)


def test_renormalize_takes_the_large_anchor_where_grow_only_padded():
  small, large = _anchors()
  target = small[0].replace(num_layers=3, intermediate_size=64)
  alpha = 0.7
  kw = dict(depth="identity", align_layers=False, align_units=False)
  plain = layout.flatten(mixing.interpolate(small, large, target, alpha, "plain", **kw))
  renorm = layout.flatten(mixing.interpolate(small, large, target, alpha, "whole", **kw))
  shrunk = layout.flatten(resize.shrink(*large, target))
  up, down = "layers/mlp/up/weight", "layers/mlp/down/weight"
  np.testing.assert_array_equal(renorm[up][:, 48:], shrunk[up][:, 48:])  # New neurons.
  np.testing.assert_allclose(plain[up][:, 48:], 0.3 * shrunk[up][:, 48:], atol=1e-7)
  np.testing.assert_array_equal(renorm[up][:, :48], plain[up][:, :48])
  # Layer 1 is the identity layer inserted by Grow: its o and down come from the large anchor.
  np.testing.assert_array_equal(renorm[down][1], shrunk[down][1])
  np.testing.assert_array_equal(renorm[up][1, :48], plain[up][1, :48])
  # An all-zero new layer ("zero" depth) is taken whole from the large anchor.
  zero = layout.flatten(mixing.interpolate(small, large, target, alpha, "whole",
                                           depth="zero", align_layers=False,
                                           align_units=False))
  for path, x in zero.items():
    if path.startswith("layers/"):
      np.testing.assert_array_equal(x[1], shrunk[path][1], err_msg=path)


def test_choose_alpha_scores_each_alpha_by_the_targets_own_loss():
  small, large = _anchors()
  target = small[0].replace(num_layers=3, hidden_size=40, num_heads=5, num_kv_heads=5,
                            intermediate_size=64)
  ids = np.random.default_rng(2).integers(0, 53, (3, 12))
  views = mixing.anchor_views(small, large, target)
  for mix in mixing.MIXES:
    best, losses = mixing.choose_alpha(target, views, mix, ids, grid=(0.0, 0.4, 1.0),
                                       refinements=0)
    assert set(losses) == {0.0, 0.4, 1.0} and best == min(losses, key=losses.get)
    for alpha in (0.0, 0.4):
      params = mixing.interpolate(small, large, target, alpha, mix)
      assert losses[alpha] == pytest.approx(heldout.mean_nll(target, params, ids), rel=1e-5)
  _, refined = mixing.choose_alpha(target, views, "output", ids, grid=(0.0, 0.5, 1.0))
  assert len(refined) == 3 + 2 * 2  # Two refinements: two new points each.


def test_mean_nll_is_mean_next_token_cross_entropy_over_real_vocab():
  config = _config("qwen2", real_vocab_size=50)
  params = random_params(config, 3)
  ids = np.random.default_rng(4).integers(0, 50, (2, 7))
  logits = np.asarray(decoder.forward(config, params, ids[:, :-1]), np.float64)[..., :50]
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -np.take_along_axis(logp, ids[:, 1:, None], -1).mean()
  assert heldout.mean_nll(config, params, ids, batch_size=1) == pytest.approx(want, 1e-5)


def test_bad_inputs_are_refused():
  small, large = _anchors()
  with pytest.raises(ValueError, match="outside"):
    mixing.interpolate(small, large, small[0], alpha=1.5)
  other = (_config("gpt2"), random_params(_config("gpt2"), 5))
  with pytest.raises(ValueError, match="families differ"):
    mixing.interpolate(small, other, small[0])


def test_layers_are_aligned_with_their_counterparts_in_the_large_anchor():
  large_config = _config("llama", num_layers=9)
  large = random_params(large_config, 6)
  small_config = large_config.replace(num_layers=4)
  kept = [0, 1, 5, 8]  # The small anchor descends from these large layers, slightly changed.
  small = resize.shrink(large_config, large, small_config, layer_select=np.isin(np.arange(9), kept))
  small = jax.tree.map(lambda x: x + 0.01 * np.random.default_rng(7).standard_normal(x.shape),
                       small)
  target = large_config.replace(num_layers=7)
  small_map, large_map = align.aligned_depth_maps(small_config, small, large_config, large, 7)
  # Every target layer is a large layer: the counterparts 0, 1, 5, 8 and three of the others,
  # evenly spread; the small layers sit with their counterparts, the rest are new (-1).
  np.testing.assert_array_equal(large_map.src[:, 0], [0, 1, 3, 4, 5, 6, 8])
  np.testing.assert_array_equal(small_map.src[:, 0], [0, 1, -1, -1, 2, -1, 3])
  scores = np.arange(9.0)  # Prefer the deepest free layers instead.
  by_score = align.aligned_depth_maps(small_config, small, large_config, large, 7,
                                      large_scores=scores)
  np.testing.assert_array_equal(by_score[1].src[:, 0], [0, 1, 4, 5, 6, 7, 8])
  ids = np.random.default_rng(9).integers(0, 53, (2, 6))
  reference = decoder.forward(small_config, small, ids)
  for depth in ("zero", "identity"):  # Grow(small) on the aligned layout keeps its function.
    small_map = align.aligned_depth_maps(small_config, small, large_config, large, 7, depth)[0]
    grown = resize.resize(small_config, small, target, fill="zero", depth=depth,
                          layer_map=small_map)
    np.testing.assert_allclose(decoder.forward(target, grown, ids), reference, atol=1e-5, rtol=0)
  mixed = layout.flatten(mixing.interpolate((small_config, small), (large_config, large), target,
                                            0.5))
  scale = "layers/attn_norm/scale"
  np.testing.assert_allclose(mixed[scale][4], 0.5 * layout.flatten(small)[scale][2]
                             + 0.5 * layout.flatten(large)[scale][5], atol=1e-6)


def test_monotone_layer_matching_recovers_a_noisy_subset():
  rng = np.random.default_rng(8)
  truth = np.array([0, 3, 4, 9, 12, 15, 17])
  similarity = rng.normal(0, 0.3, (7, 18))
  similarity[np.arange(7), truth] += 1.0
  np.testing.assert_array_equal(align.match_layers(similarity), truth)
  assert np.all(np.diff(align.match_layers(rng.normal(size=(5, 6)))) > 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_units_of_an_importance_shrunk_anchor_are_aligned_with_their_counterparts(family):
  """A small anchor made by an importance Shrink keeps a scattered subset of the large anchor's
  channels, neurons, kv groups and heads. Aligning reorders the large anchor without changing its
  function, so that Shrink of it to the small shape gives the small anchor back: every mix of
  the two is then the small anchor (up to the noise added to it), whatever alpha."""
  large_config = _config(family, num_layers=4, hidden_size=48, num_heads=6, num_kv_heads=3,
                         intermediate_size=96)
  small_config = _config(family, num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2,
                         intermediate_size=48)
  large = random_params(large_config, 11)
  clean = resize.shrink(large_config, large, small_config, method="weight_norm")
  rng = np.random.default_rng(12)
  small = jax.tree.map(lambda x: x + 0.01 * rng.standard_normal(x.shape).astype(x.dtype), clean)
  ids = rng.integers(0, 53, (2, 6))
  before = jax.tree.map(np.copy, large)
  for extras in ("leading", "weight_norm"):
    aligned = align.align_units(small_config, small, large_config, large, extras=extras)
    np.testing.assert_allclose(decoder.forward(large_config, aligned, ids),
                               decoder.forward(large_config, large, ids), atol=1e-5, rtol=0)
    jax.tree.map(lambda a, c: np.testing.assert_array_equal(a, c), clean,
                 resize.shrink(large_config, aligned, small_config))
  jax.tree.map(np.testing.assert_array_equal, large, before)  # The caller's params are kept.
  for alpha in (0.0, 0.4):
    out = mixing.interpolate((small_config, small), (large_config, large), small_config, alpha)
    jax.tree.map(lambda o, s, c, a=alpha: np.testing.assert_allclose(
        o, a * s + (1 - a) * c, atol=1e-6), out, small, clean)
  unaligned = mixing.interpolate((small_config, small), (large_config, large), small_config, 0.0,
                                 align_units=False)
  worst = max(jax.tree.leaves(jax.tree.map(lambda o, c: float(np.abs(o - c).max()), unaligned,
                                           clean)))
  assert worst > 0.1  # Without alignment the mix pairs unrelated units.


def test_assignment_is_one_to_one_and_maximises_similarity():
  rng = np.random.default_rng(13)
  truth = rng.permutation(9)[:6]
  similarity = rng.normal(0, 0.1, (6, 9))
  similarity[np.arange(6), truth] += 1.0
  np.testing.assert_array_equal(align.assign(similarity), truth)
  tie = np.array([[1.0, 0.9], [1.0, 0.2]])  # Both prefer unit 0; the total is best as (1, 0).
  np.testing.assert_array_equal(align.assign(tie), [1, 0])
