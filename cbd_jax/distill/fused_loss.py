"""Fused head-and-loss: KD and cross-entropy from final hidden states and output heads.

The logits z = h W^T of either model are only ever made for one chunk of tokens at a time, so no
[batch, seq, vocab] tensor exists whole. The gradient is computed chunk by chunk in the *forward*
pass (when differentiating) and kept as residuals (d hidden [B, T, D] and d head [V, D], the sizes
of the inputs), so the backward pass is a scaling and the total matmul work equals the naive path:
forward  z_s, z_t;  gradient  dz_s W_s, dz_s^T h_s.

Each chunk's sums are ``losses.kd_loss_sum`` / ``losses.kd_loss_topk_sum`` /
``losses.cross_entropy_sum`` of its logits, so values and gradients equal them on the full
logits. The teacher (hidden, head, or top-k log-probs) gets zero gradient, and so do the
temperature and the loss weights, which are therefore static Python floats (a traced one is
refused). Matmuls take the inputs' own dtype with fp32 accumulation (exact products for bf16
inputs); all loss maths is fp32.

Chunks are [B, C] slabs of sequence positions with ``chunk_size`` counted per device: traced under
a mesh (``jax.set_mesh`` / ``use_abstract_mesh``, as the train steps are) whose batch axes split B
n ways, each device holds B / n rows, so C = chunk_size // (B / n) and every device multiplies
``chunk_size`` tokens per chunk, whatever the number of devices. A batch-sharded hidden state and
a vocab- or model-sharded head keep their shardings under ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from cbd_jax.distill import losses
from cbd_jax.model.sharding import batch_shards, constrain_batch


@dataclasses.dataclass(frozen=True)
class _Spec:
  """What the per-chunk loss computes (static)."""

  teacher: str  # The teacher's form: "none" | "dense" | "topk".
  use_ce: bool
  temperature: float = 1.0
  kd_weight: float = 1.0
  ce_weight: float = 0.0
  kind: str = "fkl"
  vocab_limit: int | None = None
  skew: float = 0.1
  beta: float = 0.5
  missing: str = "tail"


def _logits(h_BxCxD, w_VxD):
  """z = h W^T with fp32 accumulation, in the promoted dtype of h and W."""
  dt = jnp.promote_types(h_BxCxD.dtype, w_VxD.dtype)
  return jnp.einsum("bcd,vd->bcv", h_BxCxD.astype(dt), w_VxD.astype(dt),
                    preferred_element_type=jnp.float32)


def _chunk_sums(spec: _Spec, h_BxCxD, w_VxD, tok, consts):
  """(kd_weight * kd_sum + ce_weight * ce_sum, (kd_sum, ce_sum)) over one chunk."""
  z_BxCxV = constrain_batch(_logits(h_BxCxD, w_VxD))
  kd_sum = ce_sum = jnp.zeros((), jnp.float32)
  t = spec.temperature
  if spec.teacher == "dense":
    zt_BxCxV = constrain_batch(
        jax.lax.stop_gradient(_logits(tok["teacher_hidden"], consts["teacher_head"])))
    kd_sum = losses.kd_loss_sum(z_BxCxV, zt_BxCxV, spec.kind, t, tok["mask"], spec.vocab_limit,
                                spec.skew, spec.beta)[0]
  elif spec.teacher == "topk":
    kd_sum = losses.kd_loss_topk_sum(z_BxCxV, tok["teacher_indices"], tok["teacher_logprobs"],
                                     spec.kind, t, tok["mask"], spec.vocab_limit, spec.missing,
                                     spec.skew, spec.beta, tok.get("teacher_rest"))[0]
  if spec.use_ce:
    ce_sum = losses.cross_entropy_sum(z_BxCxV, tok["labels"], tok["ce_mask"], spec.vocab_limit)[0]
  objective = spec.kd_weight * kd_sum + spec.ce_weight * ce_sum
  return objective, (kd_sum, ce_sum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_sums(spec, h_NxBxCxD, w_VxD, tok, consts):
  """(objective, kd_sum, ce_sum) summed over chunks; forward only."""

  def body(acc_3, xs):
    h, t = xs
    objective, (kd, ce) = _chunk_sums(spec, h, w_VxD, t, consts)
    return acc_3 + jnp.stack([objective, kd, ce]), None

  acc_3, _ = jax.lax.scan(body, jnp.zeros((3,), jnp.float32), (h_NxBxCxD, tok))
  return acc_3[0], acc_3[1], acc_3[2]


def _fused_fwd(spec, h_NxBxCxD, w_VxD, tok, consts):
  """Forward plus per-chunk gradients of the objective w.r.t. student hidden and head."""

  def body(carry, xs):
    acc_3, dw_VxD = carry
    h, t = xs
    chunk = lambda h_, w_: _chunk_sums(spec, h_, w_, t, consts)
    objective, vjp, (kd, ce) = jax.vjp(chunk, h, w_VxD, has_aux=True)
    dh, dw = vjp(jnp.ones((), jnp.float32))
    return (acc_3 + jnp.stack([objective, kd, ce]), dw_VxD + dw.astype(jnp.float32)), dh

  init = (jnp.zeros((3,), jnp.float32), jnp.zeros(w_VxD.shape, jnp.float32))
  (acc_3, dw_VxD), dh_NxBxCxD = jax.lax.scan(body, init, (h_NxBxCxD, tok))
  residuals = (dh_NxBxCxD, dw_VxD.astype(w_VxD.dtype), tok, consts)
  return (acc_3[0], acc_3[1], acc_3[2]), residuals


def _zero_cotangent(x):
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)


def _fused_bwd(spec, residuals, cotangents):
  dh_NxBxCxD, dw_VxD, tok, consts = residuals
  g = cotangents[0]  # kd_sum and ce_sum are reported with stop_gradient.
  zeros = lambda tree: jax.tree.map(_zero_cotangent, tree)
  return ((g * dh_NxBxCxD).astype(dh_NxBxCxD.dtype), (g * dw_VxD).astype(dw_VxD.dtype),
          zeros(tok), zeros(consts))


_fused_sums.defvjp(_fused_fwd, _fused_bwd)


def _to_chunks(x_BxT, num_chunks: int, chunk_len: int, fill=0):
  """[B, T, ...] -> [num_chunks, B, chunk_len, ...], padding T with ``fill``."""
  b, t = x_BxT.shape[:2]
  pad = num_chunks * chunk_len - t
  if pad:
    widths = [(0, 0), (0, pad)] + [(0, 0)] * (x_BxT.ndim - 2)
    x_BxT = jnp.pad(x_BxT, widths, constant_values=fill)
  x = x_BxT.reshape((b, num_chunks, chunk_len) + x_BxT.shape[2:])
  return constrain_batch(jnp.moveaxis(x, 1, 0), 1)


def chunk_positions(b: int, t: int, chunk_size: int) -> int:
  """Sequence positions per chunk of a [b, t] batch: ``chunk_size`` tokens per device, i.e.
  chunk_size // (b / n) for the n batch shards of the mesh traced under (n = 1 outside one)."""
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size} must be positive")
  rows_per_device = max(1, b // batch_shards(b))
  return max(1, min(t, chunk_size // rows_per_device))


def map_chunks(fn, hidden_BxTxD, chunk_size: int):
  """``fn(hidden_BxCxD)`` over the chunks of sequence positions the fused loss uses (``chunk_size``
  tokens per device), one chunk at a time; its outputs [B, C, ...] joined back to [B, T, ...]."""
  b, t = hidden_BxTxD.shape[:2]
  chunk_len = chunk_positions(b, t, chunk_size)
  num_chunks = -(-t // chunk_len)
  outs = jax.lax.map(fn, _to_chunks(hidden_BxTxD, num_chunks, chunk_len))

  def join(x_NxBxC):
    x = jnp.moveaxis(x_NxBxC, 0, 1)
    return x.reshape((b, num_chunks * chunk_len) + x.shape[3:])[:, :t]
  return jax.tree.map(join, outs)


def _static(name: str, value) -> float:
  """``value`` as a Python float; a traced value is refused (its gradient would be zero)."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(f"fused loss: {name} is a traced value; pass a Python float (it is static: "
                    "the loss is compiled for it and not differentiated with respect to it)")
  return float(value)


def _check_head(name: str, hidden, head_VxD):
  if hidden.ndim != 3:
    raise ValueError(f"{name} hidden must be [batch, seq, dim], got shape {hidden.shape}")
  if head_VxD.ndim != 2 or head_VxD.shape[1] != hidden.shape[-1]:
    raise ValueError(f"{name} head must be [vocab, {hidden.shape[-1]}] (PyTorch layout, see "
                     f"decoder.head_weight), got shape {head_VxD.shape}")


def _teacher_inputs(hidden_BxTxD, head_VxD, topk, student_btv, chunks, tok, consts) -> str:
  """Adds the teacher's chunked inputs to ``tok`` / ``consts``; returns its form: "topk"
  (``topk = (indices, logprobs, rest)``), "dense" (hidden states and head) or "none"."""
  b, t, num_v = student_btv
  if topk is not None:
    indices, logprobs, *rest = topk
    if indices.shape[:2] != (b, t) or indices.shape != logprobs.shape:
      raise ValueError(f"teacher top-k arrays {indices.shape} / {logprobs.shape} must be "
                       f"[{b}, {t}, k]")
    tok["teacher_indices"] = chunks(indices.astype(jnp.int32))
    tok["teacher_logprobs"] = chunks(logprobs)
    if rest and rest[0] is not None:
      if rest[0].shape != (b, t):
        raise ValueError(f"teacher top-k rest {rest[0].shape} must be [{b}, {t}]")
      tok["teacher_rest"] = chunks(rest[0])
    return "topk"
  if hidden_BxTxD is None:
    return "none"
  _check_head("teacher", hidden_BxTxD, head_VxD)
  if hidden_BxTxD.shape[:2] != (b, t) or head_VxD.shape[0] != num_v:
    raise ValueError(f"teacher hidden {hidden_BxTxD.shape} / head {head_VxD.shape} do not match "
                     f"the student's tokens ({b}, {t}) and vocabulary ({num_v}); slice both "
                     "heads to a common vocab first")
  tok["teacher_hidden"] = chunks(jax.lax.stop_gradient(hidden_BxTxD))
  consts["teacher_head"] = jax.lax.stop_gradient(head_VxD)
  return "dense"


def fused_distill_loss(student_hidden_BxTxD, student_head_VxD, teacher_hidden_BxTxD=None,
                       teacher_head_VxD=None, labels_BxT=None, *, kind: str = "fkl",
                       temperature=1.0, mask=None, vocab_limit: int | None = None,
                       kd_weight=1.0, ce_weight=0.0, chunk_size: int = 1024,
                       teacher_topk=None, missing: str = "tail", skew: float = 0.1,
                       beta: float = 0.5):
  """(kd_weight * KD_sum + ce_weight * CE_sum, metrics) from hidden states, chunked.

  The teacher is either dense (``teacher_hidden_BxTxD`` with ``teacher_head_VxD``) or top-k
  (``teacher_topk = (indices, logprobs, rest)``, ``losses.topk_teacher``'s outputs) or absent (CE
  only). ``metrics`` holds ``kd_sum``, ``ce_sum`` (gradient-free) and their token counts
  ``kd_count``, ``ce_count`` (CE also drops labels < 0). ``temperature``, ``kd_weight`` and
  ``ce_weight`` are Python floats (static); ``chunk_size`` is tokens per device (see above).
  """
  _check_head("student", student_hidden_BxTxD, student_head_VxD)
  losses.check_kind(kind, skew, beta)
  b, t, _ = student_hidden_BxTxD.shape
  num_v = student_head_VxD.shape[0]
  chunk_len = chunk_positions(b, t, chunk_size)
  num_chunks = -(-t // chunk_len)
  chunks = functools.partial(_to_chunks, num_chunks=num_chunks, chunk_len=chunk_len)

  weights_BxT = losses.token_weights((b, t), mask)
  tok = {"mask": chunks(weights_BxT)}
  consts = {}
  teacher = _teacher_inputs(teacher_hidden_BxTxD, teacher_head_VxD, teacher_topk, (b, t, num_v),
                            chunks, tok, consts)
  use_ce = labels_BxT is not None
  ce_weights_BxT = jnp.zeros((b, t), jnp.float32)
  if use_ce:
    if labels_BxT.shape != (b, t):
      raise ValueError(f"labels shape {labels_BxT.shape} does not match tokens ({b}, {t})")
    ce_weights_BxT = losses.label_weights(labels_BxT, mask)
    tok["labels"] = chunks(labels_BxT.astype(jnp.int32), fill=-1)
    tok["ce_mask"] = chunks(ce_weights_BxT)
  spec = _Spec(teacher, use_ce, _static("temperature", temperature),
               _static("kd_weight", kd_weight), _static("ce_weight", ce_weight), kind,
               vocab_limit, skew, beta, missing)
  objective, kd_sum, ce_sum = _fused_sums(spec, chunks(student_hidden_BxTxD), student_head_VxD,
                                          tok, consts)
  metrics = {"kd_sum": jax.lax.stop_gradient(kd_sum), "ce_sum": jax.lax.stop_gradient(ce_sum),
             "kd_count": jnp.sum(weights_BxT) if teacher != "none" else jnp.zeros(()),
             "ce_count": jnp.sum(ce_weights_BxT)}
  return objective, metrics


def fused_kd_loss(student_hidden_BxTxD, student_head_VxD, teacher_hidden_BxTxD, teacher_head_VxD,
                  kind: str = "fkl", temperature=1.0, mask=None, vocab_limit: int | None = None,
                  chunk_size: int = 1024, skew: float = 0.1, beta: float = 0.5):
  """(sum_t w_t T**2 D(p_t, q_t), sum_t w_t) with p, q from hidden @ head^T, chunked."""
  objective, metrics = fused_distill_loss(
      student_hidden_BxTxD, student_head_VxD, teacher_hidden_BxTxD, teacher_head_VxD, kind=kind,
      temperature=temperature, mask=mask, vocab_limit=vocab_limit, chunk_size=chunk_size,
      skew=skew, beta=beta)
  return objective, metrics["kd_count"]


def fused_cross_entropy(hidden_BxTxD, head_VxD, labels_BxT, mask=None,
                        vocab_limit: int | None = None, chunk_size: int = 1024):
  """(sum_t w_t (-log q_t[y_t]), sum_t w_t), w_t = mask_t [y_t >= 0], chunked."""
  objective, metrics = fused_distill_loss(
      hidden_BxTxD, head_VxD, labels_BxT=labels_BxT, mask=mask, vocab_limit=vocab_limit,
      kd_weight=0.0, ce_weight=1.0, chunk_size=chunk_size)
  return objective, metrics["ce_count"]
