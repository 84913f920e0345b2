"""The tests' one random-parameter helper: every leaf of a config's tree, seeded, on the host."""

from __future__ import annotations

import numpy as np

from cbd_jax.model import layout


def random_params(config, seed: int = 0, scale: float = 0.2) -> dict:
  """N(0, scale^2) in every leaf (norm scales and biases too, so nothing is trivially exact);
  shapes from `layout.param_shapes`, so nothing is compiled."""
  rng = np.random.default_rng(seed)
  return layout.unflatten({p: (scale * rng.standard_normal(s)).astype(np.float32)
                           for p, s in layout.param_shapes(config).items()})
