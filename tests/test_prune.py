"""prune and importance: a link's student cut from its teacher by the activations of its units."""

import jax
import numpy as np
import pytest
from hf_models import tiny_hf_model, torch_logits

import cbd_jax
from cbd_jax import data
from cbd_jax.checkpoints import assets, gguf_cache, hf_io
from cbd_jax.evaluation import heldout
from cbd_jax.interpolation import importance, prune, resize
from cbd_jax.model import layout
from cbd_jax.model.sharding import make_mesh, tree_shardings

FAMILIES = ("llama", "qwen2", "qwen3", "gpt2")


def _rows(vocab, n=6, t=17, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (n, t))


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_shrink_at_the_teachers_own_shape_reproduces_its_logits(tmp_path, family):
  layers = {"n_layer": 3} if family == "gpt2" else {"num_hidden_layers": 3}
  hf = tiny_hf_model(family, tie=family != "qwen2", **layers)
  hf.save_pretrained(tmp_path)
  config, params = cbd_jax.load_hf(tmp_path)
  rows = _rows(config.vocab_size)
  out, info = prune.shrink(config, params, config, "activation", rows)
  flat_in, flat_out = layout.flatten(params), layout.flatten(out)
  # The units really moved (a permutation that is the identity would prove nothing) ...
  assert any(not np.array_equal(np.asarray(flat_in[k]), flat_out[k]) for k in flat_in)
  # ... and the function is PyTorch's, to the tolerance of every parity test.
  ids = _rows(config.vocab_size, 2, 10, seed=1)
  np.testing.assert_allclose(np.asarray(cbd_jax.forward(config, out, ids)), torch_logits(hf, ids),
                             atol=1e-4, rtol=1e-4)
  assert info["layers"] == list(range(config.num_layers))


def test_scores_follow_the_units_and_layers_that_the_data_uses():
  config = cbd_jax.ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4,
                               num_kv_heads=2, head_dim=8, intermediate_size=48)
  params = jax.tree.map(np.array, cbd_jax.init_params(config, jax.random.key(0)))
  params["layers"]["mlp"]["up"]["weight"][1, 7] = 0.0  # Neuron 7 of layer 1: silu(g) * 0 = 0.
  params["layers"]["attn"]["v"]["weight"][2, 1] = 0.0  # kv group 1 of layer 2: heads 2, 3 = 0.
  for leaf in ("weight",):  # Layer 0 writes nothing: an identity, block influence 0.
    params["layers"]["attn"]["o"][leaf][0] = 0.0
    params["layers"]["mlp"]["down"][leaf][0] = 0.0
  params["embed"]["embedding"][:, 5] *= 10.0  # Channel 5 dominates the residual stream.
  scores = importance.activation_scores(config, params, _rows(64))
  assert np.argmin(scores["F"][1]) == 7 and scores["F"][1][7] == 0.0
  assert scores["H"][2][2] == scores["H"][2][3] == 0.0 and np.argmin(scores["K"][2]) == 1
  assert scores["L"][0] == pytest.approx(0.0, abs=1e-6) and scores["L"][1:].min() > 1e-3
  assert np.argmax(scores["D"]) == 5
  target = config.replace(num_layers=2, intermediate_size=40, num_heads=2, num_kv_heads=1)
  out, info = prune.shrink(config, params, target, "activation", _rows(64))
  assert info["layers"] == [1, 2]  # The identity layer goes first.
  # Layer 1 kept 40 neurons, none of them the dead one: no all-zero row survives in up.
  assert (np.abs(out["layers"]["mlp"]["up"]["weight"][0]).sum(-1) > 0).all()
  # Layer 2 kept its live kv group: v is not zero.
  assert np.abs(out["layers"]["attn"]["v"]["weight"][1]).sum() > 0


@pytest.fixture(scope="module")
def smollm2():
  folder = gguf_cache.hf_folder(assets.smollm2_gguf())
  config, params = hf_io.load_hf_numpy(folder)
  tokenizer = hf_io.load_tokenizer(folder)
  rows = heldout.load_token_rows(tokenizer, assets.english_text()["train"], 16 * 65, 64)
  return config, params, rows


def test_activation_units_beat_leading_units_on_the_real_teacher(smollm2):
  """Width cut of the real SmolLM2-135M (channels, FFN neurons, kv groups): units chosen by their
  activations on 8 training rows lose less on 8 other training rows than the leading units."""
  config, params, rows = smollm2
  target = config.replace(hidden_size=448, intermediate_size=1024, num_heads=6, num_kv_heads=2)
  calib, check = rows[:8], rows[8:]
  loss = {}
  for method in ("activation", "leading"):
    out, _ = prune.shrink(config, params, target, method, calib, layers="even")
    loss[method] = heldout.mean_nll(target, out, check)
  assert loss["activation"] < loss["leading"] - 0.5, loss


def test_scores_are_the_same_with_params_sharded_over_eight_devices(smollm2):
  config, params, rows = smollm2
  config = config.replace(num_layers=3)
  params = jax.tree.map(lambda x: x, params)
  params["layers"] = jax.tree.map(lambda x: x[:3], params["layers"])
  one = importance.activation_stats(config, params, rows[:8])
  mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  sharded = jax.device_put(params, tree_shardings(params, mesh))
  assert len(jax.tree.leaves(sharded)[0].sharding.device_set) > 1
  eight = importance.activation_stats(config, sharded, rows[:8])
  for key in one:
    np.testing.assert_allclose(eight[key], one[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_calibration_rows_are_the_first_training_batches_and_never_held_out():
  tokens = np.arange(40 * 9, dtype=np.uint32)  # 40 sequences of 8 + 1 tokens, each unique.
  train = data.PackedTokens(tokens, 8, seed=3, rows=slice(0, 36))  # The last 4 are held out.

  class Link:
    seq_len, microbatches, batch_size = 8, 1, 4

  rows = data.calibration_rows(train, Link, tokens=80)
  assert rows.shape == (10, 9)
  first = [train.batch(s, 1, 4) for s in range(3)]
  want = np.concatenate([np.concatenate([b["ids"][0], b["labels"][0][:, -1:]], -1)
                         for b in first])[:10]
  np.testing.assert_array_equal(rows, want)
  held = set((tokens.reshape(40, 9)[36:, 0]).tolist())
  assert not held & set(rows[:, 0].tolist())


def test_bad_shrink_settings_are_refused_in_one_line():
  config = cbd_jax.ModelConfig()
  with pytest.raises(ValueError, match="unknown shrink 'magic'"):
    prune.shrink(config, None, config, "magic")
  with pytest.raises(ValueError, match="needs calibration rows"):
    prune.shrink(config, None, config, "activation")

  class Link(dict):
    get = dict.get

  with pytest.raises(ValueError, match="shrink_layers='best'"):
    prune.check_link(Link(shrink="activation", shrink_layers="best"), "link x")
  with pytest.raises(ValueError, match="calib_tokens=0"):
    prune.check_link(Link(calib_tokens=0), "link x")


def test_refit_is_exact_when_the_cut_units_copy_kept_ones():
  """FFN neuron 5 copies neuron 3 in every layer (both weak, so 5 is cut): the refitted down
  weights make the cut model compute the full one's function."""
  config = cbd_jax.ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                               num_kv_heads=1, head_dim=8, intermediate_size=24)
  params = jax.tree.map(np.array, cbd_jax.init_params(config, jax.random.key(1)))
  mlp = params["layers"]["mlp"]
  for leaf in ("gate", "up"):
    mlp[leaf]["weight"][:, 3] *= 0.05
    mlp[leaf]["weight"][:, 5] = mlp[leaf]["weight"][:, 3]
  mlp["down"]["weight"][:, :, 5] *= 400.0  # What neuron 5 writes matters.
  rows = _rows(64, n=32, t=17)
  target = config.replace(intermediate_size=23)
  scores = importance.activation_scores(config, params, rows)
  for layer in range(2):  # The copies are the weakest; 5 ranks after 3 (a stable sort).
    assert np.argsort(scores["F"][layer])[:2].tolist() == [3, 5]
  ordered = prune.order_units(config, params, scores)
  cut = resize.resize(config, ordered, target, layer_map=resize.one_hot_map([0, 1]))
  refit = prune.refit_outputs(config, ordered, cut, target, np.arange(2), rows, ridge=1e-9)
  ids = _rows(64, 2, 12, seed=5)
  full = np.asarray(cbd_jax.forward(config, params, ids))
  np.testing.assert_allclose(np.asarray(cbd_jax.forward(target, refit, ids)), full, atol=2e-4)
  assert np.abs(np.asarray(cbd_jax.forward(target, cut, ids)) - full).max() > 1e-3
