"""Hidden-dim bridge: a linear projector between hidden sizes, a layer map, hidden-state losses.

The projector is P(x) = x W^T + b with W [d_out, d_in] (PyTorch layout, like every weight here).
Initialisations (``init_projector``):
  identity    W[i, i] = 1 for i < min(d_in, d_out), else 0 (truncated identity: shrinking keeps
              the first d_out channels, growing zero-pads); b = 0. A no-op when d_in = d_out.
  orthogonal  W with orthonormal rows (d_out <= d_in) or columns (d_out > d_in), from the QR of a
              Gaussian matrix; b = 0. Growing preserves norms: |P(x)| = |x|.
  lstsq       W, b = argmin sum_n |W x_n + b - y_n|^2 + ridge * |W|^2 fitted on paired activations
              x [N, d_in], y [N, d_out] (e.g. student and teacher hidden states on the same tokens).
In a link (``loss.hidden_weight`` > 0, `cbd_jax.distill.train_step`), the projector is fixed for the
whole link (``link_projector``: identity or seeded orthogonal), not trained; ``lstsq`` is for
analysis on paired activations. ``interpolation.resize`` does not use it: Shrink and Grow select and
copy units (see ``resize.width_map``).

Hidden losses compare the projected student state with the teacher state per token, teacher
without gradient: mse = mean_d (P(s) - t)^2, cosine = 1 - <P(s), t> / (|P(s)| |t|); reductions
are token-weighted ``(sum, count)`` pairs like ``cbd_jax.distill.losses``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cbd_jax.distill import losses

INITS = ("identity", "orthogonal", "lstsq")
HIDDEN_LOSSES = ("mse", "cosine")


def init_projector(d_in: int, d_out: int, init: str = "identity", rng: jax.Array | None = None,
                   x_NxDin=None, y_NxDout=None, ridge: float = 0.0) -> dict:
  """{"weight": W [d_out, d_in], "bias": b [d_out]} in fp32 by ``init`` (module docstring)."""
  if init not in INITS:
    raise ValueError(f"unknown projector init {init!r}; choose one of {INITS}")
  bias = jnp.zeros((d_out,), jnp.float32)
  if init == "identity":
    return {"weight": jnp.eye(d_out, d_in, dtype=jnp.float32), "bias": bias}
  if init == "orthogonal":
    if rng is None:
      raise ValueError("init='orthogonal' needs rng (a jax.random key)")
    g = jax.random.normal(rng, (max(d_in, d_out), min(d_in, d_out)), jnp.float32)
    q, r = jnp.linalg.qr(g)
    q = q * jnp.sign(jnp.diagonal(r))  # a unique, uniformly distributed Q
    return {"weight": q if d_out >= d_in else q.T, "bias": bias}
  if x_NxDin is None or y_NxDout is None:
    raise ValueError("init='lstsq' needs paired activations x_NxDin and y_NxDout")
  return fit_projector(x_NxDin, y_NxDout, ridge)


def link_projector(d_student: int, d_teacher: int, init: str = "identity",
                   seed: int = 0) -> dict | None:
  """The fixed student -> teacher projector of a link (None: identity of equal widths)."""
  if init not in ("identity", "orthogonal"):
    raise ValueError(f"loss.projector={init!r}: a link uses 'identity' or 'orthogonal' (lstsq "
                     "needs paired activations)")
  if init == "identity" and d_student == d_teacher:
    return None
  return init_projector(d_student, d_teacher, init, jax.random.key(seed))


def fit_projector(x_NxDin, y_NxDout, ridge: float = 0.0) -> dict:
  """W, b minimising sum_n |W x_n + b - y_n|^2 + ridge |W|^2 (centred normal equations, fp64)."""
  x = np.asarray(x_NxDin, np.float64).reshape(-1, np.shape(x_NxDin)[-1])
  y = np.asarray(y_NxDout, np.float64).reshape(-1, np.shape(y_NxDout)[-1])
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"x has {x.shape[0]} rows and y {y.shape[0]}; pass activations of the same "
                     "tokens")
  mx, my = x.mean(0), y.mean(0)
  xc, yc = x - mx, y - my
  gram = xc.T @ xc + ridge * np.eye(x.shape[1])
  w_t = np.linalg.lstsq(gram, xc.T @ yc, rcond=None)[0]  # [d_in, d_out]
  return {"weight": jnp.asarray(w_t.T, jnp.float32),
          "bias": jnp.asarray(my - mx @ w_t, jnp.float32)}


def apply_projector(projector: dict, x_xD) -> jax.Array:
  """P(x) = x W^T + b over the last axis, in fp32."""
  w = projector["weight"].astype(jnp.float32)
  return jnp.einsum("...i,oi->...o", x_xD.astype(jnp.float32), w) + projector["bias"]


def layer_map(num_student_layers: int, num_teacher_layers: int, mode: str = "uniform"):
  """Teacher hidden-state index for each student one (0 = embeddings, i = after layer i).

  uniform: j = round(i * L_t / L_s) (ends and embeddings meet); last: j = L_t - L_s + i for the
  student's top layers and 0 for its embeddings.
  """
  ls, lt = num_student_layers, num_teacher_layers
  if ls < 1 or lt < 1:
    raise ValueError(f"layer counts must be positive, got student {ls} and teacher {lt}")
  i = np.arange(ls + 1)
  if mode == "uniform":
    return np.floor(i * lt / ls + 0.5).astype(np.int32)
  if mode == "last":
    if ls > lt:
      raise ValueError(f"mode='last' needs the student ({ls} layers) no deeper than the teacher "
                       f"({lt}); use mode='uniform'")
    return np.where(i == 0, 0, lt - ls + i).astype(np.int32)
  raise ValueError(f"unknown layer map mode {mode!r}; choose 'uniform' or 'last'")


def hidden_loss_per_token(student_BxTxDs, teacher_BxTxDt, projector: dict | None = None,
                          kind: str = "mse") -> jax.Array:
  """mse = mean_d (P(s) - t)^2 or cosine = 1 - cos(P(s), t) per token; teacher gets no grad."""
  if kind not in HIDDEN_LOSSES:
    raise ValueError(f"unknown hidden loss {kind!r}; choose one of {HIDDEN_LOSSES}")
  s = student_BxTxDs.astype(jnp.float32) if projector is None else apply_projector(
      projector, student_BxTxDs)
  t = jax.lax.stop_gradient(teacher_BxTxDt.astype(jnp.float32))
  if s.shape != t.shape:
    raise ValueError(f"projected student states {s.shape} and teacher states {t.shape} differ; "
                     "pass a projector from the student's hidden size to the teacher's")
  if kind == "mse":
    return jnp.mean(jnp.square(s - t), axis=-1)
  eps = 1e-8
  dot = jnp.sum(s * t, axis=-1)
  norms = jnp.sqrt(jnp.sum(s * s, -1) + eps) * jnp.sqrt(jnp.sum(t * t, -1) + eps)
  return 1.0 - dot / norms


def layered_hidden_loss_sum(student_LxBxTxDs, teacher_LxBxTxDt, layers, projector: dict | None
                            = None, kind: str = "mse", mask=None):
  """(sum over student states i and tokens of loss(s_i, t_{layers[i]}), tokens * states)."""
  layers = jnp.asarray(layers)
  if layers.shape != (student_LxBxTxDs.shape[0],):
    raise ValueError(f"layer map has shape {layers.shape}, expected one entry for each of the "
                     f"{student_LxBxTxDs.shape[0]} student hidden states")
  teacher = teacher_LxBxTxDt[layers]
  per = hidden_loss_per_token(student_LxBxTxDs, teacher, projector, kind)  # [L, B, T]
  weights = losses.token_weights(per.shape[1:], mask)
  return losses.weighted_sum(per, jnp.broadcast_to(weights, per.shape))
