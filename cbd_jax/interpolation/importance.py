"""Data-driven importance of a model's units, measured on text: how much each one is used.

Activation importance (as in Minitron, Muralidharan et al. 2024), averaged over tokens and summed
over layers where a unit spans layers:

  residual channel d   sum_l mean |attn_norm_l(x)_d| + mean |mlp_norm_l(x)_d|  (+ the final norm)
  FFN neuron f         mean |input of down_proj|_f                     (per layer)
  query head h         mean || head h's output before o_proj ||         (per layer)
  kv group g           the sum of its query heads' scores

and block influence of each layer, BI_l = 1 - mean cos(h_{l-1}, h_l). (Weight-norm scores of the
same units are `resize.unit_scores`.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cbd_jax.model import decoder
from cbd_jax.model.config import ModelConfig


def _normed_stats(y, scale, bias) -> dict[str, jax.Array]:
  """Token sums, per channel, of |norm output| and of the squared normalised input."""
  y = y.astype(jnp.float32)
  out = y * scale.astype(jnp.float32)[..., None, None, :]
  if bias is not None:
    out = out + bias.astype(jnp.float32)[..., None, None, :]
  axes = (-3, -2)
  return jnp.abs(out).sum(axes), (y * y).sum(axes)


@functools.partial(jax.jit, static_argnums=0)
def _batch_stats(config: ModelConfig, params: dict, ids_BxT) -> dict[str, jax.Array]:
  """Token sums of |activation| per unit and of 1 - cos per layer, for one batch."""
  (_, per_layer, _), state = decoder.Decoder(config, output_hidden=True).apply(
      {"params": decoder._wrap_embeddings(params)}, ids_BxT, mutable=["intermediates"])
  inter = state["intermediates"]
  layers, out = inter["layers"], {}
  for name, y, norm in (("attn", layers["attn_norm"]["normalized"][0],
                         params["layers"]["attn_norm"]),
                        ("mlp", layers["mlp_norm"]["normalized"][0], params["layers"]["mlp_norm"]),
                        ("final", inter["final_norm"]["normalized"][0], params["final_norm"])):
    out[f"{name}_abs"], out[f"{name}_sq"] = _normed_stats(y, norm["scale"], norm.get("bias"))
  h = per_layer.astype(jnp.float32)
  cos = (h[:-1] * h[1:]).sum(-1) / (jnp.linalg.norm(h[:-1], axis=-1)
                                    * jnp.linalg.norm(h[1:], axis=-1) + 1e-12)
  heads = layers["attn"]["heads"][0].astype(jnp.float32)  # [L, B, T, H, hd]
  out["neurons"] = jnp.abs(layers["mlp"]["neurons"][0].astype(jnp.float32)).sum(axis=(1, 2))
  out["heads"] = jnp.linalg.norm(heads, axis=-1).sum(axis=(1, 2))
  out["influence"] = (1.0 - cos).sum(axis=(1, 2))
  return out


def activation_stats(config: ModelConfig, params: dict, ids_NxT, batch_size: int = 4
                     ) -> dict[str, np.ndarray]:
  """Token means over ``ids`` [N, T] of every statistic of `_batch_stats` (float64):
  {attn,mlp}_{abs,sq} [L, D] and final_{abs,sq} [D] (mean |norm output| and mean square of the
  normalised input, per channel); neurons [L, F]; heads [L, H]; influence [L]."""
  ids_NxT = np.asarray(ids_NxT)
  params = jax.tree.map(jnp.asarray, params)
  sums: dict[str, np.ndarray] = {}
  for i in range(0, len(ids_NxT), batch_size):
    batch = jax.device_get(_batch_stats(config, params, jnp.asarray(ids_NxT[i:i + batch_size])))
    for key, value in batch.items():
      sums[key] = sums.get(key, 0.0) + np.asarray(value, np.float64)
  return {key: value / max(ids_NxT.size, 1) for key, value in sums.items()}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _batch_moments(config: ModelConfig, params: dict, ids_BxT, keys: tuple[str, ...],
                   layers) -> dict[str, jax.Array]:
  """Token sums of the outer products, in the given ``layers``, of the FFN neurons [l, F, F]
  ("neurons") and of the concatenated head outputs [l, H hd, H hd] ("heads"): what down and o
  read."""
  _, state = decoder.Decoder(config).apply({"params": decoder._wrap_embeddings(params)}, ids_BxT,
                                           mutable=["intermediates"])
  inter = state["intermediates"]["layers"]
  found = {"neurons": inter["mlp"]["neurons"][0], "heads": inter["attn"]["heads"][0]}
  out = {}
  for key in keys:
    x = found[key][layers].astype(jnp.float32)
    x = x.reshape(*x.shape[:3], -1)
    out[key] = jnp.einsum("lbtf,lbtg->lfg", x, x)
  return out


def second_moments(config: ModelConfig, params: dict, ids_NxT, layers=None,
                   keys: tuple[str, ...] = ("neurons", "heads"), batch_size: int = 4
                   ) -> dict[str, np.ndarray]:
  """Token means E[x x^T] over ``ids`` of what the down ("neurons": [l, F, F]) and o ("heads":
  [l, H hd, H hd]) weights of ``layers`` (default: all) read, float64."""
  ids_NxT = np.asarray(ids_NxT)
  layers = jnp.arange(config.num_layers) if layers is None else jnp.asarray(layers)
  params = jax.tree.map(jnp.asarray, params)
  sums: dict[str, np.ndarray] = {}
  for i in range(0, len(ids_NxT), batch_size):
    ids = jnp.asarray(ids_NxT[i:i + batch_size])
    batch = jax.device_get(_batch_moments(config, params, ids, tuple(keys), layers))
    for key, value in batch.items():
      sums[key] = sums.get(key, 0.0) + np.asarray(value, np.float64)
  return {key: value / max(ids_NxT.size, 1) for key, value in sums.items()}


def activation_scores(config: ModelConfig, params: dict, ids_NxT, batch_size: int = 4,
                      stats: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """Activation importance of every unit on ``ids``: {"D": [D], "F": [L, F], "H": [L, H],
  "K": [L, K], "L": [L]} (layers by block influence). ``stats``: `activation_stats` of the same
  model and ids, when already measured."""
  s = stats if stats is not None else activation_stats(config, params, ids_NxT, batch_size)
  group = config.num_heads // config.num_kv_heads
  heads = s["heads"]
  return {"D": s["attn_abs"].sum(0) + s["mlp_abs"].sum(0) + s["final_abs"], "F": s["neurons"],
          "H": heads, "K": heads.reshape(len(heads), config.num_kv_heads, group).sum(-1),
          "L": s["influence"]}


def block_influence(config: ModelConfig, params: dict, ids_NxT, batch_size: int = 4) -> np.ndarray:
  """BI_l = 1 - mean over tokens of cos(h_{l-1}, h_l): how much layer l changes the residual
  stream on the given text (small = the layer is close to an identity and cheap to drop; a layer
  with zero o and down scores 0)."""
  return activation_stats(config, params, ids_NxT, batch_size)["influence"]


def without_layers(params: dict, dropped) -> dict:
  """``params`` with the dropped layers' o and down (weights and biases) zeroed: those layers
  become identities, and the tree keeps its shapes (one compile for every choice)."""
  dropped = np.asarray(dropped, np.int64)
  if not dropped.size:
    return params
  layers = dict(params["layers"])
  for block, leaf in (("attn", "o"), ("mlp", "down")):
    sub = dict(layers[block])
    zeroed = {}
    for name, x in sub[leaf].items():
      x = np.array(x)
      x[dropped] = 0
      zeroed[name] = x
    sub[leaf] = zeroed
    layers[block] = sub
  return dict(params, layers=layers)


def greedy_layers(config: ModelConfig, params: dict, n_target: int, ids_NxT, keep=(),
                  scores=None, batch_size: int = 4) -> np.ndarray:
  """The ``n_target`` layers kept when layers are dropped one at a time, each time the least
  influential one (block influence re-measured on ``ids`` without the layers already dropped;
  never a layer in ``keep``). ``scores``: the full model's block influence, if measured."""
  kept, keep = np.arange(config.num_layers), np.asarray(keep, np.int64)
  while len(kept) > n_target:
    dropped = np.setdiff1d(np.arange(config.num_layers), kept)
    if scores is None or len(dropped):
      scores = block_influence(config, without_layers(params, dropped), ids_NxT, batch_size)
    free = np.setdiff1d(kept, keep)
    if not len(free):
      raise ValueError(f"cannot keep {n_target} layers: the {len(keep)} layers that must stay "
                       "are more")
    kept = np.setdiff1d(kept, free[np.argmin(scores[free])])
  return kept
