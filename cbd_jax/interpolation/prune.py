"""A link's student cut from its teacher: which units and layers Shrink keeps, chosen by data.

  shrink="activation"   channels, FFN neurons, kv groups and heads ranked by their activations on
                        the link's own training rows (`importance.activation_scores`); layers
                        dropped one at a time by re-measured block influence; each kept norm's
                        scale recalibrated for the channels it lost (`rescale_norms`)
  shrink="weight_norm"  units ranked by weight norms (`resize.unit_scores`); evenly spaced layers
  shrink="leading"      the first units; evenly spaced layers

Ranking works by permutation: the teacher's units are reordered by score (its function is
unchanged), then a leading Shrink keeps the first ones, so every layer keeps its own best FFN
neurons and heads (a weight-norm Shrink keeps the same indices in every layer).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from cbd_jax.interpolation import align, importance, resize
from cbd_jax.model import layout
from cbd_jax.model.config import ModelConfig

SHRINKS = ("activation", "weight_norm", "leading")
MOMENT_BYTES = 2 ** 31  # Host memory for the second moments of the layers refitted at a time.
LAYER_CHOICES = ("greedy", "even")


def check_link(link, where: str) -> None:
  """A Shrink-started link's ``shrink`` (or "random", a control), ``shrink_layers`` and
  ``calib_tokens``, refused in one line before any link trains."""
  method, layers = link.get("shrink") or "activation", link.get("shrink_layers") or "greedy"
  if method not in SHRINKS + ("random",):
    raise ValueError(f"{where}: shrink={method!r}; use one of {SHRINKS + ('random',)}")
  if layers not in LAYER_CHOICES:
    raise ValueError(f"{where}: shrink_layers={layers!r}; use one of {LAYER_CHOICES}")
  tokens = link.get("calib_tokens")
  if tokens is not None and int(tokens) < 1:
    raise ValueError(f"{where}: calib_tokens={tokens} must be >= 1 (tokens of training text the "
                     "Shrink is calibrated on)")


def order_units(config: ModelConfig, params: dict, scores: dict[str, np.ndarray]) -> dict:
  """``params`` with units reordered by decreasing score (the same function): residual channels
  by ``scores["D"]`` [D]; per layer, FFN neurons by ``F`` [L, F], kv groups by ``K`` [L, K] and
  the heads inside each group by ``H`` [L, H] (heads move with their group)."""
  flat = {k: np.array(v) for k, v in resize.check_params(config, params).items()}
  if "D" in scores:
    align.permute_units(config, flat, "D", np.argsort(-scores["D"], kind="stable"))
  group = config.num_heads // config.num_kv_heads
  for layer in range(config.num_layers):
    align.permute_units(config, flat, "F", np.argsort(-scores["F"][layer], kind="stable"), layer)
    groups = np.argsort(-scores["K"][layer], kind="stable")
    heads = [g * group + np.argsort(-scores["H"][layer][g * group:(g + 1) * group], kind="stable")
             for g in groups]
    align.permute_units(config, flat, "K", groups, layer)
    align.permute_units(config, flat, "H", np.concatenate(heads), layer)
  return layout.unflatten(flat)


def rescale_norms(params: dict, stats: dict[str, np.ndarray], channels: np.ndarray,
                  layers: np.ndarray) -> dict:
  """Norm scales of a model keeping ``channels`` of the residual stream and ``layers``, each
  multiplied by sqrt(mean over the kept channels of E[y^2]) (y: the teacher's normalised input;
  ``stats`` from `importance.activation_stats`): a norm over fewer channels divides by their own
  root mean square, and this restores, on average, the teacher's scale of the kept channels."""
  out = dict(params, layers=dict(params["layers"]))
  for name in ("attn", "mlp"):
    factor = np.sqrt(stats[f"{name}_sq"][layers][:, channels].mean(-1))[:, None]
    norm = dict(out["layers"][f"{name}_norm"])
    norm["scale"] = (np.asarray(norm["scale"], np.float32) * factor).astype(norm["scale"].dtype)
    out["layers"][f"{name}_norm"] = norm
  factor = np.sqrt(stats["final_sq"][channels].mean())
  scale = params["final_norm"]["scale"]
  out["final_norm"] = dict(params["final_norm"],
                           scale=(np.asarray(scale, np.float32) * factor).astype(scale.dtype))
  return out


def refit_outputs(config: ModelConfig, ordered: dict, out: dict, target: ModelConfig,
                  kept_layers: np.ndarray, rows, ridge: float = 0.01) -> dict:
  """``out`` (a leading Shrink of ``ordered``) with the o and down weights of every kept layer
  refitted where heads or FFN neurons were cut: W' = argmin E|W x - W' x_kept|^2 + r |W'|^2,
  i.e. W' = W C[:, kept] (C[kept, kept] + r I)^-1 with C = E[x x^T] of what the weight reads
  (`importance.second_moments` of the teacher on ``rows``) and r = ``ridge`` * the mean of the
  kept diagonal: the kept units take over, on average, what the cut ones wrote."""
  maps = resize.make_maps(config, ordered, target, "leading")
  channels = maps["D"].src[:, 0]
  cut = {key: (kind, block, leaf) for key, kind, block, leaf, full, kept in (
      ("neurons", "F", "mlp", "down", config.intermediate_size, target.intermediate_size),
      ("heads", "H", "attn", "o", config.num_heads, target.num_heads)) if kept < full}
  if not cut:
    return out
  out = jax.tree.map(np.array, out)
  hd = config.head_dim
  width = max(config.intermediate_size, config.num_heads * hd)
  per_chunk = max(1, int(MOMENT_BYTES // (8 * width * width)))  # Layers measured at a time.
  for start in range(0, len(kept_layers), per_chunk):
    layers = np.asarray(kept_layers[start:start + per_chunk])
    moments = importance.second_moments(config, ordered, rows, layers, tuple(cut))
    for key, (kind, block, leaf) in cut.items():
      units = maps[kind].src[:, 0]
      cols = units if kind == "F" else (units[:, None] * hd + np.arange(hd)).reshape(-1)
      dest = out["layers"][block][leaf]["weight"]
      for i, layer in enumerate(layers):
        w = np.asarray(ordered["layers"][block][leaf]["weight"][layer], np.float64)
        w, c = w.reshape(config.hidden_size, -1), moments[key][i]
        kept = c[np.ix_(cols, cols)]
        kept = kept + ridge * np.trace(kept) / len(cols) * np.eye(len(cols))
        fitted = np.linalg.solve(kept, (w @ c[:, cols]).T).T[channels]
        dest[start + i] = fitted.reshape(dest.shape[1:]).astype(dest.dtype)
  return out


def shrink(config: ModelConfig, params: dict, target: ModelConfig, method: str = "activation",
           rows=None, layers: str = "greedy", rescale: bool = True, refit: bool = True,
           greedy_tokens: int = 2048, log: Callable[[str], None] = lambda _: None
           ) -> tuple[dict, dict]:
  """(params of ``target``'s shape cut from ``params``, what was chosen). ``rows`` [N, T]:
  calibration token ids (training text), needed by ``method="activation"`` and by
  ``layers="greedy"`` (which reads the first ``greedy_tokens`` of them). After an activation
  Shrink: ``rescale`` (`rescale_norms`) and ``refit`` (`refit_outputs`)."""
  if method not in SHRINKS:
    raise ValueError(f"unknown shrink {method!r}; use one of {SHRINKS}")
  if layers not in LAYER_CHOICES:
    raise ValueError(f"unknown shrink_layers {layers!r}; use one of {LAYER_CHOICES}")
  if rows is None and (method == "activation" or layers == "greedy"):
    raise ValueError(f"shrink={method!r} with shrink_layers={layers!r} needs calibration rows of "
                     "training text")
  resize.check_compatible(config, target)
  n = min(target.num_layers, config.num_layers)
  if layers == "greedy" and n < config.num_layers:
    rows = np.asarray(rows)
    head = rows[:max(1, -(-greedy_tokens // max(rows.shape[1] - 1, 1)))]
    kept = importance.greedy_layers(config, params, n, head)
    log(f"layers kept by greedy block influence: {kept.tolist()}")
  else:
    kept = resize.depth_map(config.num_layers, n, "identity").src[:, 0]
  info = {"shrink": method, "layers": kept.tolist()}
  if method != "activation":
    out = resize.resize(config, params, target, select=method,
                        layer_map=None if layers == "even" else resize.one_hot_map(kept))
    return out, info
  stats = importance.activation_stats(config, params, rows)
  scores = importance.activation_scores(config, params, rows, stats=stats)
  if target.hidden_size >= config.hidden_size:  # Channels stay where they are (no cut).
    scores = {k: v for k, v in scores.items() if k != "D"}
  ordered = order_units(config, params, scores)
  out = resize.resize(config, ordered, target, select="leading",
                      layer_map=resize.one_hot_map(kept))
  if refit:
    out = refit_outputs(config, ordered, out, target, kept, rows)
  if "D" in scores:
    channels = np.argsort(-scores["D"], kind="stable")[:target.hidden_size]
    info["channels"] = channels.tolist()
    if rescale:
      out = rescale_norms(out, stats, channels, kept)
  info["calibration_tokens"] = int(np.asarray(rows)[:, 1:].size)
  return out, info
