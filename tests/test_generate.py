"""Cached decoding equals recomputing the whole sequence without a cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cbd_jax
from cbd_jax.model import decoder
from cbd_jax.model.config import ModelConfig
from cbd_jax.model.generate import generate


def test_greedy_cached_generation_matches_uncached_forward():
  config = ModelConfig(family="qwen3", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, intermediate_size=48)
  params = cbd_jax.init_params(config, jax.random.key(0))
  params = jax.tree.map(lambda a: a * 20 if a.ndim > 2 else a, params)  # Peaked distributions.
  prompt = jnp.array([[0, 0, 5, 9, 11], [3, 4, 5, 6, 7]])
  mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
  tokens, keep = generate(config, params, prompt, mask, jax.random.key(1), max_new_tokens=6,
                          temperature=0.0)
  assert tokens.shape == (2, 6) and bool(keep.all())
  for row in range(2):  # Recompute each step from scratch on the real (unpadded) tokens.
    seq = list(np.asarray(prompt[row])[np.asarray(mask[row]).astype(bool)])
    for t in range(6):
      logits = cbd_jax.forward(config, params, jnp.array([seq]))
      seq.append(int(jnp.argmax(logits[0, -1])))
      assert seq[-1] == int(tokens[row, t]), (row, t)


def test_prefill_logits_match_forward_and_eos_masks_the_rest():
  config = ModelConfig(family="gpt2", vocab_size=32, hidden_size=32, num_layers=2, num_heads=2,
                       num_kv_heads=2, head_dim=16, intermediate_size=128, tie_embeddings=True,
                       max_position_embeddings=32)
  params = cbd_jax.init_params(config, jax.random.key(2))
  ids = jax.random.randint(jax.random.key(3), (2, 7), 0, 32)
  logits, _ = decoder.apply_cached(config, params, ids, decoder.init_cache(config, 2, 10), 0)
  np.testing.assert_allclose(logits, cbd_jax.forward(config, params, ids), atol=1e-5)
  tokens, keep = generate(config, params, ids, jnp.ones_like(ids), jax.random.key(4), 12,
                          temperature=1.0, eos_id=int(ids[0, 0]))
  for row in range(2):
    hits = np.flatnonzero(np.asarray(tokens[row]) == int(ids[0, 0]))
    n_keep = int(keep[row].sum())
    assert n_keep == (hits[0] + 1 if len(hits) else 12)
    assert bool(keep[row, :n_keep].all())


def test_prompts_are_checked_on_the_host():
  config = ModelConfig(family="gpt2", vocab_size=32, hidden_size=32, num_layers=1, num_heads=2,
                       num_kv_heads=2, head_dim=16, intermediate_size=128, tie_embeddings=True,
                       max_position_embeddings=16)
  params = cbd_jax.init_params(config, jax.random.key(2))
  prompt = jnp.array([[0, 0, 0, 5, 9, 11, 3, 4]])
  mask = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]])
  # 5 + 11 = 16 tokens fit: test_greedy_generation_equals_transformers_generate runs that.
  with pytest.raises(ValueError) as e:
    generate(config, params, prompt, mask, jax.random.key(1), 12)
  assert str(e.value) == ("a sequence of 17 tokens (12 of them to generate) is longer than this "
                          "GPT-2 model's 16 learned positions (max_position_embeddings); cut it "
                          "to at most 16 tokens")
  with pytest.raises(ValueError) as e:
    generate(config, params, prompt.at[0, 4].set(32), mask, jax.random.key(1), 4)
  assert str(e.value).startswith("token id 32 at index [0, 4] is outside the model's vocabulary "
                                 "[0, 32)")


def test_greedy_generation_equals_transformers_generate(tmp_path):
  """A GPT-2 (learned positions, left-padded prompts, all 16 positions used) written as a Hugging
  Face folder: greedy decoding gives the tokens PyTorch transformers' generate gives on the
  unpadded prompt."""
  import torch
  import transformers

  from cbd_jax.checkpoints import hf_io

  config = ModelConfig(family="gpt2", vocab_size=32, hidden_size=32, num_layers=2, num_heads=2,
                       num_kv_heads=2, head_dim=16, intermediate_size=128, tie_embeddings=True,
                       max_position_embeddings=16)
  params = cbd_jax.init_params(config, jax.random.key(5))
  params = jax.tree.map(lambda a: a * 20 if a.ndim > 2 else a, params)  # Peaked distributions.
  hf_io.save_hf(config, params, tmp_path)
  prompt = jnp.array([[0, 0, 0, 5, 9, 11, 3, 4], [0, 0, 0, 7, 1, 2, 30, 8]])
  mask = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]])
  tokens, _ = generate(config, params, prompt, mask, jax.random.key(1), 11, temperature=0.0)
  assert tokens.shape == (2, 11)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
  for row in range(2):
    real = torch.as_tensor(np.asarray(prompt[row])[np.asarray(mask[row]).astype(bool)])[None]
    want = hf.generate(real, attention_mask=torch.ones_like(real), max_new_tokens=11,
                       min_new_tokens=11, do_sample=False, pad_token_id=0)
    assert np.asarray(tokens[row]).tolist() == want[0, real.shape[1]:].tolist(), row
