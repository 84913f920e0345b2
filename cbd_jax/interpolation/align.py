"""Alignment: which layers, channels, neurons and heads of the large anchor are the small one's.

Anchors of one chain descend from each other (a small anchor starts as its predecessor shrunk, and
an importance Shrink keeps a scattered subset of channels, neurons and heads), so their units have
counterparts; mixing a unit with anything but its counterpart destroys both. `align_units`
reorders the large anchor's units (a permutation, so its function is unchanged) until each small
unit's counterpart sits at the small unit's index and a leading Shrink keeps them. Layers are
matched by per-layer signatures (`match_layers`); residual channels by embedding columns; FFN
neurons, kv groups and heads layer by layer, by the weights that read and write them.
"""

from __future__ import annotations

import numpy as np
import scipy.optimize

from cbd_jax.interpolation import resize
from cbd_jax.model import layout
from cbd_jax.model.config import ModelConfig


def layer_signatures(config: ModelConfig, params: dict, channels: int) -> np.ndarray:
  """[L, 4 * channels]: per layer, the z-scored attn/mlp norm scales and o/down row norms."""
  flat = layout.flatten(params)
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


def aligned_depth_maps(small_config: ModelConfig, small_params: dict, large_config: ModelConfig,
                       large_params: dict, n_target: int, depth: str = "zero",
                       large_scores=None, large_layers=None
                       ) -> tuple[resize.AxisMap, resize.AxisMap]:
  """(small map, large map) for a target of ``n_target`` layers whose every layer is a layer of
  the large anchor: each small layer's counterpart m[j], plus n_target - L_small of the large
  layers without a counterpart (the best by ``large_scores``, else evenly spread; or the
  ``large_layers`` given, which must hold the counterparts). Grow(small) puts layer j where its
  counterpart sits; the other positions are new layers (``depth``)."""
  n_small, n_large = small_config.num_layers, large_config.num_layers
  if n_small > n_large:
    raise resize.ResizeError("the small anchor has more layers than the large one; pass the "
                             "anchors in (small, large) order")
  m = depth_counterparts(small_config, small_params, large_config, large_params)
  if n_target <= n_small:  # Evenly spaced small layers and their counterparts.
    keep = resize.depth_map(n_small, n_target, depth).src[:, 0]
    return resize.one_hot_map(keep), resize.one_hot_map(m[keep])
  extra = n_target - n_small
  free = np.setdiff1d(np.arange(n_large), m)
  if large_layers is not None:
    layers = np.sort(np.asarray(large_layers, np.int64))
    if len(layers) != n_target or not np.isin(m, layers).all():
      raise resize.ResizeError(f"large_layers {layers.tolist()} must be {n_target} layers "
                               f"holding the small anchor's counterparts {m.tolist()}")
  elif extra <= len(free):
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
    small_map = resize.one_hot_map(small_src)
  elif depth == "identity":
    small_map = resize.one_hot_map(copied, w_split=np.where(is_new, 0.0, 1.0))
  elif depth == "repeat":
    small_map = resize.one_hot_map(copied)
  else:
    raise resize.ResizeError(f"unknown depth method {depth!r}; use 'zero', 'identity' or "
                             "'repeat'")
  return small_map, resize.one_hot_map(layers)


def depth_counterparts(small_config: ModelConfig, small_params: dict, large_config: ModelConfig,
                       large_params: dict) -> np.ndarray:
  """m[j]: the large layer that is small layer j's counterpart (increasing in j)."""
  channels = min(small_config.hidden_size, large_config.hidden_size)
  sig_s = layer_signatures(small_config, small_params, channels)
  sig_l = layer_signatures(large_config, large_params, channels)
  return match_layers(sig_s @ sig_l.T / sig_s.shape[1])


def _unit_rows(x: np.ndarray) -> np.ndarray:
  """[n, ...] -> [n, prod(...)] rows of unit length (zero rows stay zero)."""
  x = np.asarray(x, np.float32).reshape(len(x), -1)
  return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)


def _features(parts_small, parts_large) -> np.ndarray:
  """Cosine similarity [n_small, n_large] of units described by several weight slices each."""
  xs = np.concatenate([_unit_rows(p) for p in parts_small], axis=-1)
  xl = np.concatenate([_unit_rows(p) for p in parts_large], axis=-1)
  return xs @ xl.T / len(parts_small)


def assign(similarity: np.ndarray) -> np.ndarray:
  """a[i]: the distinct large unit matched to small unit i, maximising total similarity (the
  row-wise argmax when it is already one-to-one, else a linear assignment)."""
  best = similarity.argmax(axis=1)
  if len(np.unique(best)) == len(best):
    return best
  rows, cols = scipy.optimize.linear_sum_assignment(similarity, maximize=True)
  return cols[np.argsort(rows)]


def _order(matched: np.ndarray, n: int, scores: np.ndarray | None) -> np.ndarray:
  """A permutation of range(n): the matched units first, then the rest (best score first)."""
  rest = np.setdiff1d(np.arange(n), matched)
  if scores is not None:
    rest = rest[np.argsort(-np.asarray(scores)[rest], kind="stable")]
  return np.concatenate([np.asarray(matched, np.int64), rest]).astype(np.int64)


def permute_units(config: ModelConfig, flat: dict, kind: str, perm: np.ndarray,
             layer: int | None = None) -> None:
  """Reorders the ``kind`` units of every leaf in ``flat`` (of one layer, in place, or of all)."""
  for path, spec in layout.leaf_specs(config).items():
    for axis, (k, _) in enumerate(spec):
      if k == kind and layer is None:
        flat[path] = np.take(flat[path], perm, axis=axis)
      elif k == kind:
        flat[path][layer] = np.take(flat[path][layer], perm, axis=axis - 1)


def _layer_slices(config: ModelConfig, flat: dict, layer: int, channels: int) -> dict:
  """Per-unit weight slices of one layer on the first ``channels`` residual channels:
  {"F": [...], "K": [...], "H": [...]}, each a list of [units, ...] arrays."""
  c, d = config, channels
  take = lambda path: np.array(flat[path][layer], np.float32)  # A copy: flat changes later.
  q, k, v = take("layers/attn/q/weight"), take("layers/attn/k/weight"), take("layers/attn/v/weight")
  o = take("layers/attn/o/weight")[:d]  # [D, H, hd]
  up, down = take("layers/mlp/up/weight")[:, :d], take("layers/mlp/down/weight")[:d].T
  ffn = [up, down] + ([take("layers/mlp/gate/weight")[:, :d]] if c.gated_mlp else [])
  return {"F": ffn, "K": [k[..., :d], v[..., :d]], "H": [q[..., :d], o.transpose(1, 2, 0)]}


def align_units(small_config: ModelConfig, small_params: dict, large_config: ModelConfig,
                large_params: dict, extras: str = "leading") -> dict:
  """The large anchor's params with its units reordered (same function) so that every unit of
  the small anchor has its counterpart at the same index: residual channels (by embedding
  columns), then, for each small layer and its counterpart layer, FFN neurons, kv groups and the
  query heads inside each group (by the weights that read and write them).

  Units the small anchor has no counterpart for follow, in source order (``extras="leading"``)
  or by weight norm (``"weight_norm"``), so a leading Shrink of the result keeps the counterparts
  and then the best of the rest. An axis where the small anchor has more units is left as it is.
  """
  if extras not in ("leading", "weight_norm"):
    raise resize.ResizeError(f"unknown shrink method {extras!r}; use 'leading' or 'weight_norm'")
  resize.check_compatible(small_config, large_config)
  fs = resize.check_params(small_config, small_params, "small anchor")
  fl = {k: np.array(v)
        for k, v in resize.check_params(large_config, large_params, "large anchor").items()}
  scored = extras == "weight_norm"
  d = min(small_config.hidden_size, large_config.hidden_size)
  if small_config.hidden_size <= large_config.hidden_size:
    sim = _features([np.asarray(fs["embed/embedding"], np.float32).T],
                    [np.asarray(fl["embed/embedding"], np.float32).T])
    scores = resize.unit_scores(large_config, layout.unflatten(fl))["D"] if scored else None
    permute_units(large_config, fl, "D", _order(assign(sim), large_config.hidden_size, scores))
  m = depth_counterparts(small_config, small_params, large_config, layout.unflatten(fl))
  gs = small_config.num_heads // small_config.num_kv_heads
  gl = large_config.num_heads // large_config.num_kv_heads
  for j, b in enumerate(m):
    small, large = _layer_slices(small_config, fs, j, d), _layer_slices(large_config, fl, b, d)
    scores = resize.unit_scores(large_config, layout.unflatten(fl), layer=b) if scored else {}
    if small_config.intermediate_size <= large_config.intermediate_size:
      matched = assign(_features(small["F"], large["F"]))
      order = _order(matched, large_config.intermediate_size, scores.get("F"))
      permute_units(large_config, fl, "F", order, b)
    if small_config.num_kv_heads > large_config.num_kv_heads or gs > gl:
      continue
    groups = assign(_features(small["K"], large["K"]))
    group_order = _order(groups, large_config.num_kv_heads, scores.get("K"))
    permute_units(large_config, fl, "K", group_order, b)
    head_scores = scores.get("H")
    head_order = []
    for i, g in enumerate(group_order):  # Heads move with their group; inside, counterparts first.
      heads_l = np.arange(g * gl, (g + 1) * gl)
      if i < small_config.num_kv_heads:
        heads_s = np.arange(i * gs, (i + 1) * gs)
        sim = _features([p[heads_s] for p in small["H"]], [p[heads_l] for p in large["H"]])
        local = _order(assign(sim), gl, None if head_scores is None else head_scores[heads_l])
      else:
        local = _order(np.zeros(0, np.int64), gl,
                       None if head_scores is None else head_scores[heads_l])
      head_order.append(heads_l[local])
    permute_units(large_config, fl, "H", np.concatenate(head_order), b)
  return layout.unflatten(fl)
