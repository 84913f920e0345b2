"""A GGUF teacher converted once into a Hugging Face folder, so later loads are memory-mapped.

Reading a GGUF file means dequantising every tensor and, for its tokenizer, rebuilding a BPE model
from the file's metadata in Python; both take tens of seconds on a small CPU, every time. The
folder written here (fp32 safetensors: the dequantised values exactly, and the tokenizer files)
loads in about a second. It lives in the cache (``$CBD_CACHE/converted``), keyed by the file's
name and size, and appears whole or not at all.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def converted_folder(gguf_path: str | os.PathLike, cache_root: str | os.PathLike | None = None
                     ) -> Path:
  """The HF folder of ``gguf_path`` in the cache (not created here)."""
  from cbd_jax.checkpoints import assets

  gguf_path = Path(gguf_path).expanduser()
  root = Path(cache_root) if cache_root else assets.cache_dir() / "converted"
  return root / f"{gguf_path.name.removesuffix('.gguf')}-{gguf_path.stat().st_size}"


def hf_folder(gguf_path: str | os.PathLike, cache_root: str | os.PathLike | None = None) -> Path:
  """The HF folder (weights + tokenizer) of a GGUF file, converting it the first time."""
  from cbd_jax.checkpoints import hf_io

  gguf_path = Path(gguf_path).expanduser()
  if not gguf_path.is_file():
    raise FileNotFoundError(f"{gguf_path}: GGUF file not found; run launch/fetch_assets.py")
  out = converted_folder(gguf_path, cache_root)
  if (out / "config.json").exists():
    return out
  log.info("converting %s into %s (once)", gguf_path.name, out)
  config, params = hf_io.load_hf_numpy(gguf_path)
  tokenizer = hf_io.load_tokenizer(gguf_path)
  try:
    hf_io.save_hf(config, params, out, tokenizer=tokenizer)
  except FileExistsError:  # Another process finished the same conversion first.
    pass
  return out
