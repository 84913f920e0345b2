"""Size resolution: "138m" -> the shape on the line between two anchors with that many params."""

from __future__ import annotations

import math
import re

from cbd_jax.interpolation.resize import check_compatible
from cbd_jax.model.config import ModelConfig, export_refusal, num_params

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_size(size: str | int | float) -> int:
  """'138m' -> 138_000_000; '1.2b' -> 1_200_000_000; '220M', '500k', '138000000' likewise."""
  if isinstance(size, (int, float)) and not isinstance(size, bool):
    if size <= 0:
      raise ValueError(f"size {size} must be positive; write e.g. 138m, 1.2b or 138000000")
    return int(size)
  match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmbgt]?)\s*", str(size).lower())
  if not match or float(match.group(1)) <= 0:
    raise ValueError(f"cannot parse size {size!r}; write e.g. 138m, 1.2b or 138000000")
  return int(round(float(match.group(1)) * _SUFFIX[match.group(2)]))


def format_count(n: int) -> str:
  """138_612_480 -> '138.6M'."""
  for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
    if n >= scale:
      return f"{n / scale:.1f}{unit}"
  return str(n)


def describe(config: ModelConfig) -> str:
  """One line: depth x width, heads, kv heads, FFN width and parameter count."""
  c = config
  return (f"{c.num_layers} layers x {c.hidden_size} ({c.num_heads} heads, {c.num_kv_heads} kv "
          f"heads of {c.head_dim}, ffn {c.intermediate_size}), {format_count(num_params(c))} "
          f"params ({num_params(c):,})")


def _nearest_divisor(n: int, want: float) -> int:
  """The divisor of n closest to ``want`` (the larger one on a tie)."""
  divisors = [d for d in range(1, n + 1) if n % d == 0]
  return min(divisors, key=lambda d: (abs(d - want), -d))


def _kv_heads(heads: int, small: ModelConfig, large: ModelConfig, t: float) -> int:
  """kv heads dividing ``heads``: the anchors' common group size or kv count, else interpolated."""
  gs, gb = small.num_heads // small.num_kv_heads, large.num_heads // large.num_kv_heads
  if gs == gb:
    return _nearest_divisor(heads, heads / gs)
  if small.num_kv_heads == large.num_kv_heads:
    return _nearest_divisor(heads, small.num_kv_heads)
  return _nearest_divisor(heads, heads / (gs + t * (gb - gs)))


def _narrow_attention(small: ModelConfig, large: ModelConfig) -> bool:
  """Whether either anchor's attention (heads x head_dim) is narrower than its residual stream."""
  return any(a.num_heads * a.head_dim != a.hidden_size for a in (small, large))


def shape_at(small: ModelConfig, large: ModelConfig, layers: int, width: int,
             ffn_multiple: int = 128, heads: int | None = None) -> tuple[ModelConfig, float, float]:
  """(config, t, distance): the shape with this depth and width; t is its position between the
  anchors (0 = small, 1 = large), distance its offset from the line in normalised coordinates.
  ``heads`` defaults to width / head_dim, or, for anchors whose attention is narrower than their
  residual stream, to the heads interpolated between theirs."""
  for anchor in (small, large):
    if (layers, width) == (anchor.num_layers, anchor.hidden_size):
      t = 0.0 if anchor is small else 1.0
      return small.replace(**{k: getattr(anchor, k) for k in (
          "num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size")}), t, 0.0
  ts = []
  if large.num_layers != small.num_layers:
    ts.append((layers - small.num_layers) / (large.num_layers - small.num_layers))
  if large.hidden_size != small.hidden_size:
    ts.append((width - small.hidden_size) / (large.hidden_size - small.hidden_size))
  t = sum(ts) / len(ts) if ts else 0.0
  distance = abs(ts[0] - ts[1]) / math.sqrt(2) if len(ts) == 2 else 0.0
  ratio_s = small.intermediate_size / small.hidden_size
  ratio = ratio_s + t * (large.intermediate_size / large.hidden_size - ratio_s)
  ffn = max(ffn_multiple, int(round(ratio * width / ffn_multiple)) * ffn_multiple)
  if heads is None and _narrow_attention(small, large):
    t_width = ts[-1] if large.hidden_size != small.hidden_size else t
    heads = max(1, round(small.num_heads + t_width * (large.num_heads - small.num_heads)))
  heads = heads or width // small.head_dim
  config = small.replace(num_layers=layers, hidden_size=width, num_heads=heads,
                         num_kv_heads=_kv_heads(heads, small, large, t), intermediate_size=ffn)
  return config, t, distance


def _ordered(size, small: ModelConfig, large: ModelConfig) -> tuple[int, ModelConfig, ModelConfig]:
  """(requested count, smaller anchor, larger anchor), the anchors checked to be compatible."""
  check_compatible(small, large)
  if num_params(small) > num_params(large):
    small, large = large, small
  return parse_size(size), small, large


def resolve_size(size: str | int, small: ModelConfig, large: ModelConfig, tol: float = 0.03,
                 width_multiple: int | None = None, ffn_multiple: int = 128) -> ModelConfig:
  """The config of ``size`` params between two anchors (either order) of one family.

  Candidates: every depth between the anchors' and every width that is a multiple of
  ``width_multiple`` (default head_dim; heads = width / head_dim, or every head count between the
  anchors' when their attention is narrower than their residual stream) between theirs; FFN width
  from the anchors' FFN/width ratio, interpolated, in multiples of ``ffn_multiple``; kv heads
  divide the heads (the anchors' group size when they share one: head counts it does not divide
  are tried only when no other candidate fits). Among candidates within ``tol`` of the requested
  count, the one minimising (distance from the line + relative count error) wins.
  """
  want, small, large = _ordered(size, small, large)
  p_small, p_large = num_params(small), num_params(large)
  if not p_small * (1 - tol) <= want <= p_large * (1 + tol):
    raise ValueError(f"size {size} ({format_count(want)}) is outside the anchors' range "
                     f"[{format_count(p_small)}, {format_count(p_large)}] ({p_small:,} to "
                     f"{p_large:,} params); ask for a size in that range or add an anchor")
  # FFN widths in multiples of ffn_multiple, or of what the anchors' FFN widths share if less.
  ffn_multiple = math.gcd(ffn_multiple, small.intermediate_size, large.intermediate_size)
  multiple = width_multiple or small.head_dim
  if multiple % small.head_dim:
    raise ValueError(f"width_multiple {multiple} is not a multiple of head_dim "
                     f"{small.head_dim}; widths must hold whole heads")
  lo_w, hi_w = sorted((small.hidden_size, large.hidden_size))
  narrow = _narrow_attention(small, large)
  lo_l, hi_l = sorted((small.num_layers, large.num_layers))
  widths = sorted({lo_w, hi_w, *range(math.ceil(lo_w / multiple) * multiple, hi_w + 1, multiple)})
  group = small.num_heads // small.num_kv_heads
  shared_group = group == large.num_heads // large.num_kv_heads
  lo_h, hi_h = sorted((small.num_heads, large.num_heads))
  best = None
  for strict in (True, False):  # First only heads that split into the shared group size.
    for layers in range(lo_l, hi_l + 1):
      for width in widths:
        # Attention narrower than the residual stream: every head count between the anchors'.
        for heads in range(lo_h, hi_h + 1) if narrow else (width // small.head_dim,):
          if strict and shared_group and heads % group:
            continue
          config, _, distance = shape_at(small, large, layers, width, ffn_multiple, heads)
          if export_refusal(config):
            continue
          error = abs(num_params(config) - want) / want
          if error <= tol and (best is None or distance + error < best[0]):
            best = (distance + error, config)
    if best is not None:
      break
  if best is None:
    raise ValueError(f"no shape between the anchors within {tol:.0%} of {format_count(want)}; "
                     "try a nearby size or a finer width_multiple")
  return best[1]


def _proportional_cut(want: int, base: ModelConfig, small: ModelConfig, large: ModelConfig,
                      tol: float, ffn_multiple: int) -> ModelConfig | None:
  """``base`` with the depth and FFN width of ``want`` params, each at most the large anchor's,
  cut in about the same proportion: layers / L_large close to ffn / F_large for the large
  anchor's width (from one layer), else measured from the small anchor's depth and FFN width
  (at least those); None when none is within ``tol``, or it would be the large anchor itself."""
  multiple = math.gcd(ffn_multiple, large.intermediate_size)
  wide = base.hidden_size == large.hidden_size
  zero_l, zero_f = (0, 0) if wide else (small.num_layers, small.intermediate_size)
  best = None
  for layers in range(max(1, zero_l), large.num_layers + 1):
    for ffn in range(max(multiple, zero_f), large.intermediate_size + 1, multiple):
      config = base.replace(num_layers=layers, intermediate_size=ffn)
      error = abs(num_params(config) - want) / want
      if error > tol or config == large or export_refusal(config):
        continue
      t_layers = (layers - zero_l) / max(1, large.num_layers - zero_l)
      t_ffn = (ffn - zero_f) / max(1, large.intermediate_size - zero_f)
      score = abs(t_layers - t_ffn) + error
      if best is None or score < best[0]:
        best = (score, config)
  return None if best is None else best[1].replace(dtype=small.dtype, remat=small.remat)


def large_width_shape(size: str | int, small: ModelConfig, large: ModelConfig, tol: float = 0.03,
                      ffn_multiple: int = 128) -> ModelConfig | None:
  """The shape of ``size`` params that keeps the large anchor's residual width and attention and
  cuts only its depth and FFN width, in about the same proportion (layers / L_large close to
  ffn / F_large); None when no such shape is within ``tol`` of the count, or when it would be
  the large anchor itself. Shrink of the large anchor to this shape drops whole layers and FFN
  neurons only, which keeps far more of it than a narrower residual stream does."""
  want, small, large = _ordered(size, small, large)
  return _proportional_cut(want, large, small, large, tol, ffn_multiple)


def large_attention_shape(size: str | int, small: ModelConfig, large: ModelConfig,
                          tol: float = 0.03, ffn_multiple: int = 128) -> ModelConfig | None:
  """For anchors whose attention is narrower than their residual stream: the shape of ``size``
  params with the large anchor's heads and kv heads, the narrowest residual width between the
  anchors' (a multiple of head_dim) that reaches the count, and depth and FFN width between the
  anchors' in about the same proportion; None for other anchors or when no such shape is within
  ``tol`` below the large anchor's width (that is `large_width_shape`). Near the small anchor
  this keeps the small anchor's stream whole and spends the parameters where the large anchor's
  part of the mix carries most: its extra kv groups, layers and FFN neurons, rather than a wider
  stream that Shrink(large) cuts."""
  want, small, large = _ordered(size, small, large)
  if not _narrow_attention(small, large):
    return None
  for width in range(small.hidden_size, large.hidden_size, small.head_dim):
    base = small.replace(hidden_size=width, num_heads=large.num_heads,
                         num_kv_heads=large.num_kv_heads)
    shape = _proportional_cut(want, base, small, large, tol, ffn_multiple)
    if shape is not None:
      return shape
  return None


def target_shapes(size: str | int, small: ModelConfig, large: ModelConfig,
                  shape: str = "auto") -> list[ModelConfig]:
  """Candidate shapes of ``size`` params: "line" (`resolve_size`, on the line between the
  anchors), "large_width" (`large_width_shape`), or "auto": those two and, for anchors whose
  attention is narrower than their residual stream, `large_attention_shape`, distinct (the
  line's first), for the caller to choose between on calibration text."""
  if shape not in SHAPES:
    raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")
  out = [] if shape == "large_width" else [resolve_size(size, small, large)]
  attention = large_attention_shape(size, small, large) if shape == "auto" else None
  if attention is not None and attention not in out:
    out.append(attention)
  if shape != "line":
    wide = large_width_shape(size, small, large)
    if wide is None and shape == "large_width":
      raise ValueError(f"no shape of {size} with the large anchor's width within 3% of the "
                       "count; pass --shape line or auto")
    if wide is not None and wide not in out:
      out.append(wide)
  return out


SHAPES = ("auto", "line", "large_width")
