"""Fetches the offline artefacts (teacher GGUF, GPT-2 tokenizer, English text) into the cache.

Usage: python launch/fetch_assets.py     (cache folder: $CBD_CACHE, default ~/.cache/cbd-jax)
"""

import logging

from cbd_jax import assets

if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  for name, path in assets.fetch_all().items():
    print(f"{name:14s} {path}")
