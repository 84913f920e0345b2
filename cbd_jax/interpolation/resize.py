"""Shrink and Grow: map a param tree onto another shape of the same family and vocabulary.

Every axis of every leaf indexes units of one kind (`model.layout`: layers L, residual channels D,
query heads H, kv groups K, FFN neurons F) in a role: it writes them ("copy") or reads them
("split").

One `AxisMap` per kind says, for every target unit, which source units it is built from and with
which weight: target = sum_k w[t, k] * source[src[t, k]] (src -1: a new unit, set to zero). A
"split" axis uses ``w_split``, which divides a unit copied n times by n (Net2Net). Using the same
map for every leaf keeps the residual channels, heads and their kv groups consistent everywhere.

Exactness of `grow`: FFN width and heads / kv groups are function-preserving with both methods
("zero" pads units whose outputs are zero; "net2net" duplicates units and divides what reads them).
Depth is exact with ``depth="identity"`` (new layers have zero o and down, so they add nothing)
and ``depth="zero"`` (new layers all zero); ``depth="repeat"`` copies layers and is not.
Residual width is not exact: RMSNorm and LayerNorm average over the channels, which new channels
change (zero-padding with RMSNorm is exact up to the norm scales, rescaled by
sqrt(D_source / D_target), and eps; see ``rescale_norms``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from cbd_jax.model.config import ModelConfig
from cbd_jax.model.layout import SPLIT, axis_sizes, flatten, leaf_specs, param_shapes, unflatten

Params = dict


class ResizeError(ValueError):
  """Anchors or target that cannot be mapped onto each other (the message names the fix)."""


@dataclasses.dataclass(frozen=True)
class AxisMap:
  """target[t] = sum_k w[t, k] * source[src[t, k]]; ``src`` -1 marks an empty (zero) slot."""

  src: np.ndarray  # [n_target, m] int
  w_copy: np.ndarray  # [n_target, m] for leaves that write the unit
  w_split: np.ndarray  # [n_target, m] for leaves that read it

  @property
  def size(self) -> int:
    return self.src.shape[0]


def one_hot_map(src, w_split=None, w_copy=None) -> AxisMap:
  """An AxisMap where each target unit comes from one source unit (or none, for -1)."""
  src = np.asarray(src, np.int64).reshape(-1, 1)
  filled = (src >= 0).astype(np.float64)
  w_copy = filled if w_copy is None else np.asarray(w_copy, np.float64).reshape(-1, 1) * filled
  w_split = filled if w_split is None else np.asarray(w_split, np.float64).reshape(-1, 1) * filled
  return AxisMap(src, w_copy, w_split)


def _split_weights(src: np.ndarray) -> np.ndarray:
  """1 / (number of target units copied from the same source unit); 0 for empty units."""
  src = np.asarray(src).reshape(-1)
  counts = np.bincount(src[src >= 0], minlength=max(int(src.max(initial=-1)) + 1, 1))
  return np.where(src >= 0, 1.0 / counts[np.maximum(src, 0)], 0.0)


def check_compatible(config: ModelConfig, target: ModelConfig) -> None:
  """Raises a one-line ResizeError unless the two configs differ only in size."""
  if config.family != target.family:
    raise ResizeError(f"model families differ ({config.family} vs {target.family}); Shrink/Grow "
                      "map within one family: pick anchors and target of the same family")
  if config.vocab_size != target.vocab_size:
    raise ResizeError(f"vocabularies differ ({config.vocab_size} vs {target.vocab_size} rows); "
                      "use anchors that share one tokenizer")
  if config.head_dim != target.head_dim:
    raise ResizeError(f"head_dim differs ({config.head_dim} vs {target.head_dim}); sizes between "
                      "anchors keep head_dim fixed")
  if config.tie_embeddings != target.tie_embeddings:
    raise ResizeError(f"tie_embeddings differs ({config.tie_embeddings} vs "
                      f"{target.tie_embeddings}); use anchors that agree")


def check_params(config: ModelConfig, params: Params, role: str = "params") -> dict:
  """Flattens ``params`` and checks every leaf against ``config``; errors name path and shapes."""
  flat = flatten(params)
  expected = param_shapes(config)
  missing, extra = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
  if missing or extra:
    raise ResizeError(f"{role}: leaves {missing} missing and {extra} unexpected for a "
                      f"{config.family} config; pass params that match the config")
  for path, shape in expected.items():
    if tuple(flat[path].shape) != shape:
      raise ResizeError(f"{role}: {path} has shape {tuple(flat[path].shape)}, config says "
                        f"{shape}; pass params that match the config")
  return flat


def _apply_axis(x, axis: int, amap: AxisMap, role: str | None):
  """Gathers ``amap``'s source units along ``axis`` of x and mixes them with the role's weights."""
  w = amap.w_split if role == SPLIT else amap.w_copy
  n, m = amap.src.shape
  trivial = m == 1 and np.all(amap.src[:, 0] == np.arange(n)) and n == x.shape[axis]
  if trivial and np.all(w == 1):
    return x
  g = np.take(x, np.maximum(amap.src, 0).reshape(-1), axis=axis)
  g = np.moveaxis(g, axis, -1).reshape(*g.shape[:axis], *g.shape[axis + 1:], n, m)
  if m == 1 and np.all(w == 1):
    out = g[..., 0]
  else:
    out = (g.astype(np.float32) * w.astype(np.float32)).sum(-1).astype(x.dtype)
  return np.moveaxis(out, -1, axis)


def apply_maps(config: ModelConfig, params: Params, target: ModelConfig,
               maps: dict[str, AxisMap]) -> Params:
  """Applies one AxisMap per axis kind to every leaf (on the host, in numpy: no compiles);
  checks every source and target leaf."""
  check_compatible(config, target)
  flat = {k: np.asarray(v) for k, v in check_params(config, params, "source params").items()}
  sizes = axis_sizes(target)
  maps = dict(maps)
  for kind in ("V", "P", "hd"):
    if kind not in maps:
      n_src = axis_sizes(config)[kind]
      maps[kind] = one_hot_map([i if i < n_src else -1 for i in range(sizes[kind])])
  out = {}
  for path, spec in leaf_specs(target).items():
    x = flat[path]
    for axis, (kind, role) in enumerate(spec):
      x = _apply_axis(x, axis, maps[kind], role)
    want = tuple(sizes[k] for k, _ in spec)
    if tuple(x.shape) != want:
      raise ResizeError(f"{path}: mapped to shape {tuple(x.shape)} but the target needs {want}")
    out[path] = x
  return unflatten(out)


# ---------------------------------------------------------------------------------------------
# Choosing units: which source units survive a shrink, and how new units are filled in a grow.
# ---------------------------------------------------------------------------------------------

def unit_scores(config: ModelConfig, params: dict, layer: int | None = None
                ) -> dict[str, np.ndarray]:
  """score_kind[u] = sum over leaves with a `kind` axis of mean_{other axes}(w^2)[u] / mean(w^2).

  Each leaf is normalised by its own mean square, so no single tensor dominates. Layers are scored
  only by what they write to the residual stream (o and down); a kv group adds its heads' scores.
  ``layer``: score the units of that one layer, from its own leaves only.
  """
  flat = check_params(config, params, "params")
  sizes = {"D": config.hidden_size, "F": config.intermediate_size, "H": config.num_heads,
           "K": config.num_kv_heads, "L": config.num_layers}
  scores = {k: np.zeros(n) for k, n in sizes.items()}
  for path, spec in leaf_specs(config).items():
    if layer is not None and spec[0][0] != "L":
      continue  # Embeddings and final norm: not part of one layer.
    sq = np.square(np.asarray(flat[path] if layer is None else flat[path][layer], np.float32))
    spec = spec if layer is None else spec[1:]
    total = float(sq.mean()) or 1.0
    for axis, (kind, role) in enumerate(spec):
      if kind not in scores or (kind == "L" and role != SPLIT):
        continue
      other = tuple(a for a in range(sq.ndim) if a != axis)
      scores[kind] += sq.mean(axis=other) / total
  group = config.num_heads // config.num_kv_heads
  scores["K"] += scores["H"].reshape(config.num_kv_heads, group).sum(-1)
  return scores


def _priority(n: int, scores: np.ndarray | None, keep: int) -> list[int]:
  """Source units, kept ones first in source order: the ``keep`` best by score (else leading)."""
  if scores is None:
    return list(range(n))
  best = sorted(np.argsort(-np.asarray(scores), kind="stable")[:min(keep, n)].tolist())
  return best + [i for i in range(n) if i not in set(best)]


def width_map(n_src: int, n_tgt: int, fill: str, scores=None) -> AxisMap:
  """Keeps n_tgt of n_src units (by score or leading), or pads with zeros / Net2Net copies."""
  order = _priority(n_src, scores, n_tgt)
  if n_tgt <= n_src:
    return one_hot_map(order[:n_tgt])
  extra = n_tgt - n_src
  if fill == "zero":
    return one_hot_map(order + [-1] * extra)
  src = np.array(order + [order[i % n_src] for i in range(extra)])
  return one_hot_map(src, w_split=_split_weights(src))


def depth_map(n_src: int, n_tgt: int, depth: str, scores=None) -> AxisMap:
  """Layers: keep evenly spaced ones (first and last kept; or the first, last and best by
  score), or grow by repeating each layer / inserting identity layers: ``"identity"`` copies the
  layer before with zero o and down, ``"zero"`` is all zeros (also an identity layer)."""
  if n_tgt <= n_src:
    if scores is None or n_tgt < 3:
      keep = np.round(np.linspace(0, n_src - 1, n_tgt)).astype(int) if n_tgt > 1 else [0]
    else:
      inner = np.argsort(-np.asarray(scores[1:-1]), kind="stable")[:n_tgt - 2] + 1
      keep = sorted([0, n_src - 1, *inner.tolist()])
    return one_hot_map(keep)
  # Source layer j lands at position round(j (n_tgt - 1) / (n_src - 1)); new layers follow it.
  pos = np.round(np.linspace(0, n_tgt - 1, n_src)).astype(int) if n_src > 1 else np.array([0])
  src = np.searchsorted(pos, np.arange(n_tgt), side="right") - 1
  is_new = np.ones(n_tgt, bool)
  is_new[pos] = False
  if depth == "identity":
    return one_hot_map(src, w_split=np.where(is_new, 0.0, 1.0))
  if depth == "zero":
    return one_hot_map(np.where(is_new, -1, src))
  if depth == "repeat":
    return one_hot_map(src)
  raise ResizeError(f"unknown depth method {depth!r}; use 'identity', 'zero' or 'repeat'")


def head_maps(src_cfg: ModelConfig, tgt_cfg: ModelConfig, fill: str, head_scores=None,
              group_scores=None) -> tuple[AxisMap, AxisMap]:
  """(query-head map, kv-group map) that keep every target head with its own kv group.

  Target group j reads kv from source groups S_j (mean-pooled when several) and holds G_t query
  heads taken from those groups: shrinking keeps the best groups and the best heads in each;
  growing keeps all and adds copies (``fill="net2net"``) or zero heads (``fill="zero"``).
  """
  ks, kt = src_cfg.num_kv_heads, tgt_cfg.num_kv_heads
  gs, gt = src_cfg.num_heads // ks, tgt_cfg.num_heads // kt
  r = 1 if gt <= gs else max(1, min(ks // kt, gt // gs))  # Source groups per target group.
  order_g = _priority(ks, group_scores, kt * r)
  n_heads_kept = min(gt, gs)
  order_h = {g: [g * gs + i for i in _priority(
      gs, None if head_scores is None else head_scores[g * gs:(g + 1) * gs], n_heads_kept)]
             for g in range(ks)}
  groups: list[tuple[list[int], list[int]]] = []
  if gt <= gs:  # A source group's heads fill ceil(gs / gt) target groups, each with its kv.
    chunks = math.ceil(gs / gt)
    # All chunks fit: keep a group's chunks adjacent (a later shrink merges them back); else the
    # first chunk of every group comes before any second chunk.
    rounds = [(g, i) for g in order_g for i in range(chunks)] if kt >= ks * chunks else [
        (g, i) for i in range(chunks) for g in order_g]
    groups += [([g], order_h[g][i * gt:(i + 1) * gt]) for g, i in rounds]
  else:  # A target group holds r source groups' heads and their mean-pooled kv.
    for j in range(ks // r):
      members = order_g[j * r:(j + 1) * r]
      groups.append((members, [h for g in members for h in order_h[g]]))
  n_groups = len(groups)
  for j in range(n_groups, kt):  # More groups than the source has: copies or zero groups.
    groups.append(groups[j % n_groups] if fill == "net2net" else ([], []))
  groups = groups[:kt]
  q_src = []
  for _, heads in groups:
    pad = [heads[i % len(heads)] if (heads and fill == "net2net") else -1
           for i in range(max(0, gt - len(heads)))]
    q_src += (heads + pad)[:gt]
  m = max(len(kv) for kv, _ in groups) or 1
  kv_src = np.full((kt, m), -1)
  kv_w = np.zeros((kt, m))
  for j, (kv, _) in enumerate(groups):
    kv_src[j, :len(kv)] = kv
    kv_w[j, :len(kv)] = 1.0 / max(len(kv), 1)
  q_src = np.array(q_src)
  return (one_hot_map(q_src, w_split=_split_weights(q_src)),
          AxisMap(kv_src, kv_w, kv_w))


# ---------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------

def make_maps(config: ModelConfig, params: Params, target: ModelConfig, select: str = "leading",
              fill: str = "net2net", depth: str = "identity",
              layer_select="even") -> dict[str, AxisMap]:
  """One AxisMap per kind: shrinking axes select (``select``), growing axes fill (``fill``).

  ``layer_select``: "even" (evenly spaced, first and last kept), "weight_norm" (weight norms of
  what each layer writes) or one score per source layer (e.g. `importance.block_influence`).
  """
  if select not in ("leading", "weight_norm"):
    raise ResizeError(f"unknown shrink method {select!r}; use 'leading' or 'weight_norm'")
  if fill not in ("zero", "net2net"):
    raise ResizeError(f"unknown grow method {fill!r}; use 'zero' or 'net2net'")
  given = None if isinstance(layer_select, str) else np.asarray(layer_select, np.float64)
  if given is not None and given.shape != (config.num_layers,):
    raise ResizeError(f"layer_select scores have shape {given.shape}, the source has "
                      f"{config.num_layers} layers; pass one score per layer")
  if given is None and layer_select not in ("even", "weight_norm"):
    raise ResizeError(f"unknown layer selection {layer_select!r}; use 'even', 'weight_norm' or "
                      "one score per layer")
  scores: dict[str, np.ndarray | None] = dict.fromkeys(("D", "F", "H", "K", "L"))
  by_norm = given is None and layer_select == "weight_norm"
  if select == "weight_norm" or by_norm:
    scores.update(unit_scores(config, params))
  if select != "weight_norm":
    scores.update(D=None, F=None, H=None, K=None)
  scores["L"] = given if given is not None else (scores["L"] if by_norm else None)
  c, t = config, target
  q_map, kv_map = head_maps(c, t, fill, scores["H"], scores["K"])
  return {"L": depth_map(c.num_layers, t.num_layers, depth, scores["L"]),
          "D": width_map(c.hidden_size, t.hidden_size, fill, scores["D"]),
          "F": width_map(c.intermediate_size, t.intermediate_size, fill, scores["F"]),
          "H": q_map, "K": kv_map}


def resize(config: ModelConfig, params: Params, target: ModelConfig, select: str = "leading",
           fill: str = "net2net", depth: str = "identity", layer_select="even",
           rescale_norms: bool = False, layer_map: AxisMap | None = None) -> Params:
  """Params of shape ``target``: select on shrinking axes, fill on growing axes.

  ``rescale_norms`` multiplies norm scales by sqrt(D_source / D_target): RMSNorm over zero-padded
  channels divides by a root mean square that is sqrt(D_source / D_target) times the source's.
  """
  maps = make_maps(config, params, target, select, fill, depth, layer_select)
  if layer_map is not None:  # E.g. layers aligned with another anchor (`align`).
    maps["L"] = layer_map
  out = apply_maps(config, params, target, maps)
  if rescale_norms and config.hidden_size != target.hidden_size:
    factor = math.sqrt(config.hidden_size / target.hidden_size)
    out = _map_norm_scales(out, lambda s: (s.astype(np.float32) * factor).astype(s.dtype))
  return out


def _map_norm_scales(params: Params, fn: Callable) -> Params:
  flat = flatten(params)
  for path in flat:
    if path.endswith("norm/scale") and not path.endswith(("q_norm/scale", "k_norm/scale")):
      flat[path] = fn(flat[path])
  return unflatten(flat)


def shrink(config: ModelConfig, params: Params, target: ModelConfig, method: str = "leading",
           layer_select="even") -> Params:
  """Shrink(theta) to ``target``: keeps evenly spaced layers and the leading (or, with
  ``method="weight_norm"``, the largest-norm) channels, neurons, kv groups and their heads."""
  return resize(config, params, target, select=method, fill="net2net", layer_select=layer_select)


def grow(config: ModelConfig, params: Params, target: ModelConfig, method: str = "zero",
         depth: str = "identity", rescale_norms: bool = False) -> Params:
  """Grow(theta) to ``target``: source units first, new units zero (``method="zero"``) or Net2Net
  copies with divided outgoing weights; new layers are identity layers or repeats (``depth``)."""
  return resize(config, params, target, select="leading", fill=method, depth=depth,
                rescale_norms=rescale_norms)
