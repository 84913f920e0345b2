"""Layer alignment: which layers of the large anchor correspond to the small anchor's layers.

Anchors of one chain descend from each other (a small anchor starts as its predecessor shrunk), so
their layers have counterparts; mixing a layer with a neighbour of its counterpart destroys both.
The counterpart is found by comparing per-layer signatures (norm scales and the per-channel size
of what the layer writes) on the residual channels the two share (the leading ones).
"""

from __future__ import annotations

import numpy as np

from cbd_jax import resize
from cbd_jax.config import ModelConfig


def layer_signatures(config: ModelConfig, params: dict, channels: int) -> np.ndarray:
  """[L, 4 * channels]: per layer, the z-scored attn/mlp norm scales and o/down row norms."""
  flat = resize.flatten(params)
  o = np.asarray(flat["layers/attn/o/weight"], np.float32)[:, :channels]
  down = np.asarray(flat["layers/mlp/down/weight"], np.float32)[:, :channels]
  parts = [np.asarray(flat["layers/attn_norm/scale"], np.float32)[:, :channels],
           np.asarray(flat["layers/mlp_norm/scale"], np.float32)[:, :channels],
           np.sqrt((o.reshape(*o.shape[:2], -1) ** 2).sum(-1)), np.sqrt((down ** 2).sum(-1))]
  parts = [(x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + 1e-8) for x in parts]
  return np.concatenate(parts, axis=-1)


def match_layers(similarity: np.ndarray) -> np.ndarray:
  """Increasing m[j] maximising sum_j similarity[j, m[j]] (a monotone assignment, by DP)."""
  n_small, n_large = similarity.shape
  best = np.full((n_small, n_large), -np.inf)
  back = np.full((n_small, n_large), -1)
  best[0] = similarity[0]
  for j in range(1, n_small):
    run_max, run_arg = -np.inf, -1  # max of best[j - 1][b'] over b' < b.
    for b in range(n_large):
      if b > 0 and best[j - 1][b - 1] > run_max:
        run_max, run_arg = best[j - 1][b - 1], b - 1
      best[j, b], back[j, b] = run_max + similarity[j, b], run_arg
  m = np.zeros(n_small, np.int64)
  m[-1] = int(np.argmax(best[-1]))
  for j in range(n_small - 1, 0, -1):
    m[j - 1] = back[j, m[j]]
  return m


def aligned_depth_maps(small_cfg: ModelConfig, small_params: dict, large_cfg: ModelConfig,
                       large_params: dict, n_target: int, depth: str = "zero",
                       large_scores=None) -> tuple[resize.AxisMap, resize.AxisMap]:
  """(small map, large map) for a target of ``n_target`` layers whose every layer is a layer of
  the large anchor: each small layer's counterpart m[j], plus n_target - L_small of the large
  layers without a counterpart (the best by ``large_scores``, else evenly spread). Grow(small)
  puts layer j where its counterpart sits; the other positions are new layers (``depth``)."""
  n_small, n_large = small_cfg.num_layers, large_cfg.num_layers
  if n_small > n_large:
    raise resize.ResizeError("the small anchor has more layers than the large one; pass the "
                             "anchors in (small, large) order")
  channels = min(small_cfg.hidden_size, large_cfg.hidden_size)
  sig_s = layer_signatures(small_cfg, small_params, channels)
  sig_l = layer_signatures(large_cfg, large_params, channels)
  m = match_layers(sig_s @ sig_l.T / sig_s.shape[1])
  if n_target <= n_small:  # Evenly spaced small layers and their counterparts.
    keep = resize.depth_map(n_small, n_target, depth).src[:, 0]
    return resize._one_hot_map(keep), resize._one_hot_map(m[keep])
  extra = n_target - n_small
  free = np.setdiff1d(np.arange(n_large), m)
  if extra <= len(free):
    if large_scores is None:
      chosen = free[(np.arange(1, extra + 1) * len(free)) // (extra + 1)]
    else:
      chosen = free[np.argsort(-np.asarray(large_scores)[free], kind="stable")[:extra]]
    layers = np.sort(np.concatenate([m, chosen]))
  else:  # Deeper than the large anchor: every large layer, repeated.
    layers = resize.depth_map(n_large, n_target, "repeat").src[:, 0]
  small_src = np.full(n_target, -1)
  for j, b in enumerate(m):
    small_src[np.flatnonzero(layers == b)[0]] = j
  is_new = small_src < 0
  before = np.maximum.accumulate(np.where(is_new, -1, np.arange(n_target)))
  copied = np.where(before >= 0, small_src[np.maximum(before, 0)], 0)  # The small layer before.
  if depth == "zero":
    small_map = resize._one_hot_map(small_src)
  elif depth == "identity":
    small_map = resize._one_hot_map(copied, w_split=np.where(is_new, 0.0, 1.0))
  elif depth == "repeat":
    small_map = resize._one_hot_map(copied)
  else:
    raise resize.ResizeError(f"unknown depth method {depth!r}; use 'zero', 'identity' or "
                             "'repeat'")
  return small_map, resize._one_hot_map(layers)
