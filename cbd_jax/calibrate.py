"""Teacher-free calibration of a target between two anchors, on unlabeled calibration text.

Two choices decide a target's quality, and both are made here by the target's own loss (or the
large anchor's own hidden states) on token rows the caller gives, never on held-out text:

- which layers of the large anchor the target keeps besides the small anchor's counterparts
  (`choose_layers`: evenly spread, by block influence, or by block influence re-measured after
  each layer is dropped), and
- alpha, the weight of the small anchor (`choose_alpha`: a grid, then a finer grid around the
  best point).

No teacher, no source model and no gradient: a few forward passes of the large anchor and of the
target on a few thousand tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from cbd_jax import align, interpolate, model, resize
from cbd_jax.config import ModelConfig

LAYER_CHOICES = ("even", "influence", "greedy")
_OUT_LEAVES = ("layers/attn/o/weight", "layers/attn/o/bias", "layers/mlp/down/weight",
               "layers/mlp/down/bias")


@functools.partial(jax.jit, static_argnums=0)
def _residuals(config: ModelConfig, params: dict, ids_BxT) -> jax.Array:
  """Per-layer residual streams [L + 1, B, T, D] (fp32)."""
  _, per_layer = model.apply_hidden(config, params, ids_BxT, output_hidden=True)
  return per_layer.astype(jnp.float32)


def block_influence(config: ModelConfig, params: dict, ids_NxT: np.ndarray,
                    batch_size: int = 4) -> np.ndarray:
  """BI_l = 1 - mean_tokens cos(h_{l-1}, h_l): how much layer l turns the residual stream
  (a dropped layer, with zero o and down, scores 0)."""
  totals, count = np.zeros(config.num_layers), 0
  for i in range(0, len(ids_NxT), batch_size):
    h = np.asarray(_residuals(config, params, jnp.asarray(ids_NxT[i:i + batch_size])), np.float64)
    cos = (h[:-1] * h[1:]).sum(-1) / (np.linalg.norm(h[:-1], axis=-1)
                                      * np.linalg.norm(h[1:], axis=-1) + 1e-12)
    totals += (1.0 - cos).sum(axis=(1, 2))
    count += cos.shape[1] * cos.shape[2]
  return totals / max(count, 1)


def _without_layers(params: dict, dropped) -> dict:
  """``params`` with the dropped layers' o and down zeroed: those layers become identities."""
  flat = dict(resize.flatten(params))
  for path in _OUT_LEAVES:
    if path in flat and len(dropped):
      x = np.array(flat[path])
      x[np.asarray(dropped)] = 0
      flat[path] = x
  return resize.unflatten(flat)


def greedy_layers(config: ModelConfig, params: dict, keep: np.ndarray, n_target: int,
                  ids_NxT: np.ndarray) -> np.ndarray:
  """Drops layers one at a time (never those in ``keep``), each time the one whose block
  influence, measured on the model without the layers already dropped, is least."""
  kept = np.arange(config.num_layers)
  while len(kept) > n_target:
    dropped = np.setdiff1d(np.arange(config.num_layers), kept)
    scores = block_influence(config, _without_layers(params, dropped), ids_NxT)
    free = np.setdiff1d(kept, keep)
    kept = np.setdiff1d(kept, free[np.argmin(scores[free])])
  return kept


def layer_sets(small, large, target: ModelConfig, ids_NxT: np.ndarray) -> dict[str, np.ndarray]:
  """{choice: the large anchor's layers a ``target``-deep model keeps} for every choice in
  `LAYER_CHOICES` (the small anchor's counterparts always among them). ``large`` must already be
  unit-aligned with ``small`` (`align.align_units`)."""
  (cs, ps), (cl, pl) = small, large
  m = align.depth_counterparts(cs, ps, cl, pl)
  n = target.num_layers
  if n <= cs.num_layers or n >= cl.num_layers:
    return {}
  free = np.setdiff1d(np.arange(cl.num_layers), m)
  extra = n - cs.num_layers
  scores = block_influence(cl, pl, ids_NxT)
  even = free[(np.arange(1, extra + 1) * len(free)) // (extra + 1)]
  best = free[np.argsort(-scores[free], kind="stable")[:extra]]
  return {"even": np.sort(np.concatenate([m, even])),
          "influence": np.sort(np.concatenate([m, best])),
          "greedy": greedy_layers(cl, pl, m, n, ids_NxT)}


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How a target is made from two anchors (each field is a flag of `launch/init_model.py`).

  ``method="cbd"`` (default): units only the large anchor has compute its function and write
  (1 - alpha) of it (the "output" mix); with calibration rows, the large anchor's layers
  (``layers="auto"`` tries every `LAYER_CHOICES` entry) and alpha are chosen by the target's own
  loss on them. ``method="paper"``: the plain formula, every padded weight scaled by 1 - alpha,
  alpha from parameter counts, evenly spread layers. ``alpha`` or ``rule`` given: used as is.
  """

  method: str = "cbd"
  alpha: float | None = None
  layers: str = "auto"
  rule: str | None = None
  shrink_method: str = "leading"
  grow_method: str = "zero"
  depth: str = "zero"
  align_layers: bool = True
  align_units: bool = True

  def __post_init__(self):
    checks = (("method", self.method, METHODS), ("layers", self.layers, ("auto",) + LAYER_CHOICES),
              ("rule", self.rule, (None,) + interpolate.MIXES))
    for name, value, allowed in checks:
      if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; use one of {[a for a in allowed if a]}")
    if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"alpha={self.alpha} is outside [0, 1]; alpha weights the small anchor")

  @property
  def mix_rule(self) -> str:
    return self.rule or ("output" if self.method == "cbd" else "plain")


METHODS = ("cbd", "paper")


def choose_alpha(target: ModelConfig, views, rule: str, ids_NxT: np.ndarray,
                 coarse=(0.0, 0.25, 0.5, 0.75, 1.0), refinements: int = 2
                 ) -> tuple[float, dict[float, float]]:
  """(alpha, {alpha: loss}): a coarse grid, then halved steps on either side of the best."""
  views = jax.device_put(views)
  losses = {}

  def score(a):
    a = float(np.clip(round(a, 4), 0.0, 1.0))
    if a not in losses:
      losses[a] = interpolate.mixed_loss(target, views, a, rule, ids_NxT)
    return losses[a]

  for a in coarse:
    score(a)
  step = (coarse[1] - coarse[0]) / 2
  for _ in range(refinements):
    best = min(losses, key=losses.get)
    score(best - step)
    score(best + step)
    step /= 2
  return min(losses, key=losses.get), dict(sorted(losses.items()))


def make_target(small, large, target: ModelConfig, recipe: Recipe = Recipe(), rows=None,
                log=print) -> tuple[dict, dict]:
  """(params, info) of a ``target``-shaped model between ``small`` and ``large`` (``(config,
  params)`` pairs), made by ``recipe``; ``rows`` [N, T] calibration token ids (``method="cbd"``
  without them: alpha from parameter counts and evenly spread layers)."""
  r = recipe
  (cs, ps), (cl, pl) = small, large
  resize.check_compatible(cs, cl)
  shrink = r.shrink_method
  if r.align_units:
    pl, shrink = align.align_units(cs, ps, cl, pl, extras=r.shrink_method), "leading"
  large = (cl, pl)
  for anchor, alpha in ((small, 1.0), (large, 0.0)):  # A target of an anchor's shape is it.
    if target.to_dict() == anchor[0].replace(dtype=target.dtype, remat=target.remat).to_dict():
      log(f"the target has the {'small' if alpha else 'large'} anchor's shape: alpha = {alpha}")
      return jax.tree.map(np.asarray, anchor[1]), {"method": r.method, "alpha": alpha,
                                                   "rule": r.mix_rule, "layer_choice": None}
  calibrated = r.method == "cbd" and rows is not None
  sets = layer_sets(small, large, target, rows) if calibrated and r.align_layers else {}
  if r.layers != "auto":
    sets = {r.layers: sets[r.layers]} if r.layers in sets else {}
  info = {"method": r.method, "rule": r.mix_rule, "layer_choice": "even", "large_layers": None,
          "calibration_tokens": int(rows[:, 1:].size) if calibrated else 0}
  views_of = lambda layers: interpolate.anchor_views(  # noqa: E731
      small, large, target, shrink, r.grow_method, r.depth, align_layers=r.align_layers,
      align_units=False, large_layers=layers)
  candidates = {name: views_of(layers) for name, layers in sets.items()} or {"even": views_of(None)}
  if calibrated and len(candidates) > 1:  # The layer choice whose Shrink(large) fits best.
    scores = {n: interpolate.mixed_loss(target, v, 0.0, r.mix_rule, rows)
              for n, v in candidates.items()}
    log("large-anchor layers (calibration loss of Shrink(large)): " +
        ", ".join(f"{n} {s:.4f}" for n, s in scores.items()))
    info["layer_losses"] = scores
    candidates = {min(scores, key=scores.get): None}
    candidates = {n: views_of(sets[n]) for n in candidates}
  (choice, views), = candidates.items()
  info.update(layer_choice=choice, large_layers=None if choice not in sets
              else sets[choice].tolist())
  alpha = r.alpha
  if alpha is None and calibrated:
    alpha, info["alpha_losses"] = choose_alpha(target, views, r.mix_rule, rows)
  elif alpha is None:
    alpha = interpolate.default_alpha(cs, cl, target)
  info["alpha"] = alpha
  log(f"alpha = {alpha:.4f} (weight of the small anchor), mix {r.mix_rule}, large-anchor layers "
      f"{choice}" + (f" {info['large_layers']}" if info["large_layers"] else ""))
  return interpolate.mix(views, alpha, r.mix_rule), info
