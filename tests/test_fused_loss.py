"""The fused chunked head-and-loss equals the naive logits path in value and gradient."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cbd_jax import fused_loss, losses

B, T, D, DT, V = 2, 13, 8, 12, 40
LIMIT = 35
CHUNK = 6  # 3 positions per chunk for B = 2: 5 chunks, the last one padded.
TEMPERATURE = 1.5


def _inputs(seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  return {
      "hs": jax.random.normal(ks[0], (B, T, D)),
      "ws": 0.7 * jax.random.normal(ks[1], (V, D)),
      "ht": jax.random.normal(ks[2], (B, T, DT)),
      "wt": 0.7 * jax.random.normal(ks[3], (V, DT)),
      "mask": np.asarray(jax.random.bernoulli(ks[4], 0.7, (B, T))),
      "labels": np.asarray(jax.random.randint(ks[5], (B, T), -1, LIMIT)),
  }


def _naive_kd(x, kind):
  def f(hs, ws):
    return losses.kd_loss_sum(hs @ ws.T, x["ht"] @ x["wt"].T, kind, TEMPERATURE, x["mask"],
                              LIMIT)[0]
  return f


def _fused_kd(x, kind, chunk=CHUNK):
  def f(hs, ws):
    return fused_loss.fused_kd_loss(hs, ws, x["ht"], x["wt"], kind, TEMPERATURE, x["mask"],
                                    LIMIT, chunk)[0]
  return f


def _assert_close(got, want, rtol=1e-5):
  """Relative to the largest entry, so near-zero entries do not dominate."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(np.abs(want).max(), 1e-30)
  assert np.abs(got - want).max() <= rtol * scale, np.abs(got - want).max() / scale


@pytest.mark.parametrize("kind", losses.KINDS)
def test_fused_kd_equals_naive_in_value_and_gradient(kind):
  x = _inputs()
  want, want_g = jax.jit(jax.value_and_grad(_naive_kd(x, kind), (0, 1)))(x["hs"], x["ws"])
  got, got_g = jax.jit(jax.value_and_grad(_fused_kd(x, kind), (0, 1)))(x["hs"], x["ws"])
  _assert_close(got, want)
  for g, w in zip(got_g, want_g, strict=True):
    _assert_close(g, w)
  assert got_g[1].dtype == jnp.float32


def test_forward_only_path_and_count():
  x = _inputs(1)
  total, count = jax.jit(fused_loss.fused_kd_loss, static_argnums=(4, 7, 8))(
      x["hs"], x["ws"], x["ht"], x["wt"], "fkl", TEMPERATURE, x["mask"], LIMIT, CHUNK)
  _assert_close(total, _naive_kd(x, "fkl")(x["hs"], x["ws"]))
  assert float(count) == x["mask"].sum()


@pytest.mark.parametrize("chunk", [1, 4096])
def test_chunk_size_does_not_change_the_result(chunk):
  x = _inputs(2)
  want, want_g = jax.jit(jax.value_and_grad(_naive_kd(x, "rkl"), (0, 1)))(x["hs"], x["ws"])
  got, got_g = jax.jit(jax.value_and_grad(_fused_kd(x, "rkl", chunk), (0, 1)))(x["hs"], x["ws"])
  _assert_close(got, want)
  for g, w in zip(got_g, want_g, strict=True):
    _assert_close(g, w)


def test_fused_cross_entropy_and_the_weighted_mix():
  x = _inputs(3)

  def naive(hs, ws):
    kd = losses.kd_loss_sum(hs @ ws.T, x["ht"] @ x["wt"].T, "fkl", 2.0, x["mask"], LIMIT)[0]
    ce = losses.cross_entropy_sum(hs @ ws.T, x["labels"], x["mask"], LIMIT)[0]
    return 0.3 * kd + 0.9 * ce

  def fused(hs, ws):
    return fused_loss.fused_distill_loss(
        hs, ws, x["ht"], x["wt"], x["labels"], kind="fkl", temperature=2.0, mask=x["mask"],
        vocab_limit=LIMIT, kd_weight=0.3, ce_weight=0.9, chunk_size=CHUNK)[0]

  want, want_g = jax.jit(jax.value_and_grad(naive, (0, 1)))(x["hs"], x["ws"])
  got, got_g = jax.jit(jax.value_and_grad(fused, (0, 1)))(x["hs"], x["ws"])
  _assert_close(got, want)
  for g, w in zip(got_g, want_g, strict=True):
    _assert_close(g, w)
  ce_sum, ce_count = fused_loss.fused_cross_entropy(x["hs"], x["ws"], x["labels"], x["mask"],
                                                    LIMIT, CHUNK)
  want_ce = losses.cross_entropy_sum(x["hs"] @ x["ws"].T, x["labels"], x["mask"], LIMIT)
  _assert_close(ce_sum, want_ce[0])
  assert float(ce_count) == float(want_ce[1]) == (x["mask"] & (x["labels"] >= 0)).sum()
  _, metrics = fused_loss.fused_distill_loss(x["hs"], x["ws"], x["ht"], x["wt"], x["labels"],
                                             mask=x["mask"], vocab_limit=LIMIT, chunk_size=CHUNK)
  _assert_close(metrics["ce_sum"], want_ce[0])


def test_traced_weights_and_temperature_scale_the_gradient():
  x = _inputs(4)

  def fused(hs, scale):
    return fused_loss.fused_distill_loss(hs, x["ws"], x["ht"], x["wt"], temperature=scale,
                                         kd_weight=1.0 / scale, chunk_size=CHUNK)[0]

  def naive(hs, scale):
    return losses.kd_loss_sum(hs @ x["ws"].T, x["ht"] @ x["wt"].T, "fkl", scale)[0] / scale

  got = jax.jit(jax.grad(fused))(x["hs"], jnp.float32(2.0))
  _assert_close(got, jax.grad(naive)(x["hs"], 2.0))


def test_fused_topk_equals_naive_topk():
  x = _inputs(5)
  idx, logp = losses.topk_teacher(x["ht"] @ x["wt"].T, 5, TEMPERATURE, LIMIT)

  def naive(hs, ws):
    return losses.kd_loss_topk_sum(hs @ ws.T, idx, logp, "jsd", TEMPERATURE, x["mask"], LIMIT)[0]

  def fused(hs, ws):
    return fused_loss.fused_kd_loss_topk(hs, ws, idx, logp, "jsd", TEMPERATURE, x["mask"], LIMIT,
                                         CHUNK)[0]

  want, want_g = jax.jit(jax.value_and_grad(naive, (0, 1)))(x["hs"], x["ws"])
  got, got_g = jax.jit(jax.value_and_grad(fused, (0, 1)))(x["hs"], x["ws"])
  _assert_close(got, want)
  for g, w in zip(got_g, want_g, strict=True):
    _assert_close(g, w)


def test_teacher_gets_zero_gradient():
  x = _inputs(6)

  def f(ht, wt):
    return fused_loss.fused_kd_loss(x["hs"], x["ws"], ht, wt, chunk_size=CHUNK)[0]

  g_ht, g_wt = jax.grad(f, (0, 1))(x["ht"], x["wt"])
  assert not np.asarray(g_ht).any() and not np.asarray(g_wt).any()


def test_bfloat16_inputs_give_float32_loss_and_input_dtype_gradients():
  x = _inputs(7)
  bf = {k: x[k].astype(jnp.bfloat16) for k in ("hs", "ws", "ht", "wt")}
  f32 = {k: v.astype(jnp.float32) for k, v in bf.items()}
  f32.update(mask=x["mask"])
  total, grads = jax.value_and_grad(
      lambda hs, ws: fused_loss.fused_kd_loss(hs, ws, bf["ht"], bf["wt"], mask=x["mask"],
                                              chunk_size=CHUNK)[0], (0, 1))(bf["hs"], bf["ws"])
  assert total.dtype == jnp.float32
  assert grads[0].dtype == grads[1].dtype == jnp.bfloat16
  want = losses.kd_loss_sum(f32["hs"] @ f32["ws"].T, f32["ht"] @ f32["wt"].T, mask=x["mask"])[0]
  _assert_close(total, want)


def _largest_array(compiled_text: str) -> int:
  sizes = [int(np.prod([int(d) for d in dims.split(",") if d]))
           for dims in re.findall(r"f32\[([\d,]*)\]", compiled_text)]
  return max(sizes)


def test_no_full_logits_tensor_exists_and_the_check_would_see_one():
  x = _inputs(8)
  args = (x["hs"], x["ws"])
  fused_hlo = jax.jit(jax.grad(_fused_kd(x, "fkl"), (0, 1))).lower(*args).compile().as_text()
  naive_hlo = jax.jit(jax.grad(_naive_kd(x, "fkl"), (0, 1))).lower(*args).compile().as_text()
  assert _largest_array(naive_hlo) >= B * T * V
  assert _largest_array(fused_hlo) <= max(B * 3 * V, V * max(D, DT))


def test_sharded_head_and_batch_on_a_mesh_match_unsharded():
  mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  x = _inputs(9)
  vocab = NamedSharding(mesh, P("tensor", None))
  batch = NamedSharding(mesh, P("data", None, None))
  f = jax.value_and_grad(_fused_kd(x, "skew_rkl"), (0, 1))
  want, want_g = f(x["hs"], x["ws"])
  step = jax.jit(f, in_shardings=(batch, vocab), out_shardings=(None, (batch, vocab)))
  got, got_g = step(jax.device_put(x["hs"], batch), jax.device_put(x["ws"], vocab))
  _assert_close(got, want)
  for g, w in zip(got_g, want_g, strict=True):
    _assert_close(g, w)
  assert got_g[1].sharding.is_equivalent_to(vocab, 2)
  model = NamedSharding(mesh, P(None, "tensor"))  # head sharded over the hidden dimension
  step = jax.jit(f, in_shardings=(batch, model))
  got, got_g = step(jax.device_put(x["hs"], batch), jax.device_put(x["ws"], model))
  _assert_close(got, want)
  for g, w in zip(got_g, want_g, strict=True):
    _assert_close(g, w)


def test_bad_shapes_raise_one_line_errors():
  x = _inputs(10)
  with pytest.raises(ValueError, match="head must be"):
    fused_loss.fused_kd_loss(x["hs"], x["ws"].T, x["ht"], x["wt"])
  with pytest.raises(ValueError, match="common vocab"):
    fused_loss.fused_kd_loss(x["hs"], x["ws"], x["ht"], x["wt"][:30])
  with pytest.raises(ValueError, match="unknown KD kind"):
    fused_loss.fused_kd_loss(x["hs"], x["ws"], x["ht"], x["wt"], kind="kl")
