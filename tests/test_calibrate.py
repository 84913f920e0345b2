"""Calibrated targets: anchors reproduced at their own shapes, the "output" mix, layer choices."""

import jax
import numpy as np
import pytest
from random_params import random_params

from cbd_jax.interpolation import align, calibrate, importance, mixing, resize
from cbd_jax.model import decoder, layout
from cbd_jax.model.config import FAMILIES, ModelConfig


def _config(family, **kw):
  base = dict(family=family, vocab_size=53, hidden_size=32, num_layers=3, num_heads=4,
              num_kv_heads=2, head_dim=8, intermediate_size=48, max_position_embeddings=24,
              tie_embeddings=family == "gpt2")
  return ModelConfig(**{**base, **kw})


def _chain(family="llama"):
  """A large anchor and a small one cut from it (scattered units, like an importance Shrink)
  and perturbed, as a chain's anchors are."""
  large_config = _config(family, num_layers=6, hidden_size=48, num_heads=6, num_kv_heads=3,
                         intermediate_size=96)
  small_config = _config(family)
  large = random_params(large_config, 1)
  small = resize.shrink(large_config, large, small_config, method="weight_norm")
  rng = np.random.default_rng(2)
  small = jax.tree.map(lambda x: x + 0.02 * rng.standard_normal(x.shape).astype(x.dtype), small)
  return (small_config, small), (large_config, large)


IDS = np.random.default_rng(3).integers(0, 53, (4, 9))


def _ce(config, params, rows):
  """Mean next-token cross entropy over the real vocabulary, in float64 numpy from the logits."""
  z = np.asarray(decoder.forward(config, params, rows[:, :-1]), np.float64)
  z = z[..., :config.vocab_limit]
  logp = z - z.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  return float(-np.take_along_axis(logp, rows[:, 1:, None], -1).mean())


def _same_function(config, params, want):
  np.testing.assert_allclose(decoder.forward(config, params, IDS[:, :-1]),
                             decoder.forward(config, want, IDS[:, :-1]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_mix_at_an_anchors_shape_is_that_anchor(family):
  """make_target returns an anchor's own weights at its shape; the mixing path it skips (units
  aligned, Grow, Shrink, the output mix) must give the same function there: the small anchor at
  alpha = 1, the large one at alpha = 0."""
  small, large = _chain(family)
  _same_function(small[0], mixing.interpolate(small, large, small[0], 1.0), small[1])
  _same_function(large[0], mixing.interpolate(small, large, large[0], 0.0), large[1])
  for anchor, alpha in ((small, 1.0), (large, 0.0)):
    params, info = calibrate.make_target(small, large, anchor[0], rows=IDS, log=str)
    jax.tree.map(np.testing.assert_array_equal, params, anchor[1])
    assert info["alpha"] == alpha


@pytest.mark.parametrize("family", FAMILIES)
def test_output_mix_is_the_small_anchor_at_alpha_one_and_shrink_at_zero(family):
  small, large = _chain(family)
  target = small[0].replace(num_layers=5, hidden_size=40, num_heads=5, num_kv_heads=5,
                            intermediate_size=64)
  views = mixing.anchor_views(small, large, target)
  ids = IDS[:, :-1]
  want = decoder.forward(small[0], small[1], ids)
  if family in ("gpt2",):  # LayerNorm averages over the new channels: not function-preserving.
    views = mixing.anchor_views(small, large, target.replace(hidden_size=32, num_heads=4,
                                                             num_kv_heads=4))
    target = target.replace(hidden_size=32, num_heads=4, num_kv_heads=4)
  else:
    views = mixing.anchor_views(small, large, target, rescale_norms=True)
  got = decoder.forward(target, mixing.mix_views(views, 1.0, "output"), ids)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
  jax.tree.map(np.testing.assert_array_equal, mixing.mix_views(views, 0.0, "output"), views.shrunk)


@pytest.mark.parametrize("gamma", [None, 0.8])
def test_output_mix_scales_only_what_padded_units_write(gamma):
  """Units only the large anchor has (new layers, new FFN neurons) read whole and write 1 - alpha
  of their output, or gamma of it when given; shared units are alpha * grown + (1 - alpha) *
  shrunk."""
  small, large = _chain()
  target = small[0].replace(num_layers=5, intermediate_size=64)
  views = mixing.anchor_views(small, large, target)
  alpha = 0.3
  share = 1 - alpha if gamma is None else gamma
  out = layout.flatten(mixing.mix_views(views, alpha, "output", gamma=gamma))
  shrunk, grown = layout.flatten(views.shrunk), layout.flatten(views.grown)
  new_layers = np.flatnonzero(np.all(grown["layers/attn/q/weight"] == 0, axis=(1, 2, 3)))
  assert len(new_layers) == 2
  for path, x in out.items():
    if not path.startswith("layers/"):
      continue
    scale = share if path in ("layers/attn/o/weight", "layers/mlp/down/weight") else 1.0
    np.testing.assert_allclose(x[new_layers], scale * shrunk[path][new_layers], atol=1e-7,
                               err_msg=path)
  kept = np.setdiff1d(np.arange(5), new_layers)
  up, down = out["layers/mlp/up/weight"][kept], out["layers/mlp/down/weight"][kept]
  s_up, s_down = shrunk["layers/mlp/up/weight"][kept], shrunk["layers/mlp/down/weight"][kept]
  np.testing.assert_array_equal(up[:, 48:], s_up[:, 48:])  # New neurons read whole ...
  np.testing.assert_allclose(down[..., 48:], share * s_down[..., 48:], atol=1e-7)
  np.testing.assert_allclose(up[:, :48], alpha * layout.flatten(views.grown)[
      "layers/mlp/up/weight"][kept][:, :48] + (1 - alpha) * s_up[:, :48], atol=1e-6)


@pytest.mark.parametrize("family", ("llama", "gpt2"))
def test_alpha_gamma_and_layers_are_chosen_by_the_loss_on_the_first_half_of_the_rows(family):
  """Layers by Shrink(large)'s loss, then alpha (gamma = 1 - alpha), then gamma at that alpha:
  every recorded loss recomputed in float64 from the logits, each choice the grid's minimum,
  gamma kept over 1 - alpha exactly when the check half shows a clear gain, and the target the
  mix at the kept alpha and gamma."""
  small, large = _chain(family)
  target = small[0].replace(num_layers=4, hidden_size=40, num_heads=5, num_kv_heads=5,
                            intermediate_size=64)
  lines = []
  params, info = calibrate.make_target(small, large, target, calibrate.Recipe(gains=False),
                                       rows=IDS, log=lines.append)
  first = IDS[:2]  # The choice half of the 4 rows.
  views = {}
  for choice, layers in calibrate.layer_sets(small, (large[0], align.align_units(
      *small, *large)), target, first).items():
    views[choice] = mixing.anchor_views(small, large, target, rescale_norms=True,
                                        large_layers=layers)
    recomputed = _ce(target, mixing.mix_views(views[choice], 0.0), first)
    assert info["layer_losses"][choice] == pytest.approx(recomputed, rel=1e-5), choice
  assert set(views) == {"even", "influence", "greedy"}
  assert info["layer_losses"][info["layer_choice"]] == min(info["layer_losses"].values())
  chosen = views[info["layer_choice"]]
  grid = {a: _ce(target, mixing.mix_views(chosen, a), first) for a in info["alpha_losses"]}
  assert {0.0, 0.25, 0.5, 0.75, 1.0} <= set(grid) and len(grid) >= 7  # Grid, then refinements.
  for a, loss in grid.items():
    assert info["alpha_losses"][a] == pytest.approx(loss, rel=1e-5), a
    assert grid[info["alpha"]] <= loss + 1e-9, (info["alpha"], a)
  alpha = info["alpha"]
  shares = {g: _ce(target, mixing.mix_views(chosen, alpha, gamma=g), first)
            for g in info["gamma_losses"]}
  assert {0.0, 0.25, 0.5, 0.75, 1.0, round(1 - alpha, 4)} <= set(shares) and len(shares) >= 7
  for g, loss in shares.items():
    assert info["gamma_losses"][g] == pytest.approx(loss, rel=1e-5), g
  best = min(shares, key=shares.get)
  assert shares[best] <= grid[alpha] + 1e-9  # The search is never worse than 1 - alpha.
  d = np.array([_ce(target, mixing.mix_views(chosen, alpha), row[None])
                - _ce(target, mixing.mix_views(chosen, alpha, gamma=best), row[None])
                for row in IDS[2:]])
  clear = best != round(1 - alpha, 4) and d.mean() > 2 * d.std(ddof=1) / np.sqrt(len(d))
  assert info["gamma"] == (best if clear else None)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-7), params,
               mixing.mix_views(chosen, alpha, gamma=info["gamma"]))
  assert np.isfinite(np.asarray(decoder.forward(target, params, IDS))).all()
  assert any(f"alpha = {info['alpha']:.4f}" in line for line in lines)


def test_residual_gains_bring_the_target_towards_the_large_anchor_without_vocab_sized_tensors(
    monkeypatch):
  """The KL the gains are fitted on is that of a numpy recomputation, it falls, and no
  log-softmax ever runs over all [N, T, V] logits at once (chunks of 256 tokens)."""
  small, large = _chain()
  target = small[0].replace(num_layers=4, intermediate_size=64)
  params = mixing.mix_views(mixing.anchor_views(small, large, target), 0.5, "output")
  rows = np.random.default_rng(5).integers(0, 53, (8, 66))  # 520 tokens, a shape of its own.
  seen = []
  real = jax.nn.log_softmax
  monkeypatch.setattr(jax.nn, "log_softmax",
                      lambda x, *a, **k: seen.append(np.prod(x.shape[:-1])) or real(x, *a, **k))
  gains, kls = calibrate.fit_residual_gains(target, params, large, rows, steps=8)
  monkeypatch.undo()
  assert seen and max(seen) <= 256 < rows[:, 1:].size
  zp = np.asarray(decoder.forward(*large, rows[:, :-1]), np.float64)
  zq = np.asarray(decoder.forward(target, params, rows[:, :-1]), np.float64)
  logp, logq = (z - z.max(-1, keepdims=True) for z in (zp, zq))
  logp, logq = (x - np.log(np.exp(x).sum(-1, keepdims=True)) for x in (logp, logq))
  assert kls[0] == pytest.approx(float((np.exp(logp) * (logp - logq)).sum(-1).mean()), rel=1e-5)
  assert gains.shape == (4, 2) and np.all(np.diff(kls) < 0) and kls[-1] < 0.95 * kls[0]
  # scale_outputs multiplies exactly the o and down weights of each layer.
  scaled = layout.flatten(calibrate.scale_outputs(params, gains))
  flat = layout.flatten(params)
  for path, x in scaled.items():
    if path == "layers/attn/o/weight":
      np.testing.assert_allclose(x, flat[path] * gains[:, 0, None, None, None], rtol=1e-6)
    elif path == "layers/mlp/down/weight":
      np.testing.assert_allclose(x, flat[path] * gains[:, 1, None, None], rtol=1e-6)
    else:
      np.testing.assert_array_equal(x, flat[path])


def test_the_check_rows_decide_only_whether_gamma_and_the_gains_are_kept():
  """Calibration rows [choice half | check half]: changing the check half changes no choice
  (layers, alpha, the searched gamma; the fitted gains, for the same kept gamma); the check
  losses are the target's loss on the check half with and without the gains, and the gains are
  kept exactly when the per-row improvements are clear: mean above two standard errors
  (recomputed here in float64 from the logits; the rule itself:
  `test_a_clear_gain_needs_more_than_a_lower_mean`)."""
  small, large = _chain()
  target = small[0].replace(num_layers=5, intermediate_size=64)
  rng = np.random.default_rng(6)
  first, checks = IDS[:2], [rng.integers(0, 53, (2, 9)) for _ in range(3)]
  runs = [(check, *calibrate.make_target(small, large, target,
                                         rows=np.concatenate([first, check]), log=str))
          for check in checks]
  for key in ("large_layers", "layer_losses", "alpha_losses", "gamma_losses"):
    assert len({str(info.get(key)) for _, _, info in runs}) == 1, key
  for key in ("gain_alpha", "gain_gamma", "fitted_gains"):  # Given the gamma the check kept.
    assert len({(info["mix_gamma"], str(info[key])) for _, _, info in runs}) == len(
        {info["mix_gamma"] for _, _, info in runs}), key
  for check, params, info in runs:
    views = mixing.anchor_views(small, large, target, rescale_norms=True,
                                large_layers=info["large_layers"])
    plain = mixing.mix_views(views, min(info["alpha_losses"], key=info["alpha_losses"].get),
                             gamma=info["mix_gamma"])
    gained = calibrate.scale_outputs(
        mixing.mix_views(views, info["gain_alpha"], gamma=info["gain_gamma"]),
        np.asarray(info["fitted_gains"], np.float32))
    before, after = info["gain_check_losses"]
    assert before == pytest.approx(_ce(target, plain, check), rel=1e-5)
    assert after == pytest.approx(_ce(target, gained, check), rel=1e-5)
    d = np.array([_ce(target, plain, row[None]) - _ce(target, gained, row[None])
                  for row in check])
    clear = d.mean() > 2 * d.std(ddof=1) / np.sqrt(len(d))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), params,
                 gained if clear else plain)
    assert (info["gains"] is not None) == clear


def test_a_clear_gain_needs_more_than_a_lower_mean():
  """A lower mean loss that one row carries (the others worse) is not clear; the same mean
  lowered on every row is."""
  before = np.array([5.0, 5.0, 5.0, 5.0])
  assert calibrate.clear_gain(before, before - 0.01)
  assert not calibrate.clear_gain(before, np.array([4.0, 5.2, 5.2, 5.2]))
  assert not calibrate.clear_gain(before, before)
  assert not calibrate.clear_gain(before[:1], before[:1] - 1.0)  # One row: no noise estimate.


@pytest.mark.parametrize("family", ("llama", "qwen2", "qwen3"))
def test_a_wider_target_at_alpha_one_is_the_small_anchor(family):
  """RMSNorm families: the default recipe's Grow rescales the norms, so alpha = 1 on a target
  with more residual channels computes the small anchor's logits; without the rescale it does
  not (the padded channels shrink every root mean square)."""
  small, large = _chain(family)
  target = small[0].replace(num_layers=5, hidden_size=40, num_heads=5, num_kv_heads=5,
                            intermediate_size=64)
  want = np.asarray(decoder.forward(*small, IDS[:, :-1]))
  got = {}
  for rescale in (None, False):
    recipe = calibrate.Recipe(alpha=1.0, gains=False, rescale_norms=rescale)
    params, _ = calibrate.make_target(small, large, target, recipe, rows=IDS, log=str)
    got[rescale] = np.asarray(decoder.forward(target, params, IDS[:, :-1]))
  np.testing.assert_allclose(got[None], want, atol=2e-4, rtol=0)
  assert np.abs(got[False] - want).max() > 1e-2


@pytest.mark.parametrize("family", ("llama", "qwen3"))
def test_the_calibrated_target_is_no_worse_than_the_small_anchor_on_its_choice_rows(family):
  small, large = _chain(family)
  target = small[0].replace(num_layers=5, hidden_size=40, num_heads=5, num_kv_heads=5,
                            intermediate_size=64)
  params, _ = calibrate.make_target(small, large, target, calibrate.Recipe(gains=False),
                                    rows=IDS, log=str)
  first = IDS[:2]
  assert _ce(target, params, first) <= _ce(*small, first) + 1e-5


def test_explicit_layer_choices_without_calibration_rows_are_refused():
  small, large = _chain()
  target = small[0].replace(num_layers=5)
  for recipe, rows in ((calibrate.Recipe(layers="greedy"), None),
                       (calibrate.Recipe(layers="influence", method="paper"), IDS),
                       (calibrate.Recipe(layers="greedy", align_layers=False), IDS)):
    with pytest.raises(ValueError, match=r"^layers='\w+' ranks the large anchor's layers on "
                                         r"calibration rows, but .*; pass --layers auto or even"):
      calibrate.make_target(small, large, target, recipe, rows=rows, log=str)
  _, info = calibrate.make_target(small, large, target, calibrate.Recipe(layers="even"), log=str)
  assert info["layer_choice"] == "even"


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
  assert info["calibration_tokens"] == 0 and info["mix"] == "plain"
  want = mixing.interpolate(small, large, target, mix="plain")
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-7), paper, want)


def test_on_anchors_cut_from_smollm2_the_calibrated_target_beats_the_paper_formula():
  """A tiny real chain: SmolLM2-135M's 24 most influential layers (the large anchor) and that
  anchor's 18 most influential (the small one). The 21-layer target, calibrated on training text
  (layers and alpha; the gains are left out to keep this quick), has a held-out perplexity on
  news text between its anchors' and below that of the paper's formula."""
  import math

  from cbd_jax.checkpoints import assets, gguf_cache, hf_io
  from cbd_jax.evaluation import heldout

  folder = gguf_cache.hf_folder(assets.smollm2_gguf())
  config, params = hf_io.load_hf_numpy(folder)
  tokenizer = hf_io.load_tokenizer(folder)
  text = assets.english_text()
  # 16 rows of 16 tokens: choices on 8 rows (one batch of the loss, no padding), checks on 8.
  calib = heldout.load_token_rows(tokenizer, text["train"], 16 * 17, 16)
  rows = heldout.load_token_rows(tokenizer, text["heldout"], 8 * 65, 64)

  def cut(anchor, n):
    c, p = anchor
    keep = np.sort(np.argsort(-importance.block_influence(c, p, calib), kind="stable")[:n])
    return c.replace(num_layers=n), resize.resize(c, p, c.replace(num_layers=n),
                                                  layer_map=resize.one_hot_map(keep))

  large = cut((config, params), 24)
  small = cut(large, 18)
  target = config.replace(num_layers=21)
  ppl = {name: math.exp(heldout.mean_nll(*model_, rows)) for name, model_ in (
      ("small", small), ("large", large))}
  for method in ("cbd", "paper"):
    recipe = calibrate.Recipe(method=method, gains=False)
    mixed, _ = calibrate.make_target(small, large, target, recipe, rows=calib, log=str)
    ppl[method] = math.exp(heldout.mean_nll(target, mixed, rows))
  assert ppl["large"] < ppl["cbd"] < ppl["small"], ppl
  assert ppl["cbd"] < 0.8 * ppl["paper"], ppl  # Measured: 224 against 466 (anchors 127, 474).


def test_greedy_layers_keep_the_counterparts_and_drop_the_least_influential():
  small, large = _chain()
  aligned = (large[0], align.align_units(*small, *large))
  m = align.depth_counterparts(*small, *aligned)
  layers = importance.greedy_layers(*aligned, 4, IDS, keep=m)
  assert len(layers) == 4 and np.isin(m, layers).all() and np.all(np.diff(layers) > 0)
  # A layer whose o and down are zero is an identity: block influence 0, dropped first.
  flat = layout.flatten(aligned[1])
  free = np.setdiff1d(np.arange(6), m)
  for path in ("layers/attn/o/weight", "layers/mlp/down/weight"):
    flat[path] = np.array(flat[path])
    flat[path][free[-1]] = 0
  scores = importance.block_influence(large[0], layout.unflatten(flat), IDS)
  assert scores[free[-1]] == pytest.approx(0.0, abs=1e-6) and scores.min() >= -1e-6
  kept = importance.greedy_layers(large[0], layout.unflatten(flat), 5, IDS, keep=m)
  assert free[-1] not in kept


def test_bad_recipes_are_refused():
  with pytest.raises(ValueError, match="unknown method"):
    calibrate.Recipe(method="magic")
  with pytest.raises(ValueError, match="unknown layers"):
    calibrate.Recipe(layers="best")
  with pytest.raises(ValueError, match="outside"):
    calibrate.Recipe(alpha=2.0)
  with pytest.raises(ValueError, match="gamma=1.5: .* in \\[0, 1\\]"):
    calibrate.Recipe(gamma=1.5)
  with pytest.raises(ValueError, match="only the output mix"):
    calibrate.Recipe(mix="plain", gamma=0.5)


def test_of_several_shapes_the_target_with_the_lowest_calibration_loss_is_kept():
  """make_sized_target keeps, among candidate shapes of one size, the target whose loss on the
  choice half of the rows (recomputed in float64) is lowest; without rows, the first shape."""
  small, large = _chain()
  shapes = [small[0].replace(num_layers=5, intermediate_size=64),
            large[0].replace(num_layers=3, intermediate_size=64)]
  lines = []
  shape, params, info = calibrate.make_sized_target(small, large, shapes,
                                                    calibrate.Recipe(gains=False), IDS,
                                                    lines.append)
  losses = []
  for candidate in shapes:
    p, _ = calibrate.make_target(small, large, candidate, calibrate.Recipe(gains=False), IDS,
                                 log=str)
    losses.append(_ce(candidate, p, IDS[:2]))
  best = int(np.argmin(losses))
  assert shape == shapes[best]
  assert sorted(info["shape_losses"].values()) == pytest.approx(sorted(losses), rel=1e-5)
  assert _ce(shape, params, IDS[:2]) == pytest.approx(losses[best], rel=1e-5)
  assert any(line.startswith("target shape: ") for line in lines)
  first, _, _ = calibrate.make_sized_target(small, large, shapes, calibrate.Recipe(gains=False),
                                            None, log=str)
  assert first == shapes[0]
