"""Data-driven importance of layers: how much each one turns the residual stream on given text.

(Weight-norm scores of channels, neurons, heads and layers are `resize.unit_scores`.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cbd_jax import model
from cbd_jax.config import ModelConfig


@functools.partial(jax.jit, static_argnums=0)
def _residuals(config: ModelConfig, params: dict, ids_BxT) -> jax.Array:
  """Per-layer residual streams [L + 1, B, T, D] (fp32)."""
  _, per_layer = model.apply_hidden(config, params, ids_BxT, output_hidden=True)
  return per_layer.astype(jnp.float32)


def block_influence(config: ModelConfig, params: dict, ids_NxT, batch_size: int = 4) -> np.ndarray:
  """BI_l = 1 - mean over tokens of cos(h_{l-1}, h_l): how much layer l changes the residual
  stream on the given text (small = the layer is close to an identity and cheap to drop; a layer
  with zero o and down scores 0)."""
  totals, count = np.zeros(config.num_layers), 0
  for i in range(0, len(ids_NxT), batch_size):
    h = np.asarray(_residuals(config, params, jnp.asarray(ids_NxT[i:i + batch_size])), np.float64)
    cos = (h[:-1] * h[1:]).sum(-1) / (np.linalg.norm(h[:-1], axis=-1)
                                      * np.linalg.norm(h[1:], axis=-1) + 1e-12)
    totals += (1.0 - cos).sum(axis=(1, 2))
    count += cos.shape[1] * cos.shape[2]
  return totals / max(count, 1)
