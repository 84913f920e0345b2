"""KD losses against a float64 numpy reference, their math properties, masks and top-k input."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from cbd_jax.distill import losses

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kd_reference as ref  # noqa: E402

B, T, V = 3, 7, 19
LIMIT = 16


def _mean(total, count):
  return jnp.where(count > 0, total / jnp.maximum(count, 1e-30), 0.0)


def kd_loss(*args, **kwargs):
  """Token-weighted mean of `losses.kd_loss_sum`."""
  return _mean(*losses.kd_loss_sum(*args, **kwargs))


def kd_loss_topk(*args, **kwargs):
  """Token-weighted mean of `losses.kd_loss_topk_sum`."""
  return _mean(*losses.kd_loss_topk_sum(*args, **kwargs))


def cross_entropy(*args, **kwargs):
  """Token-weighted mean of `losses.cross_entropy_sum`."""
  return _mean(*losses.cross_entropy_sum(*args, **kwargs))


def _logits(seed, scale=3.0, shape=(B, T, V)):
  return scale * jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _ref_logsoftmax(z, temperature, limit):
  z = np.asarray(z, np.float64)[..., :limit] / temperature
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _ref_kl(lp, lq):
  return (np.exp(lp) * (lp - lq)).sum(-1)


def _ref_per_token(s, t, kind, temperature, limit, skew, beta):
  """float64 reference, written from the formulas in the losses module docstring."""
  lq, lp = _ref_logsoftmax(s, temperature, limit), _ref_logsoftmax(t, temperature, limit)
  p, q = np.exp(lp), np.exp(lq)
  if kind == "fkl":
    d = _ref_kl(lp, lq)
  elif kind == "rkl":
    d = _ref_kl(lq, lp)
  elif kind == "skew_fkl":
    d = _ref_kl(lp, np.log(skew * p + (1 - skew) * q))
  elif kind == "skew_rkl":
    d = _ref_kl(lq, np.log(skew * q + (1 - skew) * p))
  elif kind == "jsd":
    lm = np.log(beta * p + (1 - beta) * q)
    d = beta * _ref_kl(lp, lm) + (1 - beta) * _ref_kl(lq, lm)
  else:
    d = 0.5 * np.abs(p - q).sum(-1)
  return temperature**2 * d


@pytest.mark.parametrize("kind", losses.KINDS)
def test_kd_loss_matches_float64_reference(kind):
  s, t = _logits(0), _logits(1)
  mask = np.asarray(jax.random.bernoulli(jax.random.PRNGKey(2), 0.6, (B, T)))
  temperature, skew, beta = 1.7, 0.3, 0.35
  got = kd_loss(s, t, kind, temperature, mask, LIMIT, skew=skew, beta=beta)
  per = _ref_per_token(s, t, kind, temperature, LIMIT, skew, beta)
  want = (per * mask).sum() / mask.sum()
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5)
  total, count = losses.kd_loss_sum(s, t, kind, temperature, mask, LIMIT, skew=skew, beta=beta)
  np.testing.assert_allclose(total, (per * mask).sum(), rtol=1e-5)
  assert float(count) == mask.sum()


@pytest.mark.parametrize("kind", losses.KINDS)
def test_divergence_of_a_distribution_with_itself_is_zero_and_otherwise_positive(kind):
  s, t = _logits(3), _logits(4)
  same = losses.kd_per_token(t, t, kind, 2.0, LIMIT)
  np.testing.assert_allclose(same, 0.0, atol=1e-5)
  per = np.asarray(losses.kd_per_token(s, t, kind, 1.0, LIMIT))
  assert (per > 1e-4).all(), per.min()


def test_jsd_limits_are_forward_and_reverse_kl():
  s, t = _logits(5, 1.0), _logits(6, 1.0)
  fkl = kd_loss(s, t, "fkl")
  rkl = kd_loss(s, t, "rkl")
  eps = 1e-3
  np.testing.assert_allclose(kd_loss(s, t, "jsd", beta=eps) / eps, fkl, rtol=5e-3)
  np.testing.assert_allclose(kd_loss(s, t, "jsd", beta=1 - eps) / eps, rkl, rtol=5e-3)
  np.testing.assert_allclose(kd_loss(s, t, "jsd", beta=0.0), fkl, rtol=1e-6)
  np.testing.assert_allclose(kd_loss(s, t, "jsd", beta=1.0), rkl, rtol=1e-6)
  np.testing.assert_allclose(kd_loss(s, t, "skew_fkl", skew=0.0), fkl, rtol=1e-6)
  np.testing.assert_allclose(kd_loss(s, t, "skew_rkl", skew=0.0), rkl, rtol=1e-6)


def test_forward_kl_gradient_is_temperature_times_q_minus_p():
  s, t = _logits(7), _logits(8)
  temperature = 2.5
  grad = jax.grad(lambda z: losses.kd_loss_sum(z, t, "fkl", temperature, None, LIMIT)[0])(s)
  q = np.exp(_ref_logsoftmax(s, temperature, LIMIT))
  p = np.exp(_ref_logsoftmax(t, temperature, LIMIT))
  np.testing.assert_allclose(grad[..., :LIMIT], temperature * (q - p), atol=1e-6)
  np.testing.assert_array_equal(grad[..., LIMIT:], 0.0)


def test_token_mask_excludes_exactly_the_masked_positions():
  s, t = _logits(9), _logits(10)
  mask = np.ones((B, T), bool)
  mask[0, 2] = mask[2, 5] = False
  base_sum, count = losses.kd_loss_sum(s, t, "fkl", 1.0, mask)
  junk = s.at[0, 2].set(jnp.nan).at[2, 5].set(1e4)
  junk_t = t.at[0, 2].set(jnp.inf)
  np.testing.assert_allclose(losses.kd_loss_sum(junk, junk_t, "fkl", 1.0, mask)[0], base_sum,
                             rtol=1e-6)
  assert float(count) == B * T - 2
  per = losses.kd_per_token(s, t)
  np.testing.assert_allclose(base_sum, per.sum() - per[0, 2] - per[2, 5], rtol=1e-5)
  grad = jax.grad(lambda z: losses.kd_loss_sum(z, t, "fkl", 1.0, mask)[0])(s)
  assert not np.asarray(grad[0, 2]).any() and np.asarray(grad[0, 3]).any()


def test_vocab_limit_ignores_padded_columns():
  s, t = _logits(11), _logits(12)
  padded_s = s.at[..., LIMIT:].set(50.0)
  padded_t = t.at[..., LIMIT:].set(-50.0)
  for kind in losses.KINDS:
    want = kd_loss(s[..., :LIMIT], t[..., :LIMIT], kind)
    np.testing.assert_allclose(kd_loss(padded_s, padded_t, kind, vocab_limit=LIMIT), want,
                               rtol=1e-6)
  assert abs(float(kd_loss(padded_s, padded_t)) - float(kd_loss(s, t))) > 1.0


def test_sums_aggregate_exactly_over_a_split_batch():
  s, t = _logits(13), _logits(14)
  mask = np.asarray(jax.random.bernoulli(jax.random.PRNGKey(15), 0.5, (B, T)))
  parts = [losses.kd_loss_sum(s[i:i + 1], t[i:i + 1], "rkl", 2.0, mask[i:i + 1])
           for i in range(B)]
  total = sum(float(p[0]) for p in parts) / sum(float(p[1]) for p in parts)
  np.testing.assert_allclose(total, kd_loss(s, t, "rkl", 2.0, mask), rtol=1e-6)


def test_empty_mask_gives_zero_not_nan():
  s, t = _logits(16), _logits(17)
  assert float(kd_loss(s, t, mask=np.zeros((B, T), bool))) == 0.0


def test_cross_entropy_matches_reference_and_ignores_negative_labels():
  z = _logits(18)
  labels = np.array(jax.random.randint(jax.random.PRNGKey(19), (B, T), 0, LIMIT))
  labels[1, 3] = -100
  mask = np.ones((B, T), bool)
  mask[2, 0] = False
  total, count = losses.cross_entropy_sum(z, labels, mask, LIMIT)
  lq = _ref_logsoftmax(z, 1.0, LIMIT)
  keep = mask & (labels >= 0)
  picked = np.take_along_axis(lq, np.clip(labels, 0, None)[..., None], -1)[..., 0]
  np.testing.assert_allclose(total, -(picked * keep).sum(), rtol=1e-5)
  assert float(count) == keep.sum() == B * T - 2
  np.testing.assert_allclose(cross_entropy(z, labels, mask, LIMIT), total / count,
                             rtol=1e-6)


def test_bfloat16_logits_are_computed_in_float32():
  s, t = _logits(20).astype(jnp.bfloat16), _logits(21).astype(jnp.bfloat16)
  got = kd_loss(s, t, "fkl", 2.0)
  assert got.dtype == jnp.float32
  want = _ref_per_token(np.asarray(s, np.float32), np.asarray(t, np.float32), "fkl", 2.0, V, 0,
                        0).mean()
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("missing", losses.MISSING_MASS_POLICIES)
@pytest.mark.parametrize("kind", losses.KINDS)
def test_topk_with_k_equal_to_vocab_equals_dense(kind, missing):
  s, t = _logits(22), _logits(23)
  idx, logp, rest = losses.topk_teacher(t, LIMIT, 1.5, LIMIT)
  assert (np.asarray(rest) <= -1e29).all()  # Nothing outside a top-k of the whole vocabulary.
  got = kd_loss_topk(s, idx, logp, kind, 1.5, None, LIMIT, missing, teacher_rest=rest)
  np.testing.assert_allclose(got, kd_loss(s, t, kind, 1.5, None, LIMIT), rtol=1e-5)


def test_topk_tail_policy_is_the_bucketed_kl():
  s, t = _logits(24), _logits(25)
  k = 4
  idx, logp, rest = losses.topk_teacher(t, k, 1.0, LIMIT)
  lq, lp = _ref_logsoftmax(s, 1.0, LIMIT), _ref_logsoftmax(t, 1.0, LIMIT)
  order = np.argsort(-lp, -1)[..., :k]
  np.testing.assert_array_equal(np.sort(idx, -1), np.sort(order, -1))
  p_k = np.take_along_axis(np.exp(lp), order, -1)
  q_k = np.take_along_axis(np.exp(lq), order, -1)
  p_b = np.concatenate([p_k, 1 - p_k.sum(-1, keepdims=True)], -1)
  q_b = np.concatenate([q_k, 1 - q_k.sum(-1, keepdims=True)], -1)
  want = (p_b * np.log(p_b / q_b)).sum(-1).mean()
  np.testing.assert_allclose(rest, np.log(1 - p_k.sum(-1)), rtol=1e-5)
  got = kd_loss_topk(s, idx, logp, "fkl", 1.0, None, LIMIT, "tail", teacher_rest=rest)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(got) <= float(kd_loss(s, t, "fkl", 1.0, None, LIMIT)) + 1e-6
  p_r, q_r = p_k / p_k.sum(-1, keepdims=True), q_k / q_k.sum(-1, keepdims=True)
  want_r = (p_r * np.log(p_r / q_r)).sum(-1).mean()
  got_r = kd_loss_topk(s, idx, logp, "fkl", 1.0, None, LIMIT, "renormalize")
  np.testing.assert_allclose(got_r, want_r, rtol=1e-5)


def test_teacher_gets_no_gradient():
  s, t = _logits(26), _logits(27)
  for kind in losses.KINDS:
    grad_t = jax.grad(lambda z, k=kind: kd_loss(s, z, k))(t)
    assert not np.asarray(grad_t).any()


def test_bad_arguments_raise_one_line_errors():
  s, t = _logits(28), _logits(29)
  with pytest.raises(ValueError, match="unknown KD kind"):
    kd_loss(s, t, "kl")
  with pytest.raises(ValueError, match="differ in shape"):
    kd_loss(s, t[..., :5])
  with pytest.raises(ValueError, match="mask shape"):
    kd_loss(s, t, mask=np.ones((B,), bool))
  with pytest.raises(ValueError, match="k=40"):
    losses.topk_teacher(t, 40)
  with pytest.raises(ValueError, match="missing-mass policy"):
    kd_loss_topk(s, *losses.topk_teacher(t, 3)[:2], missing="drop")
  with pytest.raises(ValueError, match="^missing='tail' needs teacher_rest, the log of the "):
    kd_loss_topk(s, *losses.topk_teacher(t, 3)[:2])
  with pytest.raises(ValueError, match="beta"):
    kd_loss(s, t, "jsd", beta=1.5)


DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def _confident(seed, shape=(B, T, V)):
  """Teacher logits whose top token holds all but about 1e-9 of the mass (one in five tokens
  less sure, around 1e-3 left outside the top-k)."""
  z = _logits(seed, 1.0, shape)
  gap = np.where(np.arange(shape[0] * shape[1]).reshape(shape[:2]) % 5 == 0, 9.0, 25.0)
  return z.at[..., 3].add(gap)


def test_topk_rest_is_the_tail_mass_where_one_minus_the_sum_cancels():
  t = _confident(30)
  idx, logp, rest = losses.topk_teacher(t, 4, 1.0, LIMIT)
  want = ref.tail_logprob(t, np.argsort(-_ref_logsoftmax(t, 1.0, LIMIT))[..., :4], 1.0, LIMIT)
  assert (1 - np.exp(np.asarray(logp)).sum(-1) <= 0).any()  # fp32 cancels some tails to 0.
  np.testing.assert_allclose(rest, want, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", losses.KINDS)
def test_topk_loss_from_stored_values_is_finite_and_matches_float64(kind, dtype):
  """A confident teacher's top-k stored in fp32 / fp16 / bf16 (its mass rounds to >= 1) with its
  tail: the loss is the float64 one of the same buckets (the tail renormalised with them)."""
  s, t = _logits(31), _confident(32)
  idx, logp, rest = losses.topk_teacher(t, 4, 0.8, LIMIT)
  stored = np.asarray(logp).astype(DTYPES[dtype])
  assert (np.exp(stored.astype(np.float32)).sum(-1) >= 1).any()
  got = kd_loss_topk(s, idx, jnp.asarray(stored.astype(np.float32)), kind, 0.8, None,
                            LIMIT, skew=0.3, beta=0.35, teacher_rest=rest)
  want = ref.kd_topk_per_token(s, idx, stored, rest, kind, 0.8, LIMIT, skew=0.3, beta=0.35)
  np.testing.assert_allclose(got, want.mean(), rtol=1e-5)
