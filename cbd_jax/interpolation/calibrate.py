"""Teacher-free calibration of a target between two anchors, on unlabeled calibration text.

Three choices decide a target's quality, all made here by the target's own loss (or the large
anchor's own distributions) on token rows the caller gives, never on held-out text:

- which layers of the large anchor the target keeps besides the small anchor's counterparts
  (`layer_sets`: evenly spread, by block influence, or by block influence re-measured after
  each layer is dropped; the one whose Shrink(large) has the lowest loss is kept),
- alpha, the weight of the small anchor (`mixing.choose_alpha`: a grid, then a finer grid around
  the best point), then gamma, the share of their output that units only the large anchor has
  write (`mixing.choose_gamma`, the same search at that alpha; kept over 1 - alpha only on a
  clear gain on the check rows), and
- per-layer gains of each attention and MLP output (`fit_residual_gains`: 30 Adam steps on the
  gains alone, towards the large anchor's next-token distributions), kept only if they lower
  the target's loss on the rows held back for that check (`split_rows`) by more than the rows'
  noise (`clear_gain`).

No teacher and no source model: forward passes of the anchors and of the target, and gradients
of the target's 2 L gains, on a few thousand tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from cbd_jax.distill.fused_loss import fused_kd_loss
from cbd_jax.evaluation import heldout
from cbd_jax.interpolation import align, importance, mixing, resize
from cbd_jax.model import decoder, layout
from cbd_jax.model.config import ModelConfig

LAYER_CHOICES = ("even", "influence", "greedy")


def layer_sets(small, large, target: ModelConfig, ids_NxT: np.ndarray) -> dict[str, np.ndarray]:
  """{choice: the large anchor's layers a ``target``-deep model keeps} for every choice in
  `LAYER_CHOICES` (the small anchor's counterparts always among them). ``large`` must already be
  unit-aligned with ``small`` (`align.align_units`)."""
  (small_config, small_params), (large_config, large_params) = small, large
  m = align.depth_counterparts(small_config, small_params, large_config, large_params)
  n = target.num_layers
  if n <= small_config.num_layers or n >= large_config.num_layers:
    return {}
  free = np.setdiff1d(np.arange(large_config.num_layers), m)
  extra = n - small_config.num_layers
  scores = importance.block_influence(large_config, large_params, ids_NxT)
  even = free[(np.arange(1, extra + 1) * len(free)) // (extra + 1)]
  best = free[np.argsort(-scores[free], kind="stable")[:extra]]
  greedy = importance.greedy_layers(large_config, large_params, n, ids_NxT, keep=m, scores=scores)
  return {"even": np.sort(np.concatenate([m, even])),
          "influence": np.sort(np.concatenate([m, best])), "greedy": greedy}


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How a target is made from two anchors (each field is a flag of `launch/init_model.py`).

  ``method="cbd"`` (default): units only the large anchor has compute its function and write
  (1 - alpha) of it (the "output" mix); with calibration rows, the large anchor's layers
  (``layers="auto"`` tries every `LAYER_CHOICES` entry) and alpha are chosen by the target's own
  loss on them. ``method="paper"``: the plain formula, every padded weight scaled by 1 - alpha,
  alpha from parameter counts, evenly spread layers. ``alpha`` or ``mix`` given: used as is
  (``mix`` defaults to the method's: "output" for cbd, "plain" for paper).

  ``gamma`` (the "output" mix only): the share of their output that units only the large anchor
  has write; None: chosen on the choice rows at the calibrated alpha (`mixing.choose_gamma`) and
  kept where the check rows show a clear gain over 1 - alpha, when there are rows and alpha is
  not given; else 1 - alpha.

  ``rescale_norms`` (default: on for cbd, off for paper): Grow(small) multiplies its norm scales
  by sqrt(D_small / D_target), so that at alpha = 1 the target computes the small anchor's
  function exactly (RMSNorm over zero-padded channels otherwise divides by a smaller root mean
  square); alpha = 1 is on the calibration grid, so the calibrated target is never worse than
  the small anchor on the rows that choose alpha.
  """

  method: str = "cbd"
  alpha: float | None = None
  layers: str = "auto"
  mix: str | None = None
  shrink_method: str = "leading"
  grow_method: str = "zero"
  depth: str = "zero"
  align_layers: bool = True
  align_units: bool = True
  gains: bool = True
  rescale_norms: bool | None = None
  gamma: float | None = None

  def __post_init__(self):
    checks = (("method", self.method, METHODS), ("layers", self.layers, ("auto",) + LAYER_CHOICES),
              ("mix", self.mix, (None,) + mixing.MIXES))
    for name, value, allowed in checks:
      if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; use one of {[a for a in allowed if a]}")
    if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"alpha={self.alpha} is outside [0, 1]; alpha weights the small anchor")
    if self.mix is None:
      object.__setattr__(self, "mix", "output" if self.method == "cbd" else "plain")
    if self.gamma is not None and not (self.mix == "output" and 0.0 <= self.gamma <= 1.0):
      raise ValueError(f"gamma={self.gamma}: gamma is the share of their output that units only "
                       "the large anchor has write, in [0, 1], and only the output mix has it")
    if self.rescale_norms is None:
      object.__setattr__(self, "rescale_norms", self.method == "cbd")


METHODS = ("cbd", "paper")


def split_rows(rows: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
  """(choice rows, check rows): the first half of the calibration rows makes every choice
  (layers, alpha, gamma, residual gains); the second, never used for a choice, only decides
  whether gamma and the gains are kept. One row: no check rows (gamma = 1 - alpha, no gains)."""
  if rows is None:
    return None, None
  half = (len(rows) + 1) // 2
  return rows[:half], (rows[half:] if len(rows) > 1 else None)


def _choose_views(small, large, target, recipe: Recipe, shrink: str, rows, log):
  """(views, info): the large anchor's layers kept, by Shrink(large)'s loss on ``rows`` when
  calibrating and more than one choice is allowed; evenly spread otherwise. An explicit
  ``recipe.layers`` that needs rows (influence, greedy) and has none is a one-line ValueError."""
  r = recipe
  if r.layers in ("influence", "greedy") and (rows is None or not r.align_layers):
    why = ("--no_align_layers takes evenly spaced layers" if rows is not None else
           "there are no calibration rows (--method paper, or --anchors without --calib_text)")
    raise ValueError(f"layers={r.layers!r} ranks the large anchor's layers on calibration rows, "
                     f"but {why}; pass --layers auto or even, or give --calib_text")
  sets = layer_sets(small, large, target, rows) if rows is not None and r.align_layers else {}
  if r.layers != "auto":
    sets = {r.layers: sets[r.layers]} if r.layers in sets else {}

  def views_of(layers):
    return mixing.anchor_views(small, large, target, shrink, r.grow_method, r.depth,
                               rescale_norms=r.rescale_norms, align_layers=r.align_layers,
                               align_units=False, large_layers=layers)

  info = {"layer_choice": "even", "large_layers": None}
  if not sets:
    return views_of(None), info
  views, scores = {}, {}
  for n, layers in sets.items():  # Choices that keep the same layers are built and scored once.
    same = next((m for m in views if np.array_equal(sets[m], layers)), None)
    if same is not None:
      views[n], scores[n] = views[same], scores[same]
      continue
    views[n] = views_of(layers)
    scores[n] = mixing.mixed_loss(target, views[n], 0.0, r.mix, rows)
  choice = min(scores, key=scores.get)
  log("large-anchor layers (calibration loss of Shrink(large)): " +
      ", ".join(f"{n} {v:.4f}" for n, v in scores.items()) + f"; keeping {choice}")
  info.update(layer_choice=choice, large_layers=sets[choice].tolist(), layer_losses=scores)
  return views[choice], info


def _choose_alpha_and_gains(target, views, mixes, mix, large, rows, check_rows, log
                            ) -> tuple[dict, dict]:
  """(params, info): per-layer residual gains fitted on ``rows`` towards the large anchor for
  the mix at each (alpha, gamma) of ``mixes`` (the calibrated one first), and the alpha whose
  gained mix has the lowest loss on ``rows``; alpha and gains are kept only if they lower the
  target's loss on ``check_rows`` (used for nothing else) clearly below that of the calibrated
  mix without gains (`clear_gain`), else the calibrated mix stays (``info["alpha"]``,
  ``info["gamma"]``)."""
  best = None
  for alpha, gamma in mixes:
    mixed = mixing.mix_views(views, alpha, mix, gamma=gamma)
    gains, _ = fit_residual_gains(target, mixed, large, rows)
    gained = scale_outputs(mixed, gains)
    loss = heldout.mean_nll(target, gained, rows)
    log(f"alpha = {alpha:.4f} with residual gains: calibration loss {loss:.4f}")
    if best is None or loss < best[0]:
      best = (loss, (alpha, gamma), gains, gained)
  _, (alpha, gamma), gains, gained = best
  plain = mixing.mix_views(views, mixes[0][0], mix, gamma=mixes[0][1])
  rows_before = heldout.row_nlls(target, plain, check_rows)
  rows_after = heldout.row_nlls(target, gained, check_rows)
  before, after = float(rows_before.mean()), float(rows_after.mean())
  keep = clear_gain(rows_before, rows_after)
  log(f"residual gains (alpha = {alpha:.4f}): check loss {before:.4f} -> {after:.4f} "
      f"({'kept' if keep else 'dropped: not a clear gain on the check rows'})")
  alpha, gamma = (alpha, gamma) if keep else mixes[0]
  info = {"alpha": alpha, "gamma": gamma, "gains": gains.tolist() if keep else None,
          "gain_alpha": best[1][0], "gain_gamma": best[1][1], "fitted_gains": gains.tolist(),
          "gain_check_losses": [before, after]}
  return (gained if keep else plain), info


def clear_gain(before_N: np.ndarray, after_N: np.ndarray, z: float = 2.0) -> bool:
  """Whether per-row losses ``after`` are lower than ``before`` (the same rows) by more than
  ``z`` standard errors of the mean paired difference: a one-sided paired test (about 2.5% false
  positives at z = 2). A change that only fits the noise of a few rows (it did not carry over
  from training text to held-out text) is not kept. Fewer than two rows: never clear."""
  d = np.asarray(before_N, np.float64) - np.asarray(after_N, np.float64)
  if len(d) < 2:
    return False
  return bool(d.mean() > z * d.std(ddof=1) / np.sqrt(len(d)))


def _anchor_shape(small, large, target: ModelConfig) -> float | None:
  """1.0 or 0.0 when ``target`` is the small or the large anchor's shape, else None."""
  for anchor, alpha in ((small, 1.0), (large, 0.0)):
    if target.to_dict() == anchor[0].replace(dtype=target.dtype, remat=target.remat).to_dict():
      return alpha
  return None


def _aligned(small, large, r: Recipe):
  """(large anchor, shrink method): with ``r.align_units`` the large anchor's units reordered to
  line up with the small one's (`align.align_units`; the same for every target shape), then a
  leading Shrink."""
  if not r.align_units:
    return large, r.shrink_method
  return (large[0], align.align_units(*small, *large, extras=r.shrink_method)), "leading"


def _calibrated_mix(small, large, shrink: str, target: ModelConfig, r: Recipe, rows, log):
  """(views, alpha, gamma, info): layers, alpha and gamma of ``target`` chosen on the choice half
  of ``rows`` (`_choose_views`, `mixing.choose_alpha`, `mixing.choose_gamma`), before any gains;
  ``large`` and ``shrink`` from `_aligned`; ``info["choice_loss"]``: the mix's loss on those
  rows (None without rows)."""
  small_config, large_config = small[0], large[0]
  choice_rows, _ = split_rows(rows)
  views, info = _choose_views(small, large, target, r, shrink, choice_rows, log)
  info.update(method=r.method, mix=r.mix,
              calibration_tokens=0 if rows is None else int(rows[:, 1:].size))
  alpha, gamma, info["choice_loss"] = r.alpha, r.gamma, None
  if alpha is None and rows is not None:
    alpha, info["alpha_losses"] = mixing.choose_alpha(target, views, r.mix, choice_rows)
    info["choice_loss"] = info["alpha_losses"][alpha]
    if gamma is None and r.mix == "output":
      gamma = _checked_gamma(target, views, alpha, rows, info, log)
  elif alpha is None:
    alpha = mixing.default_alpha(small_config, large_config, target)
  if info["choice_loss"] is None and rows is not None:  # An explicit alpha: its loss.
    info["choice_loss"] = mixing.mixed_loss(target, views, alpha, r.mix, choice_rows, gamma=gamma)
  info["gamma"] = info["mix_gamma"] = gamma
  return views, alpha, gamma, info


def _checked_gamma(target: ModelConfig, views, alpha: float, rows, info: dict, log) -> float | None:
  """gamma chosen on the choice half of ``rows`` (`mixing.choose_gamma`) where the check half
  confirms it: a clear gain (`clear_gain`) over gamma = 1 - alpha there; else None (1 - alpha).
  Records the losses in ``info`` and sets ``info["choice_loss"]`` to the kept mix's."""
  choice_rows, check_rows = split_rows(rows)
  gamma, losses = mixing.choose_gamma(target, views, alpha, choice_rows)
  coupled = min(losses, key=lambda g: abs(g - (1.0 - alpha)))  # 1 - alpha, as the grid rounds it.
  info["gamma_losses"] = losses
  keep = False
  if gamma != coupled and check_rows is not None:
    before, after = (heldout.row_nlls(target, mixing.mix_views(views, alpha, "output", gamma=g),
                                      check_rows) for g in (None, gamma))
    keep = clear_gain(before, after)
    info["gamma_check_losses"] = [float(before.mean()), float(after.mean())]
  log("  gamma (share of their output that the large anchor's own units write): "
      + ", ".join(f"{g:g} {v:.4f}" for g, v in losses.items())
      + (f"; keeping {gamma:g}" if keep else f"; keeping 1 - alpha = {1.0 - alpha:g}"
         + (" (not a clear gain on the check rows)" if gamma != coupled else "")))
  info["choice_loss"] = losses[gamma if keep else coupled]
  return gamma if keep else None


def _finish(target: ModelConfig, views, alpha: float, gamma: float | None, info: dict, large,
            r: Recipe, rows, log):
  """(params, info): the mix at ``alpha`` and ``gamma``, with residual gains where the check rows
  show a clear gain (`_choose_alpha_and_gains`)."""
  choice_rows, check_rows = split_rows(rows)
  if rows is not None and check_rows is None and r.gains:
    log("one calibration row: no rows left to check residual gains on; none fitted")
  if check_rows is not None and r.gains:  # Shrink(large) with gains competes with the mix.
    mixes = [(alpha, gamma)] if r.alpha is not None or alpha == 0.0 else [(alpha, gamma),
                                                                            (0.0, None)]
    params, gain_info = _choose_alpha_and_gains(target, views, mixes, r.mix, large, choice_rows,
                                                check_rows, log)
    info.update(gain_info)
  else:
    params = mixing.mix_views(views, alpha, r.mix, gamma=gamma)
    info.update(alpha=alpha, gamma=gamma)
  gamma_note = f", gamma = {info['gamma']:.4f}" if info.get("gamma") is not None else ""
  log(f"alpha = {info['alpha']:.4f} (weight of the small anchor){gamma_note}, mix {r.mix}, "
      f"large-anchor layers {info['layer_choice']}"
      + (", residual gains" if info.get("gains") else ""))
  return params, info


def make_target(small, large, target: ModelConfig, recipe: Recipe | None = None, rows=None,
                log=print) -> tuple[dict, dict]:
  """(params, info) of a ``target``-shaped model between ``small`` and ``large`` (``(config,
  params)`` pairs), made by ``recipe``; ``rows`` [N, T] calibration token ids (``method="cbd"``
  without them: alpha from parameter counts and evenly spread layers, no gains)."""
  r = recipe or Recipe()
  resize.check_compatible(small[0], large[0])
  alpha = _anchor_shape(small, large, target)
  if alpha is not None:  # A target of an anchor's shape is it.
    log(f"the target has the {'small' if alpha else 'large'} anchor's shape: alpha = {alpha}")
    return jax.tree.map(np.asarray, (small if alpha else large)[1]), {
        "method": r.method, "alpha": alpha, "mix": r.mix, "layer_choice": None}
  rows = rows if r.method == "cbd" else None
  large, shrink = _aligned(small, large, r)
  views, alpha, gamma, info = _calibrated_mix(small, large, shrink, target, r, rows, log)
  return _finish(target, views, alpha, gamma, info, large, r, rows, log)


def make_sized_target(small, large, shapes: list[ModelConfig], recipe: Recipe | None = None,
                      rows=None, log=print) -> tuple[ModelConfig, dict, dict]:
  """(target config, params, info) for one size with candidate ``shapes``
  (`sizing.target_shapes`): each shape's layers and alpha are calibrated (`make_target`'s
  choices), the shape whose mix has the lowest loss on the choice half of the rows is kept, and
  only it gets residual gains. Without rows, with one shape, or when the first shape is an
  anchor's: `make_target` on the first shape."""
  r = recipe or Recipe()
  rows = rows if r.method == "cbd" else None
  first = shapes[0]
  if len(shapes) == 1 or rows is None or _anchor_shape(small, large, first) is not None:
    return (first, *make_target(small, large, first, r, rows, log))
  resize.check_compatible(small[0], large[0])
  aligned, shrink = _aligned(small, large, r)  # Once: the alignment is the same for every shape.
  made = []
  for shape in shapes:
    log(f"target shape {shape.num_layers} x {shape.hidden_size} (ffn {shape.intermediate_size}, "
        f"{shape.num_heads} heads):")
    views, alpha, gamma, info = _calibrated_mix(small, aligned, shrink, shape, r, rows, log)
    loss = info["choice_loss"]
    log(f"  calibration loss at alpha = {alpha:.4f}: {loss:.4f}")
    made.append((loss, shape, views, alpha, gamma, info))
  loss, shape, views, alpha, gamma, info = min(made, key=lambda m: m[0])
  log(f"target shape: {shape.num_layers} x {shape.hidden_size} (calibration loss {loss:.4f})")
  info["shape_losses"] = {f"{m[1].num_layers}x{m[1].hidden_size}/ffn{m[1].intermediate_size}":
                          m[0] for m in made}
  params, info = _finish(shape, views, alpha, gamma, info, aligned, r, rows, log)
  return shape, params, info


def scale_outputs(params: dict, scales_Lx2) -> dict:
  """``params`` with layer l's attention output (o) scaled by scales[l, 0] and its MLP output
  (down) by scales[l, 1] (their biases too): per-layer residual-branch gains."""
  flat = dict(layout.flatten(params))
  for path, col in (("layers/attn/o/", 0), ("layers/mlp/down/", 1)):
    for leaf in ("weight", "bias"):
      if path + leaf in flat:
        x = flat[path + leaf]
        s = scales_Lx2[:, col].reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
        flat[path + leaf] = x * s
  return layout.unflatten(flat)


@functools.partial(jax.jit, static_argnums=0)
def _hidden(config: ModelConfig, params, ids_BxT):
  return decoder.apply_hidden(config, params, ids_BxT)[0]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _kl_and_grad(config: ModelConfig, chunk_size: int, scales, params, ids_BxT, ref_hidden_BxTxD,
                 ref_head_VxD):
  """KL(reference || model with the residual gains), mean over tokens, and its gradient; the
  logits of either model exist for ``chunk_size`` tokens at a time (`fused_kd_loss`)."""
  def kl(s):
    hidden, _ = decoder.apply_hidden(config, scale_outputs(params, s), ids_BxT)
    total, count = fused_kd_loss(hidden, decoder.head_weight(config, params), ref_hidden_BxTxD,
                                 ref_head_VxD, vocab_limit=config.vocab_limit,
                                 chunk_size=chunk_size)
    return total / count
  return jax.value_and_grad(kl)(scales)


def fit_residual_gains(config: ModelConfig, params: dict, reference, ids_NxT: np.ndarray,
                       steps: int = 30, lr: float = 0.05, chunk_size: int = 256
                       ) -> tuple[np.ndarray, list[float]]:
  """(gains [L, 2], KLs): per-layer gains of the attention and MLP outputs (Adam from 1.0,
  full batch) that bring the model's next-token distributions on ``ids`` towards those of
  ``reference`` (a ``(config, params)`` model of the same vocabulary: the large anchor); the
  gains of the lowest KL seen. No [N, T, V] tensor: logits ``chunk_size`` tokens at a time."""
  import optax

  ids = jnp.asarray(ids_NxT[:, :-1])
  ref_config, ref_params = reference[0], jax.device_put(reference[1])
  ref_hidden = _hidden(ref_config, ref_params, ids)
  ref_head = decoder.head_weight(ref_config, ref_params)
  params = jax.device_put(params)
  gains = jnp.ones((config.num_layers, 2), jnp.float32)
  opt = optax.adam(lr)
  state = opt.init(gains)
  best, kls = (np.asarray(gains), np.inf), []
  for _ in range(steps + 1):
    kl, grad = _kl_and_grad(config, chunk_size, gains, params, ids, ref_hidden, ref_head)
    kls.append(float(kl))
    if kls[-1] < best[1]:
      best = (np.asarray(gains), kls[-1])
    updates, state = opt.update(grad, state)
    gains = optax.apply_updates(gains, updates)
  return best[0], kls
