"""Token-level distillation losses: divergences between teacher and student distributions.

Conventions: p = softmax(teacher_logits / T) (teacher), q = softmax(student_logits / T) (student),
sums run over the vocabulary axis (the last one). Every divergence is multiplied by T**2 so its
gradient scale does not depend on T. All maths is fp32 whatever the dtype of the logits.

Columns at or beyond ``vocab_limit`` (padded rows of an output head, see
``ModelConfig.vocab_limit``) get zero probability on both sides. Reductions come as token-weighted
``(sum, count)`` pairs, which add exactly across devices, hosts, microbatches and logging windows.

Kinds (per token, before the T**2 factor):
  fkl       KL(p||q) = sum p (log p - log q)
  rkl       KL(q||p) = sum q (log q - log p)
  skew_fkl  KL(p || a p + (1 - a) q), a = ``skew`` (DistiLLM); a = 0 gives fkl
  skew_rkl  KL(q || a q + (1 - a) p), a = ``skew``; a = 0 gives rkl
  jsd       generalised JSD(b) = b KL(p||m) + (1 - b) KL(q||m), m = b p + (1 - b) q, b = ``beta``
            (GKD). JSD(b) / b -> KL(p||q) as b -> 0 and JSD(b) / (1 - b) -> KL(q||p) as b -> 1;
            the end points b = 0 and b = 1 are defined as fkl and rkl (the GKD / TRL convention).
  tvd       0.5 sum |p - q|
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

KINDS = ("fkl", "rkl", "skew_fkl", "skew_rkl", "jsd", "tvd")
MISSING_MASS_POLICIES = ("tail", "renormalize")

# Logit given to masked vocabulary columns: finite, so 0 * (log p - log q) stays 0 (no NaN).
_MASKED_LOGIT = -1e30


def check_kind(kind: str, skew: float = 0.1, beta: float = 0.5):
  """Raises a one-line ValueError for an unknown kind or an out-of-range skew / beta."""
  if kind not in KINDS:
    raise ValueError(f"unknown KD kind {kind!r}; choose one of {KINDS}")
  if not 0.0 <= skew < 1.0:
    raise ValueError(f"skew={skew} must lie in [0, 1)")
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"beta={beta} must lie in [0, 1]")


def vocab_valid(num_columns: int, vocab_limit: int | None) -> jax.Array | None:
  """Boolean [V] marking columns < vocab_limit, or None when every column is real."""
  if vocab_limit is None or vocab_limit >= num_columns:
    return None
  if vocab_limit <= 0:
    raise ValueError(f"vocab_limit={vocab_limit} must be positive")
  return jnp.arange(num_columns) < vocab_limit


def log_softmax(logits_NxV, temperature=1.0, vocab_limit: int | None = None) -> jax.Array:
  """log softmax(z / T) over the last axis in fp32; columns >= vocab_limit get zero mass."""
  z = logits_NxV.astype(jnp.float32) / temperature
  valid_V = vocab_valid(z.shape[-1], vocab_limit)
  if valid_V is not None:
    z = jnp.where(valid_V, z, _MASKED_LOGIT)
  return jax.nn.log_softmax(z, axis=-1)


def _kl(logp, logq):
  """sum p (log p - log q) over the last axis, with 0 log 0 = 0."""
  p = jnp.exp(logp)
  return jnp.sum(p * jnp.where(p > 0, logp - logq, 0.0), axis=-1)


def _log_mix(a: float, logp, logq):
  """log(a p + (1 - a) q), computed in log space."""
  if a <= 0.0:
    return logq
  if a >= 1.0:
    return logp
  return jnp.logaddexp(math.log(a) + logp, math.log1p(-a) + logq)


def divergence_from_logprobs(logp_teacher, logq_student, kind: str = "fkl", skew: float = 0.1,
                             beta: float = 0.5) -> jax.Array:
  """Per-token divergence D(p, q) of ``kind`` from log-probabilities (no temperature factor)."""
  check_kind(kind, skew, beta)
  lp, lq = logp_teacher, logq_student
  if kind == "fkl":
    return _kl(lp, lq)
  if kind == "rkl":
    return _kl(lq, lp)
  if kind == "skew_fkl":
    return _kl(lp, _log_mix(skew, lp, lq))
  if kind == "skew_rkl":
    return _kl(lq, _log_mix(skew, lq, lp))
  if kind == "jsd":
    if beta == 0.0:
      return _kl(lp, lq)
    if beta == 1.0:
      return _kl(lq, lp)
    lm = _log_mix(beta, lp, lq)
    return beta * _kl(lp, lm) + (1.0 - beta) * _kl(lq, lm)
  return 0.5 * jnp.sum(jnp.abs(jnp.exp(lp) - jnp.exp(lq)), axis=-1)  # tvd


def kd_per_token(student_logits, teacher_logits, kind: str = "fkl", temperature=1.0,
                 vocab_limit: int | None = None, skew: float = 0.1, beta: float = 0.5):
  """T**2 * D(softmax(teacher / T), softmax(student / T)) per token, fp32, shape [...]."""
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f"student logits {student_logits.shape} and teacher logits "
                     f"{teacher_logits.shape} differ in shape; project the teacher first")
  lq = log_softmax(student_logits, temperature, vocab_limit)
  lp = jax.lax.stop_gradient(log_softmax(teacher_logits, temperature, vocab_limit))
  return temperature**2 * divergence_from_logprobs(lp, lq, kind, skew, beta)


def token_weights(shape, mask=None) -> jax.Array:
  """Per-token weights in fp32: ``mask`` (bool or float) broadcast to ``shape``, else ones."""
  if mask is None:
    return jnp.ones(shape, jnp.float32)
  if tuple(mask.shape) != tuple(shape):
    raise ValueError(f"mask shape {tuple(mask.shape)} does not match token shape {tuple(shape)}")
  return mask.astype(jnp.float32)


def weighted_sum(per_token, weights) -> tuple[jax.Array, jax.Array]:
  """(sum_i w_i x_i, sum_i w_i); positions with w_i = 0 contribute nothing, even NaN."""
  x = jnp.where(weights > 0, per_token, 0.0)
  return jnp.sum(x * weights), jnp.sum(weights)


def kd_loss_sum(student_logits, teacher_logits, kind: str = "fkl", temperature=1.0, mask=None,
                vocab_limit: int | None = None, skew: float = 0.1, beta: float = 0.5):
  """(sum_t w_t * T**2 D_t, sum_t w_t) over token positions; the teacher gets no gradient."""
  per = kd_per_token(student_logits, teacher_logits, kind, temperature, vocab_limit, skew, beta)
  return weighted_sum(per, token_weights(per.shape, mask))


def cross_entropy_per_token(logits, labels, vocab_limit: int | None = None) -> jax.Array:
  """-log softmax(z)[label] per token in fp32; labels < 0 give 0 (mask them)."""
  logq = log_softmax(logits, 1.0, vocab_limit)
  safe = jnp.clip(labels, 0, logits.shape[-1] - 1)
  picked = jnp.take_along_axis(logq, safe[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jnp.where(labels >= 0, -picked, 0.0)


def label_weights(labels, mask=None) -> jax.Array:
  """Token weights for label losses: ``mask`` (or ones) times [label >= 0] (-100 = ignore)."""
  return token_weights(labels.shape, mask) * (labels >= 0)


def cross_entropy_sum(logits, labels, mask=None, vocab_limit: int | None = None):
  """(sum_t w_t (-log q_t[y_t]), sum_t w_t), w_t = mask_t [y_t >= 0]."""
  per = cross_entropy_per_token(logits, labels, vocab_limit)
  return weighted_sum(per, label_weights(labels, mask))


# ------------------------------------------------------------------------------------------------
# Sparse teacher input: top-k teacher log-probabilities.
#
# A teacher cached as its k most likely tokens leaves a missing mass, p_rest = sum_{j not in top-k}
# p_j. ``topk_teacher`` returns its log, computed from the teacher's full log-probabilities (a
# log-sum-exp over the tail), never as 1 - sum_k p_i: that difference cancels to 0 or below for a
# confident teacher (and more so once the top-k is stored in fp16 / bf16), and a zero tail makes
# the reverse KL of the tail bucket infinite. Policies:
#   "tail"        (default) the missing mass becomes one extra "rest of the vocabulary" bucket on
#                 both sides: log p_rest as given, q_rest = sum_{j not in top-k} q_j (computed
#                 from the student's logits, not by subtraction). The teacher's k + 1 buckets are
#                 renormalised (a no-op up to rounding; it absorbs the rounding of stored values),
#                 and the divergence is exact between these (k+1)-bucket distributions; for KL it
#                 is a lower bound of the dense KL (data processing) and it keeps pushing student
#                 mass off the tail.
#   "renormalize" both sides are renormalised over the teacher's top-k tokens and compared there;
#                 the student's mass outside the top-k is not penalised (p_rest is not used).
# Both equal the dense loss when k covers the whole (real) vocabulary.
# ------------------------------------------------------------------------------------------------


def topk_teacher(teacher_logits, k: int, temperature=1.0, vocab_limit: int | None = None):
  """(indices int32 [..., k], log p_i fp32 [..., k], log p_rest fp32 [...]): the top-k of
  p = softmax(z / T) over the full vocabulary and the log of the mass outside it (-1e30 when the
  top-k holds every real token)."""
  logp = log_softmax(teacher_logits, temperature, vocab_limit)
  n_real = vocab_limit or logp.shape[-1]
  if not 0 < k <= n_real:
    raise ValueError(f"k={k} must lie in [1, {n_real}] (the real vocabulary size)")
  values, indices = jax.lax.top_k(logp, k)
  indices = indices.astype(jnp.int32)
  return indices, values, _logsumexp_outside(logp, indices)[..., 0]


def _logsumexp_outside(logp_full, idx):
  """log sum_{j not in idx} exp(logp_full[..., j]), shape [..., 1]; at least -1e30."""
  in_topk = jnp.zeros(logp_full.shape, bool)
  in_topk = jnp.put_along_axis(in_topk, idx, True, axis=-1, inplace=False)
  rest = jax.nn.logsumexp(jnp.where(in_topk, _MASKED_LOGIT, logp_full), axis=-1, keepdims=True)
  return jnp.maximum(rest, _MASKED_LOGIT)


def _topk_buckets(student_logits, teacher_indices, teacher_logprobs, teacher_rest, temperature,
                  vocab_limit, missing: str):
  """(log p, log q) over the buckets the missing-mass policy compares."""
  if missing not in MISSING_MASS_POLICIES:
    raise ValueError(f"unknown missing-mass policy {missing!r}; choose {MISSING_MASS_POLICIES}")
  if teacher_indices.shape != teacher_logprobs.shape:
    raise ValueError(f"teacher indices {teacher_indices.shape} and log-probs "
                     f"{teacher_logprobs.shape} differ in shape")
  if teacher_indices.shape[:-1] != student_logits.shape[:-1]:
    raise ValueError(f"teacher top-k tokens {teacher_indices.shape[:-1]} do not match student "
                     f"tokens {student_logits.shape[:-1]}")
  num_v, k = student_logits.shape[-1], teacher_indices.shape[-1]
  lq_full = log_softmax(student_logits, temperature, vocab_limit)
  idx = teacher_indices.astype(jnp.int32)
  lq = jnp.take_along_axis(lq_full, idx, axis=-1)
  lp = jnp.maximum(jax.lax.stop_gradient(teacher_logprobs.astype(jnp.float32)), _MASKED_LOGIT)
  if missing == "renormalize":
    return (lp - jax.nn.logsumexp(lp, axis=-1, keepdims=True),
            lq - jax.nn.logsumexp(lq, axis=-1, keepdims=True))
  if k >= (vocab_limit or num_v):  # No tail: the top-k already covers every real token.
    return lp, lq
  if teacher_rest is None:
    raise ValueError("missing='tail' needs teacher_rest, the log of the teacher's mass outside "
                     "its top-k (the third output of losses.topk_teacher); or use "
                     "missing='renormalize'")
  if teacher_rest.shape != teacher_indices.shape[:-1]:
    raise ValueError(f"teacher_rest {teacher_rest.shape} must have the teacher's token shape "
                     f"{teacher_indices.shape[:-1]}")
  lp_rest = jnp.maximum(jax.lax.stop_gradient(teacher_rest.astype(jnp.float32)), _MASKED_LOGIT)
  lp_b = jnp.concatenate([lp, lp_rest[..., None]], -1)
  lp_b = lp_b - jax.nn.logsumexp(lp_b, axis=-1, keepdims=True)
  return lp_b, jnp.concatenate([lq, _logsumexp_outside(lq_full, idx)], -1)


def kd_topk_per_token(student_logits, teacher_indices, teacher_logprobs, kind: str = "fkl",
                      temperature=1.0, vocab_limit: int | None = None, missing: str = "tail",
                      skew: float = 0.1, beta: float = 0.5, teacher_rest=None):
  """T**2 * D(p, q) per token over the buckets of the missing-mass policy (see above);
  ``teacher_rest`` is log p_rest [...] (``topk_teacher``'s third output)."""
  lp, lq = _topk_buckets(student_logits, teacher_indices, teacher_logprobs, teacher_rest,
                         temperature, vocab_limit, missing)
  return temperature**2 * divergence_from_logprobs(lp, lq, kind, skew, beta)


def kd_loss_topk_sum(student_logits, teacher_indices, teacher_logprobs, kind: str = "fkl",
                     temperature=1.0, mask=None, vocab_limit: int | None = None,
                     missing: str = "tail", skew: float = 0.1, beta: float = 0.5,
                     teacher_rest=None):
  """(sum_t w_t T**2 D_t, sum_t w_t) from top-k teacher log-probs made at the same T."""
  per = kd_topk_per_token(student_logits, teacher_indices, teacher_logprobs, kind, temperature,
                          vocab_limit, missing, skew, beta, teacher_rest)
  return weighted_sum(per, token_weights(per.shape, mask))
