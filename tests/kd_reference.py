"""float64 numpy references of the KD losses, written from the formulas in the docstring and
comments of ``cbd_jax.distill.losses`` (never from its code); shared by the loss, fused-loss and
teacher-cache tests."""

import numpy as np


def log_softmax(z, temperature=1.0, limit=None):
  """log softmax(z / T) over the first ``limit`` columns (the real vocabulary), float64."""
  z = np.asarray(z, np.float64)[..., :limit] / temperature
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kl(lp, lq):
  """sum p (log p - log q), with 0 log 0 = 0."""
  p = np.exp(lp)
  with np.errstate(invalid="ignore"):
    return np.where(p > 0, p * (lp - lq), 0.0).sum(-1)


def divergence(lp, lq, kind, skew=0.1, beta=0.5):
  """D(p, q) of ``kind`` per token, from log-probabilities."""
  p, q = np.exp(lp), np.exp(lq)
  if kind == "fkl" or (kind == "jsd" and beta == 0.0):
    return kl(lp, lq)
  if kind == "rkl" or (kind == "jsd" and beta == 1.0):
    return kl(lq, lp)
  if kind == "skew_fkl":
    return kl(lp, np.log(skew * p + (1 - skew) * q))
  if kind == "skew_rkl":
    return kl(lq, np.log(skew * q + (1 - skew) * p))
  if kind == "jsd":
    lm = np.log(beta * p + (1 - beta) * q)
    return beta * kl(lp, lm) + (1 - beta) * kl(lq, lm)
  assert kind == "tvd", kind
  return 0.5 * np.abs(p - q).sum(-1)


def kd_per_token(student_logits, teacher_logits, kind, temperature=1.0, limit=None, skew=0.1,
                 beta=0.5):
  """T**2 D(softmax(teacher / T), softmax(student / T)) per token."""
  lq = log_softmax(student_logits, temperature, limit)
  lp = log_softmax(teacher_logits, temperature, limit)
  return temperature**2 * divergence(lp, lq, kind, skew, beta)


def tail_logprob(teacher_logits, idx, temperature=1.0, limit=None):
  """log of the teacher's mass outside the tokens ``idx`` (per token)."""
  p = np.exp(log_softmax(teacher_logits, temperature, limit))
  outside = np.ones(p.shape, bool)
  np.put_along_axis(outside, np.asarray(idx), False, axis=-1)
  with np.errstate(divide="ignore"):
    return np.log(np.where(outside, p, 0.0).sum(-1))


def kd_topk_per_token(student_logits, idx, teacher_logp, teacher_rest, kind, temperature=1.0,
                      limit=None, missing="tail", skew=0.1, beta=0.5):
  """T**2 D between the buckets of a top-k teacher: its k stored log-probs and its tail
  ``teacher_rest`` (renormalised together) against the student's k probabilities and its mass
  outside them ("tail"); or both renormalised over the k tokens ("renormalize")."""
  idx = np.asarray(idx)
  q = np.exp(log_softmax(student_logits, temperature, limit))
  q_k = np.take_along_axis(q, idx, -1)
  p_k = np.exp(np.asarray(teacher_logp, np.float64))
  if missing == "renormalize":
    p_b, q_b = p_k / p_k.sum(-1, keepdims=True), q_k / q_k.sum(-1, keepdims=True)
  elif idx.shape[-1] >= q.shape[-1]:  # The top-k is the whole real vocabulary: no tail.
    p_b, q_b = p_k, q_k
  else:
    outside = np.ones(q.shape, bool)
    np.put_along_axis(outside, idx, False, axis=-1)
    q_rest = np.where(outside, q, 0.0).sum(-1, keepdims=True)
    p_b = np.concatenate([p_k, np.exp(np.asarray(teacher_rest, np.float64))[..., None]], -1)
    p_b = p_b / p_b.sum(-1, keepdims=True)
    q_b = np.concatenate([q_k, q_rest], -1)
  with np.errstate(divide="ignore"):
    return temperature**2 * divergence(np.log(p_b), np.log(q_b), kind, skew, beta)
