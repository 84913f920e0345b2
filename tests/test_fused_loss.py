"""The fused chunked head-and-loss equals a float64 reference in value and gradient (central
differences of the reference), counts its chunk per device, and takes static weights."""

import re
import sys
from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cbd_jax.distill import fused_loss, losses

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kd_reference as ref  # noqa: E402

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


def _f64(x):
  return np.asarray(x, np.float64)


def _ref_kd(x, kind, temperature=TEMPERATURE):
  """float64 sum_t w_t T**2 D_t as a function of the student's hidden states and head."""
  t_logits = _f64(x["ht"]) @ _f64(x["wt"]).T

  def f(hs, ws):
    return (ref.kd_per_token(hs @ ws.T, t_logits, kind, temperature, LIMIT) * x["mask"]).sum()
  return f


def _ref_ce(x):
  """float64 sum_t w_t (-log q_t[y_t]), w_t = mask_t [y_t >= 0]."""
  keep = x["mask"] & (x["labels"] >= 0)

  def f(hs, ws):
    lq = ref.log_softmax(hs @ ws.T, 1.0, LIMIT)
    picked = np.take_along_axis(lq, np.clip(x["labels"], 0, None)[..., None], -1)[..., 0]
    return -(picked * keep).sum()
  return f


def _ref_value_and_grad(f, hs, ws, step=1e-6):
  """f(hs, ws) and its gradient by central differences, all float64."""
  args = [_f64(hs), _f64(ws)]
  grads = []
  for i, a in enumerate(args):
    g = np.zeros_like(a)
    for j in np.ndindex(a.shape):
      up, down = [b.copy() for b in args], [b.copy() for b in args]
      up[i][j] += step
      down[i][j] -= step
      g[j] = (f(*up) - f(*down)) / (2 * step)
    grads.append(g)
  return f(*args), grads


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


def _assert_value_and_grad(got, got_g, want, want_g):
  _assert_close(got, want)
  for g, w in zip(got_g, want_g, strict=True):
    _assert_close(g, w)


@pytest.mark.parametrize("kind", losses.KINDS)
def test_fused_kd_equals_float64_reference_in_value_and_gradient(kind):
  x = _inputs()
  got, got_g = jax.jit(jax.value_and_grad(_fused_kd(x, kind), (0, 1)))(x["hs"], x["ws"])
  _assert_value_and_grad(got, got_g, *_ref_value_and_grad(_ref_kd(x, kind), x["hs"], x["ws"]))
  assert got_g[1].dtype == jnp.float32


def test_forward_only_path_and_count():
  x = _inputs(1)
  total, count = jax.jit(fused_loss.fused_kd_loss, static_argnums=(4, 5, 7, 8))(
      x["hs"], x["ws"], x["ht"], x["wt"], "fkl", TEMPERATURE, x["mask"], LIMIT, CHUNK)
  _assert_close(total, _ref_kd(x, "fkl")(_f64(x["hs"]), _f64(x["ws"])))
  assert float(count) == x["mask"].sum()


@pytest.mark.parametrize("chunk", [1, 4096])
def test_chunk_size_does_not_change_the_result(chunk):
  x = _inputs(2)
  got, got_g = jax.jit(jax.value_and_grad(_fused_kd(x, "rkl", chunk), (0, 1)))(x["hs"], x["ws"])
  _assert_value_and_grad(got, got_g, *_ref_value_and_grad(_ref_kd(x, "rkl"), x["hs"], x["ws"]))


def test_fused_cross_entropy_and_the_weighted_mix():
  x = _inputs(3)
  kd, ce = _ref_kd(x, "fkl", 2.0), _ref_ce(x)

  def fused(hs, ws):
    return fused_loss.fused_distill_loss(
        hs, ws, x["ht"], x["wt"], x["labels"], kind="fkl", temperature=2.0, mask=x["mask"],
        vocab_limit=LIMIT, kd_weight=0.3, ce_weight=0.9, chunk_size=CHUNK)[0]

  got, got_g = jax.jit(jax.value_and_grad(fused, (0, 1)))(x["hs"], x["ws"])
  _assert_value_and_grad(got, got_g, *_ref_value_and_grad(
      lambda hs, ws: 0.3 * kd(hs, ws) + 0.9 * ce(hs, ws), x["hs"], x["ws"]))
  ce_sum, ce_count = fused_loss.fused_cross_entropy(x["hs"], x["ws"], x["labels"], x["mask"],
                                                    LIMIT, CHUNK)
  want_ce = ce(_f64(x["hs"]), _f64(x["ws"]))
  _assert_close(ce_sum, want_ce)
  assert float(ce_count) == (x["mask"] & (x["labels"] >= 0)).sum()
  _, metrics = fused_loss.fused_distill_loss(x["hs"], x["ws"], x["ht"], x["wt"], x["labels"],
                                             mask=x["mask"], vocab_limit=LIMIT, chunk_size=CHUNK)
  _assert_close(metrics["ce_sum"], want_ce)


@pytest.mark.parametrize("name", ["temperature", "kd_weight", "ce_weight"])
def test_a_traced_temperature_or_weight_is_refused_not_given_a_zero_gradient(name):
  """They are static: differentiating (or jitting) with respect to one is refused in one line,
  where it used to return a zero gradient."""
  x = _inputs(4)

  def fused(value):
    return fused_loss.fused_distill_loss(x["hs"], x["ws"], x["ht"], x["wt"], x["labels"],
                                         chunk_size=CHUNK, **{name: value})[0]

  with pytest.raises(TypeError, match=f"^fused loss: {name} is a traced value; pass a Python "):
    jax.grad(fused)(1.5)
  with pytest.raises(TypeError, match=f"{name} is a traced value"):
    jax.jit(fused)(1.5)


def test_static_weights_and_temperature_scale_the_loss_and_gradient():
  x = _inputs(4)
  fused = lambda hs, ws: fused_loss.fused_distill_loss(  # noqa: E731
      hs, ws, x["ht"], x["wt"], temperature=np.float32(2.0), kd_weight=0.5, chunk_size=CHUNK)[0]
  got, got_g = jax.jit(jax.value_and_grad(fused, (0, 1)))(x["hs"], x["ws"])
  t_logits = _f64(x["ht"]) @ _f64(x["wt"]).T  # No mask, no vocab_limit: all V columns.
  _assert_value_and_grad(got, got_g, *_ref_value_and_grad(
      lambda hs, ws: 0.5 * ref.kd_per_token(hs @ ws.T, t_logits, "fkl", 2.0).sum(), x["hs"],
      x["ws"]))


def _ref_topk_kd(x, idx, logp, rest, kind):
  def f(hs, ws):
    per = ref.kd_topk_per_token(hs @ ws.T, idx, logp, rest, kind, TEMPERATURE, LIMIT)
    return (per * x["mask"]).sum()
  return f


@pytest.mark.parametrize("kind", ["jsd", "rkl"])
def test_fused_topk_equals_float64_reference(kind):
  x = _inputs(5)
  idx, logp, rest = losses.topk_teacher(x["ht"] @ x["wt"].T, 5, TEMPERATURE, LIMIT)

  def fused(hs, ws):
    return fused_loss.fused_distill_loss(hs, ws, kind=kind, temperature=TEMPERATURE,
                                         mask=x["mask"], vocab_limit=LIMIT, chunk_size=CHUNK,
                                         teacher_topk=(idx, logp, rest))[0]

  got, got_g = jax.jit(jax.value_and_grad(fused, (0, 1)))(x["hs"], x["ws"])
  want_rest = ref.tail_logprob(_f64(x["ht"]) @ _f64(x["wt"]).T, idx, TEMPERATURE, LIMIT)
  _assert_value_and_grad(got, got_g, *_ref_value_and_grad(
      _ref_topk_kd(x, np.asarray(idx), np.asarray(logp), want_rest, kind), x["hs"], x["ws"]))


def _scan_lengths(fn, *args) -> list[int]:
  """Trip counts of every lax.scan in the traced function (nested jaxprs included)."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "scan":
        found.append(eqn.params["length"])
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_the_chunk_is_counted_in_tokens_per_device():
  """8 rows over data=8: one row per device, so chunk_size=6 is 6 positions of it per chunk (3
  chunks for T=13), not 6 // 8 -> 1 position (13 chunks of 8 tokens, one per device)."""
  mesh = jax.make_mesh((8, 1, 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  ks = jax.random.split(jax.random.PRNGKey(11), 4)
  hs, ht = jax.random.normal(ks[0], (8, T, D)), jax.random.normal(ks[2], (8, T, DT))
  ws, wt = jax.random.normal(ks[1], (V, D)), jax.random.normal(ks[3], (V, DT))

  def loss(hs, ws):
    return fused_loss.fused_kd_loss(hs, ws, ht, wt, chunk_size=CHUNK)[0]

  assert set(_scan_lengths(loss, hs, ws)) == {13}  # Outside a mesh: all 8 rows on one device.
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    assert set(_scan_lengths(jax.value_and_grad(loss, (0, 1)), hs, ws)) == {3}
  with jax.set_mesh(mesh):
    got, got_g = jax.jit(jax.value_and_grad(loss, (0, 1)))(hs, ws)
  t_logits = _f64(ht) @ _f64(wt).T
  _assert_value_and_grad(got, got_g, *_ref_value_and_grad(
      lambda h, w: ref.kd_per_token(h @ w.T, t_logits, "fkl").sum(), hs, ws))


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
  want = ref.kd_per_token(_f64(f32["hs"]) @ _f64(f32["ws"]).T,
                          _f64(f32["ht"]) @ _f64(f32["wt"]).T, "fkl") * x["mask"]
  _assert_close(total, want.sum())


def _largest_array(compiled_text: str) -> int:
  sizes = [int(np.prod([int(d) for d in dims.split(",") if d]))
           for dims in re.findall(r"f32\[([\d,]*)\]", compiled_text)]
  return max(sizes)


def test_no_full_logits_tensor_exists_and_the_check_would_see_one():
  x = _inputs(8)
  args = (x["hs"], x["ws"])
  fused_hlo = jax.jit(jax.grad(_fused_kd(x, "fkl"), (0, 1))).lower(*args).compile().as_text()
  naive = lambda hs, ws: losses.kd_loss_sum(hs @ ws.T, x["ht"] @ x["wt"].T)[0]  # noqa: E731
  naive_hlo = jax.jit(jax.grad(naive, (0, 1))).lower(*args).compile().as_text()
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
