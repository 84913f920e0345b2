"""The Flax decoder against PyTorch `transformers`, family by family (fp32, 1e-4 absolute)."""

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import tiny_hf_model, torch_logits

import cbd_jax
from cbd_jax.model.config import ModelConfig, num_params

CASES = [("llama", False, 2), ("llama", True, 4), ("llama", False, 1), ("qwen2", False, 2),
         ("qwen2", True, 4), ("qwen3", False, 2), ("qwen3", True, 4), ("gpt2", False, 4),
         ("gpt2", True, 4)]


def _load(hf_model):
  with tempfile.TemporaryDirectory() as d:
    hf_model.save_pretrained(d)
    return cbd_jax.load_hf(d)


@pytest.mark.parametrize("family,tie,kv_heads", CASES)
def test_logits_match_pytorch(family, tie, kv_heads):
  hf = tiny_hf_model(family, tie=tie, kv_heads=kv_heads)
  config, params = _load(hf)
  assert config.tie_embeddings == tie and config.num_kv_heads == kv_heads
  ids = np.random.default_rng(1).integers(0, config.vocab_size, (3, 17))
  np.testing.assert_allclose(np.asarray(cbd_jax.forward(config, params, ids)),
                             torch_logits(hf, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_pytorch(family, side):
  hf = tiny_hf_model(family)
  config, params = _load(hf)
  rng = np.random.default_rng(2)
  ids = rng.integers(0, config.vocab_size, (3, 12))
  lengths = np.array([12, 7, 3])
  mask = np.zeros((3, 12), np.int64)
  for row, n in enumerate(lengths):
    if side == "left":
      mask[row, 12 - n:] = 1
    else:
      mask[row, :n] = 1
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
  ours = np.asarray(cbd_jax.forward(config, params, ids, jnp.asarray(mask), positions))
  ref = torch_logits(hf, ids, mask, positions)
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)
  # A padded row's real tokens give the same logits as that row run alone, unpadded.
  alone = np.asarray(cbd_jax.forward(config, params, ids[1:2, real[1]]))[0]
  np.testing.assert_allclose(ours[1, real[1]], alone, atol=1e-4, rtol=0)


def test_llama3_rope_scaling_matches_pytorch():
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
             "rope_theta": 5000.0}
  hf = tiny_hf_model("llama", rope_parameters=scaling)
  config, params = _load(hf)
  assert config.rope_scaling == ("llama3", 8.0, 1.0, 4.0, 16)
  ids = np.random.default_rng(3).integers(0, config.vocab_size, (2, 40))
  np.testing.assert_allclose(np.asarray(cbd_jax.forward(config, params, ids)),
                             torch_logits(hf, ids), atol=1e-4, rtol=0)


def test_bf16_compute_tracks_fp32():
  config = ModelConfig(family="qwen2", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, intermediate_size=128)
  params = cbd_jax.init_params(config, jax.random.key(0))
  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 128)
  ref = cbd_jax.forward(config, params, ids)
  low = cbd_jax.forward(config.replace(dtype="bfloat16"), params, ids)
  assert low.dtype == jnp.float32  # Logits always leave the model in fp32.
  # bf16 keeps 8 mantissa bits: errors of a few 2^-8 of the logit scale, never more.
  assert float(jnp.abs(low - ref).max()) < 4 * 2.0**-8 * float(jnp.abs(ref).max())
  assert float(jnp.abs(low - ref).max()) > 0  # It really ran in bf16.


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gpt2"])
def test_num_params_counts_every_leaf(family):
  for tie in (False, True):
    config = ModelConfig(family=family, vocab_size=50, hidden_size=32, num_layers=3, num_heads=2,
                         num_kv_heads=2 if family == "gpt2" else 1, head_dim=16,
                         intermediate_size=128 if family == "gpt2" else 48, tie_embeddings=tie,
                         max_position_embeddings=20)
    shapes = jax.eval_shape(lambda c=config: cbd_jax.init_params(c, jax.random.key(0)))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == num_params(config)


def test_remat_gives_same_logits_and_grads():
  config = ModelConfig(family="llama", vocab_size=64, num_layers=3)
  params = cbd_jax.init_params(config, jax.random.key(0))
  ids = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)

  def loss(p, c):
    return cbd_jax.forward(c, p, ids).std()

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g1 = grad(params, config)
  g2 = grad(params, config.replace(remat=True))
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_tpu_flash_attention_equals_the_xla_path():
  """The Pallas TPU kernel, run by Pallas's TPU interpreter on CPU: values and gradients."""
  from jax.experimental.pallas import tpu as pltpu

  from cbd_jax.model.decoder import tpu_flash_attention

  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 128, h, 16)), jnp.float32) for h in (4, 2, 2))
  xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=0.25)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * jnp.cos(f(q, k, v)))
  with pltpu.force_tpu_interpret_mode():
    out = tpu_flash_attention(q, k, v, 0.25)
    grads = jax.grad(loss(lambda *a: tpu_flash_attention(*a, 0.25)), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(out, xla(q, k, v), atol=1e-5)
  for got, want in zip(grads, jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v), strict=True):
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_attention_kernel_choice():
  from cbd_jax.model.decoder import attention_impl
  from cbd_jax.model.sharding import make_mesh

  assert attention_impl(jnp.bfloat16, True, 256) == "xla"  # CPU: XLA.
  pytest.importorskip("libtpu", reason="libtpu is not installed: no TPU devices to compile for")
  from cbd_jax.chain.aot import topology_devices

  with jax.set_mesh(make_mesh({"data": -1}, topology_devices("v5e:2x2"))):
    assert attention_impl(jnp.bfloat16, True, 256) == "tpu_flash"
    assert attention_impl(jnp.bfloat16, True, 100) == "xla"  # Not whole 128-token blocks.
    assert attention_impl(jnp.bfloat16, False, 256) == "xla"  # Padding mask or KV cache.
