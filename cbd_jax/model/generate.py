"""Sampling with a key/value cache: prompts in, continuations out (for sequence-level KD)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cbd_jax.model import decoder
from cbd_jax.model.config import ModelConfig, check_ids, host_value


def _sample(logits_BxV, rng, temperature: float, top_k: int, vocab_limit: int):
  """Greedy when temperature == 0, else softmax(logits / T) restricted to the top k (k=0: all)."""
  logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < vocab_limit, logits_BxV, -jnp.inf)
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1)
  logits_BxV = logits_BxV / temperature
  if top_k:
    kth = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth, -jnp.inf, logits_BxV)
  return jax.random.categorical(rng, logits_BxV, axis=-1)


def generate(config: ModelConfig, params, prompt_BxP, prompt_mask_BxP, rng, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, eos_id: int = -1):
  """Continues left-padded prompts; returns (tokens [B, N], mask [B, N] of tokens before eos).

  The eos token itself is kept (mask 1); everything a row samples after its eos is masked out.
  Concrete prompts are checked on the host first (ids in the vocabulary, GPT-2 length).
  """
  mask = host_value(prompt_mask_BxP)
  last = None if mask is None or not mask.size else mask.sum(axis=1) - 1
  check_ids(config, prompt_BxP, last, new_tokens=max_new_tokens)
  return _generate(config, params, prompt_BxP, prompt_mask_BxP, rng, max_new_tokens,
                   temperature, top_k, eos_id)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature", "top_k"))
def _generate(config: ModelConfig, params, prompt_BxP, prompt_mask_BxP, rng, max_new_tokens: int,
              temperature: float = 1.0, top_k: int = 0, eos_id: int = -1):
  """`generate`, compiled once per config, shape and sampling settings."""
  B, P = prompt_BxP.shape
  cache = decoder.init_cache(config, B, P + max_new_tokens)
  slots = jnp.concatenate([prompt_mask_BxP.astype(bool), jnp.ones((B, max_new_tokens), bool)], 1)
  positions = jnp.clip(jnp.cumsum(prompt_mask_BxP, axis=1) - 1, 0, None)
  logits, cache = decoder.apply_cached(config, params, prompt_BxP, cache, 0, slots, positions)
  rng, key = jax.random.split(rng)
  token = _sample(logits[:, -1], key, temperature, top_k, config.vocab_limit)
  next_pos = positions[:, -1] + 1

  def step(carry, i):
    token, cache, pos, alive, rng = carry
    rng, key = jax.random.split(rng)
    logits, cache = decoder.apply_cached(config, params, token[:, None], cache, P + i, slots,
                                         pos[:, None])
    new = _sample(logits[:, -1], key, temperature, top_k, config.vocab_limit)
    alive_next = alive & (token != eos_id)
    return (new, cache, pos + 1, alive_next, rng), (token, alive)

  alive = jnp.ones((B,), bool)
  _, (tokens, keep) = jax.lax.scan(step, (token, cache, next_pos, alive, rng),
                                   jnp.arange(max_new_tokens))
  return tokens.T, keep.T
