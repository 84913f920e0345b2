"""Report on a finished chain: held-out perplexity and bits per byte of the source, every anchor and
every interpolated target; tokens used; teacher compute; where the files are.

  python launch/report.py                                   # runs/smollm2_chain, news held-out
  python launch/report.py --chain runs/qwen_chain --text heldout.txt --eval_tokens 16384
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--chain", default="runs/smollm2_chain",
                 help="chain folder (with chain.json) written by launch/train_chain.py")
  p.add_argument("--text", default=None,
                 help="held-out plain-text file (default: the chain config's data.heldout, else "
                      "the fetched news text)")
  p.add_argument("--eval_tokens", type=int, default=4096, help="held-out tokens per model")
  p.add_argument("--seq_len", type=int, default=128, help="evaluation row length")
  args = p.parse_args(argv)
  if args.eval_tokens < 1:
    p.error(f"--eval_tokens={args.eval_tokens} must be >= 1")
  if args.seq_len < 1:
    p.error(f"--seq_len={args.seq_len} must be >= 1")
  return args


def _default_text(chain: str) -> str:
  """The chain config's held-out file when it exists, else the fetched news text (a damaged
  manifest is reported by the report itself, naming the file)."""
  from pathlib import Path

  from cbd_jax.checkpoints import assets, manifest

  try:
    doc = manifest.load(Path(chain)) or {}
  except ValueError:
    doc = {}
  held = (doc.get("config") or {}).get("data", {}).get("heldout")
  if held and os.path.exists(str(held)):
    return str(held)
  return str(assets.english_text()["heldout"])


def main(argv=None) -> int:
  args = parse_args(argv)
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  from cbd_jax.chain import report

  try:
    text = args.text or _default_text(args.chain)
    result = report.chain_report(args.chain, text, args.eval_tokens, args.seq_len)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(report.format_report(result))
  return 0


if __name__ == "__main__":
  from cbd_jax import cli

  cli.run(main)
