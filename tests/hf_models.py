"""Tiny random PyTorch `transformers` models, built in tests as the numerical oracle."""

from __future__ import annotations

import numpy as np
import torch
import transformers

FAMILY_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
}


def tiny_hf_config(family: str, tie: bool = False, kv_heads: int = 2, vocab: int = 96, **kw):
  """A 2-layer config of the family: width 64, 4 heads (GQA unless kv_heads == 4)."""
  config_cls, _ = FAMILY_CLASSES[family]
  if family == "gpt2":
    args = dict(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                tie_word_embeddings=tie, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  else:
    args = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                tie_word_embeddings=tie, rope_theta=5000.0, rms_norm_eps=1e-6)
    if family == "qwen3":
      args["head_dim"] = 24  # Qwen3 allows head_dim * heads != width.
  args.update(kw)
  return config_cls(**args)


def tiny_hf_model(family: str, seed: int = 0, **kw):
  """A tiny model with every parameter random (norms around 1, biases non-zero), in eval mode."""
  _, model_cls = FAMILY_CLASSES[family]
  torch.manual_seed(seed)
  model = model_cls(tiny_hf_config(family, **kw)).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or ".ln_" in name or "layernorm" in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
  return model


def torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None,
                 positions: np.ndarray | None = None) -> np.ndarray:
  """fp32 logits of a PyTorch model as numpy."""
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(ids),
                attention_mask=None if mask is None else torch.as_tensor(mask),
                position_ids=None if positions is None else torch.as_tensor(positions))
  return out.logits.float().numpy()
