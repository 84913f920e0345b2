"""The decoder: one Flax definition for Llama, Qwen2, Qwen3 and GPT-2.

Params are a plain nested dict, layers stacked on a leading axis ``L``. Weight matrices keep the
PyTorch ``[out, in]`` order (heads split out), so Hugging Face tensors load without transposes:

  embed/embedding            [V, D]         pos_embed/embedding (GPT-2)  [P, D]
  layers/attn/q/weight       [L, H, hd, D]  layers/attn/{k,v}/weight     [L, K, hd, D]
  layers/attn/o/weight       [L, D, H, hd]  layers/attn/{q,k}_norm/scale [L, hd]  (Qwen3)
  layers/mlp/{gate,up}/weight [L, F, D]     layers/mlp/down/weight       [L, D, F]
  layers/{attn,mlp}_norm/scale [L, D]       final_norm/scale             [D]
  lm_head/weight             [V, D]         (absent when embeddings are tied)

Biases, where a family has them, sit beside each weight with the weight's ``out`` shape.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cbd_jax.model.config import ModelConfig, check_ids
from cbd_jax.model.sharding import constrain_batch, heads_spec

Params = dict[str, Any]
_INIT_STD = 0.02
_FLASH_BLOCK = 128  # The Pallas TPU flash kernel's default query and key block.


class Linear(nn.Module):
  """y = x . W^T (+ b), contracting the last ``in_ndim`` axes of x with W's trailing axes."""

  out_shape: tuple[int, ...]
  in_ndim: int
  use_bias: bool
  dtype: Any

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[x.ndim - self.in_ndim:]
    w = self.param("weight", nn.initializers.normal(_INIT_STD), (*self.out_shape, *in_shape))
    n_out = len(self.out_shape)
    dims = (tuple(range(x.ndim - self.in_ndim, x.ndim)), tuple(range(n_out, w.ndim)))
    y = jax.lax.dot_general(x.astype(self.dtype), w.astype(self.dtype), (dims, ((), ())))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, self.out_shape).astype(self.dtype)
    return y


class Norm(nn.Module):
  """RMSNorm (x / rms(x) * scale) or LayerNorm ((x - mean) / std * scale + bias), in fp32."""

  layer_norm: bool
  eps: float

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (dim,))
    x32 = x.astype(jnp.float32)
    if self.layer_norm:
      bias = self.param("bias", nn.initializers.zeros, (dim,))
      x32 = x32 - x32.mean(-1, keepdims=True)
    y = x32 * jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + self.eps)
    self.sow("intermediates", "normalized", y)  # Before the scale; kept only when asked.
    if self.layer_norm:
      return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
    # Hugging Face order: normalise in fp32, cast back, then scale in the input dtype.
    return scale.astype(x.dtype) * y.astype(x.dtype)


def rope_frequencies(config: ModelConfig) -> np.ndarray:
  """Inverse RoPE frequencies [hd/2] (fp32), with Llama 3 frequency scaling when configured."""
  hd = config.head_dim
  inv = (1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32)
                                       / hd))).astype(np.float32)
  if config.rope_scaling is None:
    return inv
  kind, factor, low, high, original = config.rope_scaling
  if kind != "llama3":
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: 'llama3'")
  low_wavelen, high_wavelen = original / low, original / high
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
  smooth = (original / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _rotate(x, cos, sin):
  """RoPE in the rotate-half convention: x * cos + rotate_half(x) * sin."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def _platform() -> str:
  """The platform being compiled for: the mesh traced under (AOT for TPU), else the default."""
  mesh = jax.sharding.get_abstract_mesh()
  return jax.default_backend() if mesh.empty else mesh.abstract_device.platform


def attention_impl(dtype, causal_unpadded: bool, seq_len: int) -> str:
  """'tpu_flash' (Pallas), 'cudnn' or 'xla': fused kernels for unpadded causal batches only.

  TPU: the Pallas flash kernel that ships with JAX, for sequences in whole 128-token blocks,
  when traced under ``jax.set_mesh`` (or on one chip).
  GPU: cuDNN's flash kernel, for bf16/fp16. Anything else (padding masks, a KV cache): XLA.
  """
  platform = _platform() if causal_unpadded else "none"
  # The kernel is split over a mesh by shard_map, so it needs the mesh traced under (or 1 chip).
  placed = not jax.sharding.get_abstract_mesh().empty or jax.device_count() == 1
  if platform == "tpu" and placed and seq_len % _FLASH_BLOCK == 0:
    return "tpu_flash"
  if platform in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla"


def tpu_flash_attention(q_BxTxHxK, k_BxTxKxK, v_BxTxKxK, scale: float):
  """Causal attention by JAX's Pallas TPU flash kernel; kv heads repeated for GQA.

  Under a mesh the kernel runs per shard (``shard_map``: examples over data and fsdp, heads over
  tensor), since XLA cannot partition a custom kernel itself.
  """
  from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention

  groups = q_BxTxHxK.shape[2] // k_BxTxKxK.shape[2]
  k = jnp.repeat(k_BxTxKxK, groups, axis=2)
  v = jnp.repeat(v_BxTxKxK, groups, axis=2)

  def kernel(q, k, v):
    out_BxHxTxK = flash_attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2),
                                  causal=True, sm_scale=scale)
    return out_BxHxTxK.swapaxes(1, 2)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel(q_BxTxHxK, k, v)
  spec = heads_spec(q_BxTxHxK.shape, mesh)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q_BxTxHxK, k, v)


class Attention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, mask, cos, sin, kv=None, cache_index=None):
    c, dt = self.config, jnp.dtype(self.config.dtype)
    q = Linear((c.num_heads, c.head_dim), 1, c.qkv_bias, dt, name="q")(x_BxTxD)
    k = Linear((c.num_kv_heads, c.head_dim), 1, c.qkv_bias, dt, name="k")(x_BxTxD)
    v = Linear((c.num_kv_heads, c.head_dim), 1, c.qkv_bias, dt, name="v")(x_BxTxD)
    q, k, v = constrain_batch(q), constrain_batch(k), constrain_batch(v)
    if c.qk_norm:
      q = Norm(False, c.norm_eps, name="q_norm")(q)
      k = Norm(False, c.norm_eps, name="k_norm")(k)
    if cos is not None:
      q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    if kv is not None:  # Decoding: write this step's keys/values into the cache, attend to it all.
      start = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
      v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
      kv = (k, v)
    scale = 1.0 / math.sqrt(c.head_dim)
    impl = attention_impl(dt, mask is None, q.shape[1])
    if impl == "tpu_flash":
      out_BxTxHxK = tpu_flash_attention(q, k, v, scale)
    else:
      out_BxTxHxK = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None,
                                                 scale=scale, implementation=impl)
    out_BxTxHxK = constrain_batch(out_BxTxHxK)
    self.sow("intermediates", "heads", out_BxTxHxK)  # Kept only when asked (`importance`).
    return Linear((c.hidden_size,), 2, c.out_bias, dt, name="o")(out_BxTxHxK), kv


class Mlp(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    c, dt = self.config, jnp.dtype(self.config.dtype)
    f = c.intermediate_size
    if c.gated_mlp:
      gate = Linear((f,), 1, False, dt, name="gate")(x)
      h = jax.nn.silu(gate) * Linear((f,), 1, False, dt, name="up")(x)
    else:
      h = jax.nn.gelu(Linear((f,), 1, True, dt, name="up")(x), approximate=True)
    h = constrain_batch(h)
    self.sow("intermediates", "neurons", h)
    return Linear((c.hidden_size,), 1, c.is_gpt2, dt, name="down")(h)


class Block(nn.Module):
  """Pre-norm residual block; written for ``nn.scan`` (carry = residual stream)."""

  config: ModelConfig
  output_hidden: bool = False

  @nn.compact
  def __call__(self, x, mask, cos, sin, kv, cache_index):
    c = self.config
    x = constrain_batch(x)
    h, kv = Attention(c, name="attn")(Norm(c.is_gpt2, c.norm_eps, name="attn_norm")(x),
                                      mask, cos, sin, kv, cache_index)
    x = constrain_batch(x + h)
    x = constrain_batch(x + Mlp(c, name="mlp")(Norm(c.is_gpt2, c.norm_eps, name="mlp_norm")(x)))
    return x, (x if self.output_hidden else None, kv)


class Decoder(nn.Module):
  """Token ids -> (final normed hidden [B, T, D], every layer's output if asked, updated cache).

  With a ``cache`` ({"k", "v"}: [L, B, S, K, hd]) the T new tokens sit at positions
  ``cache_index ... cache_index + T - 1`` of it and ``attention_mask`` covers all S slots.
  """

  config: ModelConfig
  output_hidden: bool = False

  @nn.compact
  def __call__(self, ids_BxT, attention_mask=None, positions=None, cache=None, cache_index=0):
    c, dt = self.config, jnp.dtype(self.config.dtype)
    B, T = ids_BxT.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    embed = self.param("embed", nn.initializers.normal(_INIT_STD),
                       (c.vocab_size, c.hidden_size), unbox=True)
    x = constrain_batch(jnp.take(embed, ids_BxT, axis=0).astype(dt))
    cos = sin = None
    if c.is_gpt2:
      pos = self.param("pos_embed", nn.initializers.normal(_INIT_STD),
                       (c.max_position_embeddings, c.hidden_size))
      x = x + jnp.take(pos, positions, axis=0).astype(dt)
    else:
      angles = positions[..., None].astype(jnp.float32) * rope_frequencies(c)
      angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, hd]
      cos, sin = jnp.cos(angles).astype(dt), jnp.sin(angles).astype(dt)
    mask = None
    if attention_mask is not None or cache is not None:
      S = T if cache is None else cache["k"].shape[2]
      keep = jnp.ones((B, S), bool) if attention_mask is None else attention_mask.astype(bool)
      query_pos, key_pos = cache_index + jnp.arange(T), jnp.arange(S)
      # A query always sees itself, so fully padded rows stay finite (their outputs are unused).
      mask = ((key_pos[None, :] <= query_pos[:, None]) & keep[:, None, None, :]
              | (key_pos[None, :] == query_pos[:, None]))
    kv = None if cache is None else (cache["k"], cache["v"])
    block = nn.remat(Block, prevent_cse=False) if c.remat else Block
    layers = nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                     split_rngs={"params": True},
                     in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                     length=c.num_layers)
    embedded = x
    x, (per_layer, kv) = layers(c, self.output_hidden, name="layers")(x, mask, cos, sin, kv,
                                                                      cache_index)
    x = constrain_batch(Norm(c.is_gpt2, c.norm_eps, name="final_norm")(x))
    new_cache = None if kv is None else {"k": kv[0], "v": kv[1]}
    if self.output_hidden:
      per_layer = jnp.concatenate([embedded[None], per_layer], axis=0)
    return x, per_layer, new_cache


def _wrap_embeddings(params: Params) -> Params:
  """Our dict stores embeddings as ``{"embedding": ...}``; linen stores the bare array."""
  out = dict(params)
  out["embed"] = params["embed"]["embedding"]
  if "pos_embed" in params:
    out["pos_embed"] = params["pos_embed"]["embedding"]
  out.pop("lm_head", None)
  return out


def _unwrap_embeddings(linen_params: Params) -> Params:
  out = dict(linen_params)
  out["embed"] = {"embedding": linen_params["embed"]}
  if "pos_embed" in linen_params:
    out["pos_embed"] = {"embedding": linen_params["pos_embed"]}
  return out


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_params(config: ModelConfig, rng: jax.Array, dtype=jnp.float32) -> Params:
  """Random params (normal(0.02) weights, zero biases, unit norm scales) as a nested dict.

  Shapes come from tracing the module once; each leaf is then drawn directly, which keeps the
  function cheap to compile and usable under ``jax.jit(..., out_shardings=...)``.
  """
  ids = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: Decoder(config).init(jax.random.key(0), ids))["params"]
  shapes = _unwrap_embeddings(shapes)
  if not config.tie_embeddings:
    shapes["lm_head"] = {"weight": jax.ShapeDtypeStruct((config.vocab_size, config.hidden_size),
                                                        jnp.float32)}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  is_weight = [path[-1].key not in ("scale", "bias") for path, _ in leaves]
  sizes = [leaf.size if w else 0 for (_, leaf), w in zip(leaves, is_weight)]
  # One draw for all weights (a single RNG op compiles far faster than one per leaf).
  noise = _INIT_STD * jax.random.normal(rng, (sum(sizes),))
  offsets = np.cumsum([0, *sizes])
  out = []
  for (path, leaf), w, start in zip(leaves, is_weight, offsets):
    if w:
      out.append(noise[start:start + leaf.size].reshape(leaf.shape).astype(dtype))
    else:
      fill = jnp.ones if path[-1].key == "scale" else jnp.zeros
      out.append(fill(leaf.shape, dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def abstract_params(config: ModelConfig, dtype=jnp.float32) -> dict:
  """ShapeDtypeStructs of a model's params (nothing allocated)."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0), dtype))


def head_weight(config: ModelConfig, params: Params) -> jax.Array:
  """The output embedding [V, D]: the input embedding when tied, else ``lm_head``."""
  return params["embed"]["embedding"] if config.tie_embeddings else params["lm_head"]["weight"]


def apply_hidden(config: ModelConfig, params: Params, ids_BxT, attention_mask=None,
                 positions=None, output_hidden: bool = False):
  """Returns (final normed hidden [B, T, D], per-layer residuals [L+1, B, T, D] or None).

  ``per_layer[0]`` is the embedding output and ``per_layer[i]`` the output of layer i, before the
  final norm. ``attention_mask`` [B, T] marks real tokens (1) against padding (0).
  """
  hidden, per_layer, _ = Decoder(config, output_hidden).apply(
      {"params": _wrap_embeddings(params)}, ids_BxT, attention_mask, positions)
  return hidden, per_layer


def init_cache(config: ModelConfig, batch: int, length: int) -> dict[str, jax.Array]:
  """An empty key/value cache {"k", "v"}: [L, B, S, K, hd] in the compute dtype."""
  shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
  return {"k": jnp.zeros(shape, config.dtype), "v": jnp.zeros(shape, config.dtype)}


def apply_cached(config: ModelConfig, params: Params, ids_BxT, cache, cache_index,
                 attention_mask=None, positions=None):
  """Runs T new tokens against a cache; returns (fp32 logits [B, T, V], updated cache).

  ``attention_mask`` [B, S] marks the real slots of the whole cache (prompt padding = 0).
  """
  hidden, _, cache = Decoder(config).apply({"params": _wrap_embeddings(params)}, ids_BxT,
                                           attention_mask, positions, cache, cache_index)
  return logits_from_hidden(config, params, hidden), cache


def logits_from_hidden(config: ModelConfig, params: Params, hidden_BxTxD) -> jax.Array:
  """Output logits [B, T, V] in fp32 from final hidden states."""
  w = head_weight(config, params)
  dt = jnp.dtype(config.dtype)
  return jnp.einsum("btd,vd->btv", hidden_BxTxD.astype(dt), w.astype(dt),
                    preferred_element_type=jnp.float32)


def forward(config: ModelConfig, params: Params, ids_BxT, attention_mask=None,
            positions=None) -> jax.Array:
  """Logits [B, T, V] (fp32) for token ids [B, T]; concrete ids are checked on the host first."""
  check_ids(config, ids_BxT, positions)
  return _forward(config, params, ids_BxT, attention_mask, positions)


@functools.partial(jax.jit, static_argnums=0)
def _forward(config: ModelConfig, params: Params, ids_BxT, attention_mask=None,
             positions=None) -> jax.Array:
  """`forward`, compiled once per config and shape."""
  hidden, _ = apply_hidden(config, params, ids_BxT, attention_mask, positions)
  return logits_from_hidden(config, params, hidden)
