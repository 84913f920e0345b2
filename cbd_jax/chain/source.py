"""The chain's source: a Hugging Face folder, hub id or GGUF file, or a random model built here.

A random source (``source.random_init``) is for smoke runs and tests: a byte-level BPE tokenizer
trained on the training text and a decoder with normal(0.02) weights drawn on the host (seeded,
so the same config always builds the same model), saved as a Hugging Face folder at
``source.path`` the first time it is needed and reused afterwards.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from cbd_jax import data
from cbd_jax.checkpoints import hf_io
from cbd_jax.model.config import ModelConfig
from cbd_jax.model.decoder import abstract_params

log = logging.getLogger(__name__)


def init_host_params(config: ModelConfig, seed: int) -> dict[str, Any]:
  """Random params in numpy: normal(0.02) weights and embeddings, zero biases, unit norm scales."""
  rng = np.random.default_rng(seed)

  def one(path, leaf):
    name = path[-1].key
    if name == "scale":
      return np.ones(leaf.shape, np.float32)
    if name == "bias":
      return np.zeros(leaf.shape, np.float32)
    return (0.02 * rng.standard_normal(leaf.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(one, abstract_params(config))


def build_random_source(spec, out: str | os.PathLike, text: str) -> Path:
  """Trains a BPE tokenizer on ``text`` and writes a random decoder of shape ``spec`` to ``out``."""
  out = Path(out)
  files = data.resolve_files(text)
  if files is None:
    raise ValueError("a random source needs local training text (data.train) for its tokenizer")
  tok_dir = out.with_name(out.name + "-tokenizer")
  tokenizer = data.train_bpe_tokenizer(files, int(spec.tokenizer_vocab), tok_dir)
  real = len(tokenizer)
  fields = {k: v for k, v in dict(spec).items() if k not in ("tokenizer_vocab", "seed")}
  config = ModelConfig(vocab_size=-(-real // 64) * 64, real_vocab_size=real,
                       eos_token_id=tokenizer.eos_token_id, **fields)
  log.info("building a random %s source at %s", config.family, out)
  hf_io.save_hf(config, init_host_params(config, int(spec.seed)), out, tokenizer=tokenizer)
  return out


def prepare_source(config) -> tuple[str, str]:
  """(model path, tokenizer path) of the source; builds the random source if asked and missing.

  A ``.gguf`` source is converted once into an HF folder in the cache (`checkpoints.gguf_cache`) and
  read from there: the same weights, loaded in seconds instead of dequantised on every load.
  """
  path = os.path.expanduser(str(config.source.path))
  if config.source.get("random_init") and not os.path.exists(path):
    if jax.process_index() == 0:
      build_random_source(config.source.random_init, path, config.data.train)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("random-source")
  if path.endswith(".gguf") and os.path.isfile(path):
    from cbd_jax.checkpoints import gguf_cache

    if jax.process_index() == 0:
      gguf_cache.hf_folder(path)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("gguf-source")
    path = str(gguf_cache.converted_folder(path))
  return path, os.path.expanduser(str(config.source.get("tokenizer") or path))
