"""cbd-jax: Chain-based Distillation in JAX/Flax.

The public API of the model layer::

  config, params = cbd_jax.load_hf("Qwen/Qwen2.5-0.5B")   # or a folder, or a .gguf file
  logits = cbd_jax.forward(config, params, input_ids)     # [batch, seq, vocab], fp32
  cbd_jax.save_hf(config, params, "out/", tokenizer=tok)  # transformers loads "out/"
"""

from cbd_jax.checkpoints.hf_io import load_hf, load_tokenizer, save_hf
from cbd_jax.model.config import ModelConfig, num_params
from cbd_jax.model.decoder import apply_hidden, forward, head_weight, init_params

__all__ = ["ModelConfig", "num_params", "load_hf", "load_tokenizer", "save_hf", "apply_hidden",
           "forward", "head_weight", "init_params"]
