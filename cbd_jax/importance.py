"""Data-free importance of units (channels, neurons, heads, kv groups, layers) from weight norms."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cbd_jax import model
from cbd_jax.config import ModelConfig
from cbd_jax.resize import SPLIT, check_params, leaf_specs


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


def block_influence(config: ModelConfig, params: dict, ids_NxT, batch_size: int = 4) -> np.ndarray:
  """BI_l = 1 - mean over tokens of cos(h_{l-1}, h_l): how much layer l changes the residual
  stream on the given text (small = the layer is close to an identity and cheap to drop)."""
  totals, count = np.zeros(config.num_layers), 0
  for i in range(0, len(ids_NxT), batch_size):
    _, h_LxBxTxD = model.apply_hidden(config, params, jnp.asarray(ids_NxT[i:i + batch_size]),
                                      output_hidden=True)
    h = np.asarray(h_LxBxTxD, np.float64)
    cos = (h[:-1] * h[1:]).sum(-1) / (np.linalg.norm(h[:-1], axis=-1)
                                      * np.linalg.norm(h[1:], axis=-1) + 1e-12)
    totals += (1.0 - cos).sum(axis=(1, 2))
    count += cos.shape[1] * cos.shape[2]
  return totals / max(count, 1)
