"""Declarative Hugging Face <-> cbd-jax tensor tables, one per family, applied in both directions.

A `Rule` ties one or more HF tensors (per layer when ``layered``) to one or more of our params with
a pair of inverse maps. Loading checks that every tensor of the file is consumed and every param
produced, and asserts each tensor's shape, naming the tensor and both shapes on a mismatch.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

import jax
import ml_dtypes
import numpy as np

from cbd_jax.model.config import ModelConfig
from cbd_jax.model.layout import param_shapes

Arrays = list[np.ndarray]
# Buffers some GPT-2 files carry (causal-mask constants), not parameters.
_IGNORED = re.compile(r"(^|\.)attn\.(masked_)?bias$|rotary_emb\.inv_freq$")


_FLOATS = {np.dtype(t) for t in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16)}


class ConversionError(ValueError):
  """A checkpoint whose tensors do not match the configuration."""


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: tuple[str, ...]  # HF names; "{i}" stands for the layer index when `layered`.
  ours: tuple[str, ...]  # "/"-joined param paths.
  hf_shapes: tuple[tuple[int, ...], ...]  # Per layer when `layered`.
  to_ours: Callable[[Arrays], Arrays]
  to_hf: Callable[[Arrays], Arrays]
  layered: bool = True


def _reshape(hf: str, ours: str, hf_shape, our_shape, layered=True) -> Rule:
  """One HF tensor <-> one param that differs at most by a reshape (no data movement)."""
  return Rule((hf,), (ours,), (tuple(hf_shape),), lambda a: [a[0].reshape(our_shape)],
              lambda a: [a[0].reshape(hf_shape)], layered)


def _transpose(hf: str, ours: str, hf_shape, our_shape) -> Rule:
  """GPT-2 Conv1D [in, out] <-> our [out..., in]."""
  flat_out = (hf_shape[1],)
  return Rule((hf,), (ours,), (tuple(hf_shape),), lambda a: [a[0].T.reshape(our_shape)],
              lambda a: [a[0].reshape(*flat_out, -1).T])


def _llama_rules(c: ModelConfig) -> list[Rule]:
  D, F, H, K, hd = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
  p = "model.layers.{i}."
  rules = [
      _reshape("model.embed_tokens.weight", "embed/embedding", (c.vocab_size, D),
               (c.vocab_size, D), layered=False),
      _reshape("model.norm.weight", "final_norm/scale", (D,), (D,), layered=False),
      _reshape(p + "input_layernorm.weight", "layers/attn_norm/scale", (D,), (D,)),
      _reshape(p + "post_attention_layernorm.weight", "layers/mlp_norm/scale", (D,), (D,)),
      _reshape(p + "self_attn.o_proj.weight", "layers/attn/o/weight", (D, H * hd), (D, H, hd)),
      _reshape(p + "mlp.gate_proj.weight", "layers/mlp/gate/weight", (F, D), (F, D)),
      _reshape(p + "mlp.up_proj.weight", "layers/mlp/up/weight", (F, D), (F, D)),
      _reshape(p + "mlp.down_proj.weight", "layers/mlp/down/weight", (D, F), (D, F)),
  ]
  for name, heads in (("q", H), ("k", K), ("v", K)):
    rules.append(_reshape(p + f"self_attn.{name}_proj.weight", f"layers/attn/{name}/weight",
                          (heads * hd, D), (heads, hd, D)))
    if c.qkv_bias:
      rules.append(_reshape(p + f"self_attn.{name}_proj.bias", f"layers/attn/{name}/bias",
                            (heads * hd,), (heads, hd)))
  if c.qk_norm:
    for name in ("q", "k"):
      rules.append(_reshape(p + f"self_attn.{name}_norm.weight", f"layers/attn/{name}_norm/scale",
                            (hd,), (hd,)))
  if not c.tie_embeddings:
    rules.append(_reshape("lm_head.weight", "lm_head/weight", (c.vocab_size, D),
                          (c.vocab_size, D), layered=False))
  return rules


def _gpt2_rules(c: ModelConfig) -> list[Rule]:
  D, F, H, hd = c.hidden_size, c.intermediate_size, c.num_heads, c.head_dim
  p = "transformer.h.{i}."
  rules = [
      _reshape("transformer.wte.weight", "embed/embedding", (c.vocab_size, D), (c.vocab_size, D),
               layered=False),
      _reshape("transformer.wpe.weight", "pos_embed/embedding", (c.max_position_embeddings, D),
               (c.max_position_embeddings, D), layered=False),
      _reshape("transformer.ln_f.weight", "final_norm/scale", (D,), (D,), layered=False),
      _reshape("transformer.ln_f.bias", "final_norm/bias", (D,), (D,), layered=False),
      Rule((p + "attn.c_attn.weight",), tuple(f"layers/attn/{n}/weight" for n in "qkv"),
           ((D, 3 * D),),
           lambda a: [w.T.reshape(H, hd, D) for w in np.split(a[0], 3, axis=1)],
           lambda a: [np.concatenate([w.reshape(H * hd, D).T for w in a], axis=1)]),
      Rule((p + "attn.c_attn.bias",), tuple(f"layers/attn/{n}/bias" for n in "qkv"), ((3 * D,),),
           lambda a: [b.reshape(H, hd) for b in np.split(a[0], 3)],
           lambda a: [np.concatenate([b.reshape(-1) for b in a])]),
      _transpose(p + "attn.c_proj.weight", "layers/attn/o/weight", (H * hd, D), (D, H, hd)),
      _reshape(p + "attn.c_proj.bias", "layers/attn/o/bias", (D,), (D,)),
      _transpose(p + "mlp.c_fc.weight", "layers/mlp/up/weight", (D, F), (F, D)),
      _reshape(p + "mlp.c_fc.bias", "layers/mlp/up/bias", (F,), (F,)),
      _transpose(p + "mlp.c_proj.weight", "layers/mlp/down/weight", (F, D), (D, F)),
      _reshape(p + "mlp.c_proj.bias", "layers/mlp/down/bias", (D,), (D,)),
  ]
  for hf_name, ours in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
    rules.append(_reshape(p + f"{hf_name}.weight", f"layers/{ours}/scale", (D,), (D,)))
    rules.append(_reshape(p + f"{hf_name}.bias", f"layers/{ours}/bias", (D,), (D,)))
  if not c.tie_embeddings:
    rules.append(_reshape("lm_head.weight", "lm_head/weight", (c.vocab_size, D),
                          (c.vocab_size, D), layered=False))
  return rules


def rules_for(config: ModelConfig) -> list[Rule]:
  """The conversion table of the config's family."""
  return _gpt2_rules(config) if config.is_gpt2 else _llama_rules(config)


def _resolve(source: Mapping[str, np.ndarray]) -> Callable[[str], str | None]:
  """Finds a canonical HF name in the file, tolerating a missing ``model.``/``transformer.``."""
  def find(name: str) -> str | None:
    if name in source:
      return name
    short = name.split(".", 1)[1] if name.startswith(("model.", "transformer.")) else None
    return short if short in source else None
  return find


def _set_path(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[leaf] = value


def _check_float(arr: np.ndarray, name: str, where: str) -> None:
  """Refuses a weight that is not floating point (an int tensor would load as garbage)."""
  if np.dtype(arr.dtype) not in _FLOATS:
    raise ConversionError(f"{where}: tensor {name!r} has dtype {np.dtype(arr.dtype)}; model "
                          "weights must be floating point (float32, bfloat16, float16, float64): "
                          "this is not a model's weights, or it was saved wrongly; export it "
                          "again with float weights")


def from_hf_tensors(config: ModelConfig, source: Mapping[str, np.ndarray], where: str = "",
                    dtype=None) -> dict:
  """HF-named tensors -> our nested numpy param dict (stacked layers), validated both ways."""
  shapes = param_shapes(config)
  find = _resolve(source)
  used: set[str] = set()
  buffers: dict[str, np.ndarray] = {}
  for rule in rules_for(config):
    layers = range(config.num_layers) if rule.layered else [None]
    for i in layers:
      arrays = []
      for name, hf_shape in zip(rule.hf, rule.hf_shapes):
        name = name.format(i=i)
        key = find(name)
        if key is None:
          raise ConversionError(f"{where}: tensor {name!r} is missing (expected shape {hf_shape} "
                                f"for this {config.family} config); the checkpoint does not match "
                                "its config.json")
        arr = source[key]
        if tuple(arr.shape) != hf_shape:
          raise ConversionError(f"{where}: tensor {key!r} has shape {tuple(arr.shape)}, "
                                f"config.json implies {hf_shape}")
        _check_float(arr, key, where)
        used.add(key)
        arrays.append(arr)
      for path, arr in zip(rule.ours, rule.to_ours(arrays)):
        if path not in buffers:
          buffers[path] = np.empty(shapes[path], dtype or arr.dtype)
        if i is None:
          buffers[path][...] = arr
        else:
          buffers[path][i] = arr
  if config.tie_embeddings:  # Some tied checkpoints still store the (identical) head.
    for name in ("lm_head.weight",):
      if name in source:
        used.add(name)
  unused = sorted(k for k in source if k not in used and not _IGNORED.search(k))
  if unused:
    raise ConversionError(f"{where}: {len(unused)} tensors are not used by a {config.family} "
                          f"model with this config, e.g. {unused[:3]}; check config.json")
  missing = set(shapes) - set(buffers)
  if missing:
    raise ConversionError(f"{where}: params {sorted(missing)} were not produced")
  params: dict = {}
  for path, arr in buffers.items():
    _set_path(params, path, arr)
  return params


def to_hf_tensors(config: ModelConfig, params: dict) -> dict[str, np.ndarray]:
  """Our params -> HF-named numpy tensors (per layer), every param used exactly once."""
  flat = {"/".join(k.key for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  shapes = param_shapes(config)
  for path, shape in shapes.items():
    if path not in flat:
      raise ConversionError(f"param {path!r} is missing for this {config.family} config")
    if flat[path].shape != shape:
      raise ConversionError(f"param {path!r} has shape {flat[path].shape}, config implies {shape}")
  extra = set(flat) - set(shapes)
  if extra:
    raise ConversionError(f"params {sorted(extra)} do not belong to this {config.family} config")
  out: dict[str, np.ndarray] = {}
  for rule in rules_for(config):
    layers = range(config.num_layers) if rule.layered else [None]
    for i in layers:
      arrays = [flat[p] if i is None else flat[p][i] for p in rule.ours]
      for name, arr in zip(rule.hf, rule.to_hf(arrays)):
        out[name.format(i=i)] = arr
  return out
