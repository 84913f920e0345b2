"""Fetches the offline artefacts (teacher GGUF, GPT-2 tokenizer, English text) into the cache.

Usage: python launch/fetch_assets.py     (cache folder: $CBD_CACHE, default ~/.cache/cbd-jax)
"""

import logging
import sys

from cbd_jax import cli, errors
from cbd_jax.checkpoints import assets


def main(argv: list[str]) -> int:
  """Fetches every artefact and prints where each one lies."""
  if argv:
    raise errors.UsageError(f"unexpected arguments {argv}; this command takes none (the cache "
                         "folder is $CBD_CACHE)")
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  for name, path in assets.fetch_all().items():
    print(f"{name:14s} {path}")
  return 0


if __name__ == "__main__":
  cli.run(main, sys.argv[1:])
