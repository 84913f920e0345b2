"""Anchor interpolation: theta_T = alpha * Grow(theta_small) + (1 - alpha) * Shrink(theta_large).

``small`` and ``large`` are ``(config, params)`` pairs of one family and vocabulary; alpha weights
the small anchor. Nothing here calls a teacher: the optional alpha sweep scores candidates by the
target's own held-out loss on token ids the caller provides.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cbd_jax import align, heldout, resize
from cbd_jax.config import ModelConfig, num_params

Anchor = tuple[ModelConfig, dict]
DEFAULT_ALPHAS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2).tolist())


def default_alpha(small: ModelConfig, large: ModelConfig, target: ModelConfig) -> float:
  """alpha = (P_large - P_target) / (P_large - P_small), clipped to [0, 1] (0.5 if P_l = P_s)."""
  p_s, p_l, p_t = num_params(small), num_params(large), num_params(target)
  if p_l == p_s:
    return 0.5
  return float(np.clip((p_l - p_t) / (p_l - p_s), 0.0, 1.0))


def anchor_views(small: Anchor, large: Anchor, target: ModelConfig, shrink_method="leading",
                 grow_method="zero", depth="zero", rescale_norms=False, align_layers=True,
                 large_layer_scores=None, align_units=True):
  """(Grow(small), Shrink(large), filled): both anchors on the target shape; ``filled`` is 1.0
  where Grow(small) holds a source value and 0.0 where it only padded (zero fill / new layers).

  ``align_layers``: every target layer is a layer of the large anchor, and Grow(small) puts each
  small layer where its counterpart sits (`align.aligned_depth_maps`; ``large_layer_scores``
  picks the other large layers kept); else both take evenly spaced positions.
  ``align_units``: first reorder the large anchor's channels, neurons and heads so that each
  small unit's counterpart has its index (`align.align_units`); ``shrink_method`` then only
  orders the large units without a counterpart, and Shrink keeps the leading ones.
  """
  (cs, ps), (cl, pl) = small, large
  resize.check_compatible(cs, cl)
  if align_units:
    pl = align.align_units(cs, ps, cl, pl, extras=shrink_method)
    shrink_method = "leading"
  small_map = large_map = None
  if align_layers and cs.num_layers <= cl.num_layers:
    small_map, large_map = align.aligned_depth_maps(cs, ps, cl, pl, target.num_layers, depth,
                                                    large_layer_scores)
  grown = resize.resize(cs, ps, target, fill=grow_method, depth=depth,
                        rescale_norms=rescale_norms, layer_map=small_map)
  shrunk = resize.resize(cl, pl, target, select=shrink_method, layer_map=large_map)
  ones = jax.tree.map(lambda x: np.ones(x.shape, np.float32), ps)
  filled = jax.tree.map(lambda x: (x != 0).astype(np.float32), resize.resize(
      cs, ones, target, fill=grow_method, depth=depth, layer_map=small_map))
  return grown, shrunk, filled


def mix(grown: dict, shrunk: dict, alpha, filled: dict | None = None, xp=np) -> dict:
  """alpha * grown + (1 - alpha) * shrunk (in fp32, cast to shrunk's dtype); where ``filled`` is 0
  (only the large anchor has a value) the shrunk value is taken whole. ``xp``: np or jnp."""
  def one(g, s, f=None):
    g32, s32 = xp.asarray(g, xp.float32), xp.asarray(s, xp.float32)
    out = alpha * g32 + (1.0 - alpha) * s32
    if f is not None:
      out = xp.where(f > 0, out, s32)
    return out.astype(s.dtype)

  if filled is None:
    return jax.tree.map(one, grown, shrunk)
  return jax.tree.map(one, grown, shrunk, filled)


def interpolate(small: Anchor, large: Anchor, target_config: ModelConfig,
                alpha: float | None = None, shrink_method: str = "leading",
                grow_method: str = "zero", depth: str = "zero", renormalize: bool = False,
                rescale_norms: bool = False, align_layers: bool = True,
                large_layer_scores=None, align_units: bool = True) -> dict:
  """alpha * Grow(small) + (1 - alpha) * Shrink(large) on ``target_config``'s shape.

  ``alpha`` defaults to `default_alpha`. ``renormalize`` takes the large anchor's value whole in
  the regions Grow only padded (where the plain mix would scale it by 1 - alpha). New layers of
  Grow(small) are all-zero identity layers by default (``depth``), so those target layers are
  (1 - alpha) times the large anchor's layer rather than a blend with a copied neighbour.
  """
  if alpha is None:
    alpha = default_alpha(small[0], large[0], target_config)
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha={alpha} is outside [0, 1]; alpha weights the small anchor")
  grown, shrunk, filled = anchor_views(small, large, target_config, shrink_method, grow_method,
                                       depth, rescale_norms, align_layers,
                                       large_layer_scores, align_units)
  return mix(grown, shrunk, alpha, filled if renormalize else None)


def _nll_sum(config: ModelConfig, params: dict, ids_NxT):
  """(sum of next-token NLL over the real vocabulary, token count): `heldout.nll_sum`."""
  return heldout.nll_sum(config, params, ids_NxT, jnp.ones(ids_NxT.shape[0])), ids_NxT[:, 1:].size


@functools.partial(jax.jit, static_argnums=0)
def _mixed_nll_sum(config, alpha, grown, shrunk, filled, ids_NxT):
  return _nll_sum(config, mix(grown, shrunk, alpha, filled, xp=jnp), ids_NxT)


def _mean_nll(fn, ids_NxT: np.ndarray, batch_size: int) -> float:
  total, count = 0.0, 0
  for i in range(0, len(ids_NxT), batch_size):
    s, n = fn(jnp.asarray(ids_NxT[i:i + batch_size]))
    total, count = total + float(s), count + int(n)
  return total / max(count, 1)


def heldout_loss(config: ModelConfig, params: dict, ids_NxT: np.ndarray,
                 batch_size: int = 4) -> float:
  """Mean next-token cross entropy (nats) of ``params`` on ``ids`` [N, T], in batches of rows."""
  params = jax.device_put(params)
  return _mean_nll(lambda ids: _nll_sum(config, params, ids), ids_NxT, batch_size)


def sweep_alpha(small: Anchor, large: Anchor, target_config: ModelConfig, ids_NxT: np.ndarray,
                alphas: Sequence[float] = DEFAULT_ALPHAS, batch_size: int = 4, **kwargs
                ) -> tuple[float, dict[float, float]]:
  """(best alpha, {alpha: held-out loss}): teacher-free choice of alpha by the target's own loss
  on ``ids`` (keep them apart from the text the final number is reported on)."""
  renormalize = kwargs.pop("renormalize", False)
  grown, shrunk, filled = jax.device_put(anchor_views(small, large, target_config, **kwargs))
  filled = filled if renormalize else None
  losses = {}
  for alpha in alphas:
    losses[float(alpha)] = _mean_nll(
        lambda ids, a=alpha: _mixed_nll_sum(target_config, jnp.float32(a), grown, shrunk, filled,
                                            ids), ids_NxT, batch_size)
  best = min(losses, key=losses.get)
  return best, losses
