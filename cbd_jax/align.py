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


def matched_depth_map(small_cfg: ModelConfig, small_params: dict, large_cfg: ModelConfig,
                      large_params: dict, small_map: resize.AxisMap) -> resize.AxisMap:
  """Depth map of Shrink(large) aligned with Grow(small)'s ``small_map``: where Grow put small
  layer j, take its counterpart m[j]; new positions take the large layers in between."""
  if small_cfg.num_layers > large_cfg.num_layers:
    raise resize.ResizeError("the small anchor has more layers than the large one; pass the "
                             "anchors in (small, large) order")
  channels = min(small_cfg.hidden_size, large_cfg.hidden_size)
  sig_s = layer_signatures(small_cfg, small_params, channels)
  sig_l = layer_signatures(large_cfg, large_params, channels)
  m = match_layers(sig_s @ sig_l.T / sig_s.shape[1])
  src, real = small_map.src[:, 0], small_map.w_split[:, 0] > 0
  # A target position holds a real small layer when it is its first occurrence and not zeroed.
  first = real & np.concatenate([[True], src[1:] != src[:-1]])
  out = np.full(len(src), -1)
  out[first] = m[src[first]]
  fixed = [-1, *np.flatnonzero(first).tolist(), len(src)]
  for a, b in zip(fixed[:-1], fixed[1:], strict=True):
    gap = b - a - 1
    if gap <= 0:
      continue
    lo = out[a] if a >= 0 else -1
    hi = out[b] if b < len(src) else large_cfg.num_layers
    between = np.arange(lo + 1, hi)
    if len(between) >= gap:  # Evenly spread inside the interval.
      out[a + 1:b] = between[(np.arange(1, gap + 1) * len(between)) // (gap + 1)]
    else:  # Fewer large layers in between than positions: repeat the nearest one.
      nearest = max(lo, 0) if a >= 0 else min(hi, large_cfg.num_layers - 1)
      out[a + 1:b] = np.concatenate([between, np.full(gap, nearest)])[:gap]
  return resize._one_hot_map(out)
