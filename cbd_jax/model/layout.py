"""The param tree's layout: every leaf's path, shape and the units its axes index.

Params are a plain nested dict (``"layers/attn/q/weight"`` when flattened, layers stacked on a
leading axis). Every axis of every leaf has a *kind* (which units it indexes) and a *role* for
those units:

  kind  units                          role "copy" (writes the unit)   role "split" (reads the unit)
  L     layers                         all other layer leaves          o, down (+ their biases)
  D     residual channels              embed, pos_embed, o/down rows,  q/k/v/gate/up columns,
                                       norm scales and biases          lm_head
  H     query heads                    q weight and bias               o columns
  K     kv groups                      k, v weight and bias            (read through the heads)
  F     FFN neurons                    gate, up (+ up bias)            down columns

(V vocabulary, P learned positions and hd head channels have no role.) Shrink and Grow
(`interpolation.resize`), unit alignment and conversion tables read the tree through it.
"""

from __future__ import annotations

from cbd_jax.model.config import ModelConfig

Params = dict
COPY, SPLIT = "copy", "split"


def leaf_specs(config: ModelConfig) -> dict[str, tuple[tuple[str, str | None], ...]]:
  """Path -> ((kind, role) per axis) for every leaf of a param tree of ``config``."""
  c, ln, l_ = config, ("L", COPY), ("L", SPLIT)
  d_in, d_out = ("D", COPY), ("D", SPLIT)  # "in": the leaf writes the channel; "out": reads it.
  hd = ("hd", None)
  specs = {"embed/embedding": (("V", None), d_in),
           "final_norm/scale": (d_in,),
           "layers/attn/q/weight": (ln, ("H", COPY), hd, d_out),
           "layers/attn/k/weight": (ln, ("K", COPY), hd, d_out),
           "layers/attn/v/weight": (ln, ("K", COPY), hd, d_out),
           "layers/attn/o/weight": (l_, d_in, ("H", SPLIT), hd),
           "layers/mlp/up/weight": (ln, ("F", COPY), d_out),
           "layers/mlp/down/weight": (l_, d_in, ("F", SPLIT)),
           "layers/attn_norm/scale": (ln, d_in),
           "layers/mlp_norm/scale": (ln, d_in)}
  if c.gated_mlp:
    specs["layers/mlp/gate/weight"] = (ln, ("F", COPY), d_out)
  if c.qkv_bias:
    specs["layers/attn/q/bias"] = (ln, ("H", COPY), hd)
    specs["layers/attn/k/bias"] = (ln, ("K", COPY), hd)
    specs["layers/attn/v/bias"] = (ln, ("K", COPY), hd)
  if c.out_bias:
    specs["layers/attn/o/bias"] = (l_, d_in)
  if c.qk_norm:
    specs["layers/attn/q_norm/scale"] = (ln, hd)
    specs["layers/attn/k_norm/scale"] = (ln, hd)
  if c.is_gpt2:
    specs["pos_embed/embedding"] = (("P", None), d_in)
    specs["layers/mlp/up/bias"] = (ln, ("F", COPY))
    specs["layers/mlp/down/bias"] = (l_, d_in)
    for norm in ("final_norm", "layers/attn_norm", "layers/mlp_norm"):
      specs[f"{norm}/bias"] = specs[f"{norm}/scale"]
  if not c.tie_embeddings:
    specs["lm_head/weight"] = (("V", None), d_out)
  return specs


def axis_sizes(config: ModelConfig) -> dict[str, int]:
  """Number of units of each axis kind."""
  c = config
  return {"V": c.vocab_size, "P": c.max_position_embeddings, "L": c.num_layers,
          "D": c.hidden_size, "H": c.num_heads, "K": c.num_kv_heads, "hd": c.head_dim,
          "F": c.intermediate_size}


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Path -> shape of every leaf, from the config alone."""
  sizes = axis_sizes(config)
  return {p: tuple(sizes[k] for k, _ in spec) for p, spec in leaf_specs(config).items()}


def flatten(params: Params, prefix: str = "") -> dict:
  """Nested dict -> {"a/b/c": leaf}."""
  out = {}
  for key, value in params.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten(value, path + "/"))
    else:
      out[path] = value
  return out


def unflatten(flat: dict) -> Params:
  """{"a/b/c": leaf} -> nested dict."""
  out: dict = {}
  for path, value in flat.items():
    node = out
    *parents, last = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = value
  return out
