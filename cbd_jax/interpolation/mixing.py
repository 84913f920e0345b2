"""Anchor interpolation: theta_T = alpha * Grow(theta_small) + (1 - alpha) * Shrink(theta_large).

``small`` and ``large`` are ``(config, params)`` pairs of one family and vocabulary; alpha weights
the small anchor. Nothing here calls a teacher: `choose_alpha` scores candidates by the target's
own loss on token ids the caller provides.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cbd_jax.evaluation import heldout
from cbd_jax.interpolation import align, resize
from cbd_jax.model import layout
from cbd_jax.model.config import ModelConfig, num_params

Anchor = tuple[ModelConfig, dict]


def default_alpha(small: ModelConfig, large: ModelConfig, target: ModelConfig) -> float:
  """alpha = (P_large - P_target) / (P_large - P_small), clipped to [0, 1] (0.5 if P_l = P_s)."""
  p_s, p_l, p_t = num_params(small), num_params(large), num_params(target)
  if p_l == p_s:
    return 0.5
  return float(np.clip((p_l - p_t) / (p_l - p_s), 0.0, 1.0))


class Views(NamedTuple):
  """Both anchors on the target shape, and where Grow(small) holds a value.

  ``filled``: 1.0 where Grow(small) holds a source value, 0.0 where it only padded (zero fill /
  new layers). ``damp``: True where a padded unit *writes its output* (the o and down weights of
  a layer, FFN neuron or head only the large anchor has) or where the residual channel is new;
  the "output" mix scales only those by (1 - alpha) and takes the rest of such units whole.
  """

  grown: dict
  shrunk: dict
  filled: dict
  damp: dict


def _unfilled_units(maps: dict[str, resize.AxisMap]) -> dict[str, np.ndarray]:
  """{kind: [n_target] bool}: target units that Grow(small) leaves empty."""
  return {kind: ~((amap.src >= 0) & (amap.w_split > 0)).any(axis=-1)
          for kind, amap in maps.items() if kind in ("L", "D", "F", "H")}


def output_damp_mask(target: ModelConfig, unfilled: dict[str, np.ndarray]) -> dict:
  """Per leaf, True where a padded unit writes the residual stream: an axis of a padded layer,
  FFN neuron or head in the role that reads the unit (o, down), or any padded residual channel."""
  out = {}
  for path, spec in layout.leaf_specs(target).items():
    mask = np.zeros((), bool)
    for axis, (kind, role) in enumerate(spec):
      if kind in unfilled and (kind == "D" or role == layout.SPLIT):
        shape = [1] * len(spec)
        shape[axis] = -1
        mask = mask | unfilled[kind].reshape(shape)
    out[path] = np.broadcast_to(mask, tuple(layout.axis_sizes(target)[k] for k, _ in spec))
  return layout.unflatten(out)


def anchor_views(small: Anchor, large: Anchor, target: ModelConfig, shrink_method="leading",
                 grow_method="zero", depth="zero", rescale_norms=False, align_layers=True,
                 large_layer_scores=None, align_units=True, large_layers=None) -> Views:
  """`Views` of the two anchors on ``target``'s shape.

  ``align_layers``: every target layer is a layer of the large anchor, and Grow(small) puts each
  small layer where its counterpart sits (`align.aligned_depth_maps`; ``large_layer_scores``
  picks the other large layers kept, or ``large_layers`` names them all); else both take evenly
  spaced positions.
  ``align_units``: first reorder the large anchor's channels, neurons and heads so that each
  small unit's counterpart has its index (`align.align_units`); ``shrink_method`` then only
  orders the large units without a counterpart, and Shrink keeps the leading ones.
  """
  (small_config, small_params), (large_config, large_params) = small, large
  resize.check_compatible(small_config, large_config)
  if align_units:
    large_params = align.align_units(small_config, small_params, large_config, large_params,
                                     extras=shrink_method)
    shrink_method = "leading"
  small_map = large_map = None
  if align_layers and small_config.num_layers <= large_config.num_layers:
    small_map, large_map = align.aligned_depth_maps(
        small_config, small_params, large_config, large_params, target.num_layers, depth,
        large_layer_scores, large_layers)
  small_maps = resize.make_maps(small_config, small_params, target, "leading", grow_method, depth)
  if small_map is not None:
    small_maps["L"] = small_map
  grown = resize.resize(small_config, small_params, target, fill=grow_method, depth=depth,
                        rescale_norms=rescale_norms, layer_map=small_map)
  shrunk = resize.resize(large_config, large_params, target, select=shrink_method,
                         layer_map=large_map)
  ones = jax.tree.map(lambda x: np.ones(x.shape, np.float32), small_params)
  filled = jax.tree.map(lambda x: (x != 0).astype(np.float32), resize.apply_maps(
      small_config, ones, target, small_maps))
  damp = output_damp_mask(target, _unfilled_units(small_maps))
  return Views(grown, shrunk, filled, damp)


MIXES = ("output", "plain", "whole")  # Where Grow(small) only padded; see `mix_views`.


def mix_views(views: Views, alpha, mix: str = "output", xp=np, gamma=None) -> dict:
  """alpha * grown + (1 - alpha) * shrunk where Grow(small) holds a value (fp32, cast to shrunk's
  dtype). Where it only padded, by ``mix``: "plain" keeps the formula (the padded unit's every
  weight scaled by 1 - alpha), "whole" takes the large anchor's value, "output" takes it whole
  but scales what the unit writes to the residual stream by 1 - alpha (`Views.damp`), so the
  unit computes the large anchor's function and contributes (1 - alpha) of it (or ``gamma``
  of it, when given). ``xp``: np or jnp.
  """
  if mix not in MIXES:
    raise ValueError(f"unknown mix {mix!r}; use one of {MIXES}")

  def one(g, s, f, d):
    g32, s32 = xp.asarray(g, xp.float32), xp.asarray(s, xp.float32)
    out = alpha * g32 + (1.0 - alpha) * s32
    if mix == "whole":
      out = xp.where(f > 0, out, s32)
    elif mix == "output":
      scale = (1.0 - alpha) if gamma is None else gamma
      out = xp.where(f > 0, out, xp.where(d, scale * s32, s32))
    return out.astype(s.dtype)

  return jax.tree.map(one, views.grown, views.shrunk, views.filled, views.damp)


def interpolate(small: Anchor, large: Anchor, target_config: ModelConfig,
                alpha: float | None = None, mix: str = "output", shrink_method: str = "leading",
                grow_method: str = "zero", depth: str = "zero", rescale_norms: bool = False,
                align_layers: bool = True, large_layer_scores=None, align_units: bool = True,
                large_layers=None) -> dict:
  """alpha * Grow(small) + (1 - alpha) * Shrink(large) on ``target_config``'s shape.

  ``alpha`` defaults to `default_alpha`; ``mix`` says what happens where Grow only padded
  (`mix_views`). New layers of Grow(small) are all-zero identity layers by default (``depth``),
  so with the "output" mix those target layers compute the large anchor's layer, scaled by
  1 - alpha where they write the residual stream.
  """
  if alpha is None:
    alpha = default_alpha(small[0], large[0], target_config)
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha={alpha} is outside [0, 1]; alpha weights the small anchor")
  views = anchor_views(small, large, target_config, shrink_method, grow_method, depth,
                       rescale_norms, align_layers, large_layer_scores, align_units, large_layers)
  return mix_views(views, alpha, mix)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _mixed_nll_sum(config, alpha, gamma, mix, views, ids_NxT, row_mask_N):
  return heldout.nll_sum(config, mix_views(views, alpha, mix, jnp, gamma), ids_NxT, row_mask_N)


def mixed_loss(target_config: ModelConfig, views: Views, alpha: float, mix: str,
               ids_NxT: np.ndarray, batch_size: int = 8, gamma: float | None = None) -> float:
  """`heldout.mean_nll` of ``mix_views(views, alpha, mix)``, mixed inside one compiled function
  (no recompilation per alpha)."""
  heldout.check_rows(target_config, ids_NxT)
  gamma = 1.0 - alpha if gamma is None else gamma
  fn = functools.partial(_mixed_nll_sum, target_config, jnp.float32(alpha), jnp.float32(gamma),
                         mix, views)
  return heldout.total_nll(fn, ids_NxT, batch_size) / ids_NxT[:, 1:].size


def _grid_search(score: Callable[[float], float], grid: Sequence[float], refinements: int,
                 extra: Sequence[float] = ()) -> tuple[float, dict[float, float]]:
  """(x, {x: loss}): ``score`` at every point of ``grid`` (evenly spaced in [0, 1]) and of
  ``extra``, then ``refinements`` times at the two points half a grid step (then a quarter, ...)
  on either side of the best."""
  losses: dict[float, float] = {}

  def at(x):
    x = float(np.clip(round(x, 4), 0.0, 1.0))
    if x not in losses:
      losses[x] = score(x)

  for x in (*grid, *extra):
    at(x)
  step = (grid[1] - grid[0]) / 2 if len(grid) > 1 else 0.0
  for _ in range(refinements):
    best = min(losses, key=losses.get)
    at(best - step)
    at(best + step)
    step /= 2
  return min(losses, key=losses.get), dict(sorted(losses.items()))


def choose_alpha(target_config: ModelConfig, views: Views, mix: str, ids_NxT: np.ndarray,
                 grid: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), refinements: int = 2,
                 batch_size: int = 8) -> tuple[float, dict[float, float]]:
  """(alpha, {alpha: loss}): teacher-free choice of alpha by the target's own loss on ``ids``
  (keep them apart from the text the final number is reported on): every alpha of ``grid``,
  then ``refinements`` times the two points half a grid step (then a quarter, ...) on either
  side of the best so far."""
  views = jax.device_put(views)
  return _grid_search(
      lambda a: mixed_loss(target_config, views, a, mix, ids_NxT, batch_size), grid, refinements)


def choose_gamma(target_config: ModelConfig, views: Views, alpha: float, ids_NxT: np.ndarray,
                 grid: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), refinements: int = 2,
                 batch_size: int = 8) -> tuple[float, dict[float, float]]:
  """(gamma, {gamma: loss}): for the "output" mix at ``alpha``, the share of their output that
  units only the large anchor has write (`mix_views`), by the target's own loss on ``ids``: the
  `choose_alpha` search over gamma, with gamma = 1 - alpha (the mix's default) scored too, so
  the choice is never worse than the default on these rows. Near the small anchor (alpha close
  to 1) the shared units must stay close to the small anchor's, while the large anchor's own
  units (its extra heads, neurons and layers) carry more than 1 - alpha of their function."""
  views = jax.device_put(views)
  score = lambda g: mixed_loss(target_config, views, alpha, "output", ids_NxT, batch_size,  # noqa: E731
                               gamma=g)
  return _grid_search(score, grid, refinements, extra=(1.0 - alpha,))
