"""Shrink/Grow: every leaf covered, function preserved where claimed, consistent unit choices."""

import functools

import jax
import numpy as np
import pytest
from random_params import random_params

from cbd_jax.interpolation import resize
from cbd_jax.model import decoder, layout
from cbd_jax.model.config import FAMILIES, ModelConfig

TIED = {"llama": True, "qwen2": False, "qwen3": False, "gpt2": True}


def _config(family, **kw):
  base = dict(family=family, vocab_size=61, hidden_size=32, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=8, intermediate_size=48, max_position_embeddings=32,
              tie_embeddings=TIED[family])
  return ModelConfig(**{**base, **kw})



@functools.cache
def _forward(config):
  return jax.jit(functools.partial(decoder.forward, config))


IDS = np.random.default_rng(1).integers(0, 61, (2, 9))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tie", [False, True])
def test_param_shapes_cover_every_leaf_of_the_model(family, tie):
  config = _config(family, tie_embeddings=tie)
  shapes = jax.eval_shape(lambda: decoder.init_params(config, jax.random.PRNGKey(0)))
  got = {p: tuple(x.shape) for p, x in layout.flatten(shapes).items()}
  assert got == layout.param_shapes(config)
  target = config.replace(num_layers=3, hidden_size=40, num_heads=5, num_kv_heads=5,
                          intermediate_size=64, max_position_embeddings=40)
  for fn in (resize.grow, resize.shrink):
    out = layout.flatten(fn(config, random_params(config), target))
    assert {p: x.shape for p, x in out.items()} == layout.param_shapes(target)


@pytest.mark.parametrize("family", FAMILIES)
def test_grow_preserves_logits_for_ffn_heads_kv_groups_and_identity_depth(family):
  source = _config(family)
  params = random_params(source)
  reference = _forward(source)(params, IDS)
  target = source.replace(num_layers=4, num_heads=6, num_kv_heads=3, intermediate_size=80)
  for method, depth in (("zero", "identity"), ("net2net", "identity"), ("net2net", "zero")):
    grown = resize.grow(source, params, target, method=method, depth=depth)
    np.testing.assert_allclose(_forward(target)(grown, IDS), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("heads,kv", [(8, 2), (8, 8), (8, 4)])
def test_grow_preserves_logits_when_the_group_size_changes(heads, kv):
  source = _config("qwen3")
  params = random_params(source)
  target = source.replace(num_heads=heads, num_kv_heads=kv)
  reference = _forward(source)(params, IDS)
  for method in ("zero", "net2net"):
    grown = resize.grow(source, params, target, method=method)
    np.testing.assert_allclose(_forward(target)(grown, IDS), reference, atol=1e-5, rtol=0)


def test_repeated_layers_are_copies_and_identity_layers_add_nothing():
  source = _config("gpt2", num_layers=3)
  params = random_params(source)
  target = source.replace(num_layers=5)
  flat = layout.flatten(params)
  repeat = layout.flatten(resize.grow(source, params, target, depth="repeat"))
  ident = layout.flatten(resize.grow(source, params, target, depth="identity"))
  # Source layers at round(linspace(0, 4, 3)) = 0, 2, 4; layers 1 and 3 follow layers 0 and 1.
  for path, x in flat.items():
    if path.startswith("layers/"):
      np.testing.assert_array_equal(repeat[path], x[[0, 0, 1, 1, 2]])
      writes = path.split("/")[2] in ("o", "down")
      np.testing.assert_array_equal(ident[path][[1, 3]], 0 * x[[0, 1]] if writes else x[[0, 1]])


def test_zero_residual_growth_with_rescaled_rms_norms_preserves_logits():
  source = _config("llama", norm_eps=1e-12)
  params = random_params(source)
  target = source.replace(hidden_size=48)
  grown = resize.grow(source, params, target, method="zero", rescale_norms=True)
  np.testing.assert_allclose(_forward(target)(grown, IDS), _forward(source)(params, IDS),
                             atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("depth", ["identity", "repeat"])
def test_shrink_after_zero_grow_returns_the_kept_slice(family, depth):
  source = _config(family)
  params = random_params(source)
  target = source.replace(num_layers=5, hidden_size=48, num_heads=8, num_kv_heads=4,
                          intermediate_size=96, max_position_embeddings=40)
  back = resize.shrink(target, resize.grow(source, params, target, "zero", depth), source)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_shrink_after_net2net_grow_keeps_inputs_and_halves_what_doubled_units_feed():
  source = _config("llama")
  params = random_params(source)
  target = source.replace(intermediate_size=96, num_heads=8, num_kv_heads=4)  # Each unit twice.
  back = layout.flatten(resize.shrink(target, resize.grow(source, params, target, "net2net"),
                                      source))
  for path, x in layout.flatten(params).items():
    halved = path in ("layers/mlp/down/weight", "layers/attn/o/weight")
    np.testing.assert_allclose(back[path], x / 2 if halved else x, rtol=1e-6)


def _index_params(config):
  """Every leaf holds, along each axis of kind D, F or H, that unit's index + 1 (times 1000 ** n
  for the n-th of those kinds), so a mapped leaf tells which source units it came from."""
  flat = {}
  for path, spec in layout.leaf_specs(config).items():
    x = np.ones([layout.axis_sizes(config)[k] for k, _ in spec], np.float64)
    for axis, (kind, _) in enumerate(spec):
      if kind in ("D", "F", "H"):
        shape = [1] * len(spec)
        shape[axis] = x.shape[axis]
        x = x * (np.arange(1, x.shape[axis] + 1) * 1000.0 ** "DFH".index(kind)).reshape(shape)
    flat[path] = x
  return layout.unflatten(flat)


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_shrink_by_importance_uses_one_unit_choice_for_every_leaf(family):
  source = _config(family, hidden_size=40, num_heads=6, num_kv_heads=3, intermediate_size=64)
  target = source.replace(hidden_size=24, num_heads=4, num_kv_heads=2, intermediate_size=40)
  params = _index_params(source)  # Larger index = larger norm, so importance keeps the last.
  maps = resize.make_maps(source, params, target, select="weight_norm")
  kept = {k: maps[k].src[:, 0] for k in "DFH"}
  np.testing.assert_array_equal(kept["D"], np.arange(16, 40))
  np.testing.assert_array_equal(kept["F"], np.arange(24, 64))
  out = layout.flatten(resize.shrink(source, params, target, method="weight_norm"))
  for path, spec in layout.leaf_specs(target).items():
    expect = np.ones([layout.axis_sizes(target)[k] for k, _ in spec])
    for axis, (kind, _) in enumerate(spec):
      if kind in kept:
        shape = [1] * len(spec)
        shape[axis] = -1
        expect = expect * ((kept[kind] + 1) * 1000.0 ** "DFH".index(kind)).reshape(shape)
    np.testing.assert_array_equal(out[path], expect, err_msg=path)


@pytest.mark.parametrize("src,tgt", [((6, 3), (4, 2)), ((6, 3), (6, 6)), ((4, 2), (8, 2)),
                                     ((8, 8), (6, 2)), ((4, 4), (12, 3)), ((9, 3), (12, 4)),
                                     ((6, 2), (4, 4))])
@pytest.mark.parametrize("fill", ["zero", "net2net"])
def test_every_query_head_keeps_a_kv_group_that_contains_its_own(src, tgt, fill):
  s = _config("llama", num_heads=src[0], num_kv_heads=src[1])
  t = s.replace(num_heads=tgt[0], num_kv_heads=tgt[1])
  rng = np.random.default_rng(sum(src + tgt))
  q, kv = resize.head_maps(s, t, fill, rng.random(src[0]), rng.random(src[1]))
  gs, gt = src[0] // src[1], tgt[0] // tgt[1]
  assert q.size == tgt[0] and kv.size == tgt[1]
  for j, h in enumerate(q.src[:, 0]):
    if h >= 0:
      assert h // gs in kv.src[j // gt], (j, h, kv.src)
  np.testing.assert_allclose(kv.w_copy.sum(1)[kv.src[:, 0] >= 0], 1.0)  # kv mean-pooled.
  if tgt[0] <= src[0]:  # A shrink never repeats a query head.
    assert len(set(q.src[:, 0])) == tgt[0]


def test_depth_shrink_keeps_first_and_last_layers():
  np.testing.assert_array_equal(resize.depth_map(12, 5, "identity").src[:, 0], [0, 3, 6, 8, 11])
  scores = np.array([9, 0, 5, 1, 7, 0, 0, 0, 0, 0, 0, 0.0])
  np.testing.assert_array_equal(resize.depth_map(12, 4, "identity", scores).src[:, 0],
                                [0, 2, 4, 11])


def test_importance_keeps_large_norm_neurons():
  source = _config("llama")
  params = random_params(source)
  flat = layout.flatten(params)
  flat["layers/mlp/up/weight"][:, [5, 17, 40]] *= 20
  target = source.replace(intermediate_size=3)
  maps = resize.make_maps(source, layout.unflatten(flat), target, select="weight_norm")
  np.testing.assert_array_equal(maps["F"].src[:, 0], [5, 17, 40])


def test_mismatches_are_named():
  llama, gpt2 = _config("llama"), _config("gpt2")
  params = random_params(llama)
  with pytest.raises(resize.ResizeError, match="families differ"):
    resize.shrink(llama, params, gpt2)
  with pytest.raises(resize.ResizeError, match="vocabularies differ"):
    resize.grow(llama, params, llama.replace(vocab_size=64))
  flat = layout.flatten(params)
  flat["layers/mlp/up/weight"] = flat["layers/mlp/up/weight"][:, :40]
  shapes = r"layers/mlp/up/weight.*\(2, 40, 32\).*\(2, 48, 32\)"
  with pytest.raises(resize.ResizeError, match=shapes):
    resize.shrink(llama, layout.unflatten(flat), llama)
  del flat["layers/mlp/gate/weight"]
  with pytest.raises(resize.ResizeError, match="layers/mlp/gate/weight"):
    resize.shrink(llama, layout.unflatten(flat), llama)
  with pytest.raises(resize.ResizeError, match="unknown grow method"):
    resize.grow(llama, params, llama, method="random")
