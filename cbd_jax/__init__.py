"""cbd-jax: Chain-based Distillation in JAX/Flax.

The public API::

  config, params = cbd_jax.load_hf("Qwen/Qwen2.5-0.5B")   # or a folder, or a .gguf file
  logits = cbd_jax.forward(config, params, input_ids)     # [batch, seq, vocab], fp32
  cbd_jax.save_hf(config, params, "out/", tokenizer=tok)  # transformers loads "out/"
  cbd_jax.init_target("50m", chain="runs/smollm2_chain")  # a model between two anchors, on disk
  params = cbd_jax.interpolate(small, large, target_config)  # anchors as (config, params)
"""

from cbd_jax.checkpoints.hf_io import load_hf, load_tokenizer, save_hf
from cbd_jax.interpolation.mixing import interpolate
from cbd_jax.interpolation.target import init_target
from cbd_jax.model.config import ModelConfig, num_params
from cbd_jax.model.decoder import apply_hidden, forward, head_weight, init_params

__all__ = ["ModelConfig", "num_params", "load_hf", "load_tokenizer", "save_hf", "apply_hidden",
           "forward", "head_weight", "init_params", "interpolate", "init_target"]
