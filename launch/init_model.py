"""Initialise a model of any size between two anchors of a finished chain, with no teacher.

  python launch/init_model.py --size=138m
  python launch/init_model.py --size=60m --anchors runs/a/anchors/anchor2,runs/a/anchors/anchor1 \
      --calib_text train.txt --text heldout.txt

theta_target = alpha * Grow(theta_small) + (1 - alpha) * Shrink(theta_large), written as a
Hugging Face folder (with the anchors' tokenizer) that ``transformers`` loads. By default
(``--method cbd``) units that only the large anchor has keep its function and contribute a share
gamma of it (1 - alpha unless calibrated), and the large anchor's layers, alpha, gamma and the
target's shape are calibrated on a few thousand tokens of training text (the chain's own by
default); ``--method paper`` is the plain formula.
"""

from __future__ import annotations

import argparse
import os
import sys

DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--size", required=True,
                 help="target parameter count: 138m, 220M, 1.2b or a plain number")
  p.add_argument("--chain", default="runs/smollm2_chain",
                 help="chain folder with chain.json; its two adjacent finished anchors that "
                      "bracket --size are used")
  p.add_argument("--anchors", default=None,
                 help="two Hugging Face folders 'DIR_A,DIR_B' to use instead of a chain")
  p.add_argument("--use_source", action="store_true",
                 help="also consider the chain's source model as the largest anchor")
  p.add_argument("--out", default=None,
                 help="output folder (default: <chain>/targets/<size>); an existing non-empty "
                      "folder is refused unless --overwrite; a chain's anchor or source never")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
  p.add_argument("--shape", default="auto", choices=("auto", "line", "large_width"),
                 help="target shape: on the line between the anchors' shapes (line), the large "
                      "anchor's width and attention with fewer layers and FFN neurons "
                      "(large_width), or those and, for anchors with attention narrower than "
                      "their stream, the large anchor's heads on the narrowest stream, keeping "
                      "the one with the lowest calibration loss "
                      "(auto; line when there is no calibration text)")
  p.add_argument("--method", default="cbd", choices=("cbd", "paper"),
                 help="cbd: units only the large anchor has keep its function, scaled by "
                      "gamma where they write; layers, alpha and gamma calibrated on --calib_text. "
                      "paper: the plain formula, alpha from parameter counts, even layers")
  p.add_argument("--alpha", type=float, default=None,
                 help="weight of the small anchor (default: calibrated with --method cbd, "
                      "(P_large - P_target) / (P_large - P_small) with --method paper)")
  p.add_argument("--layers", default="auto", choices=("auto", "even", "influence", "greedy"),
                 help="large-anchor layers kept besides the small anchor's counterparts: evenly "
                      "spread, most block influence, or block influence re-measured after each "
                      "drop; auto tries all three on --calib_text (cbd)")
  p.add_argument("--mix", default=None, choices=("output", "plain", "whole"),
                 help="where Grow only padded: scale what the large unit writes by 1 - alpha "
                      "(output), scale all its weights (plain), or take it whole; default: the "
                      "method's (cbd: output, paper: plain)")
  p.add_argument("--gamma", type=float, default=None,
                 help="with --mix output: the share of their output that units only the large "
                      "anchor has write, in [0, 1] (default: calibrated on --calib_text at the "
                      "calibrated alpha, 1 - alpha when alpha is given or there is no text)")
  p.add_argument("--calib_text", default=None,
                 help="unlabeled text to calibrate on: text, jsonl or parquet files or a hub "
                      "dataset, read as training data (default: the chain's training data, its "
                      "first batches); never the --text file")
  p.add_argument("--calib_tokens", type=int, default=2048, help="calibration tokens")
  p.add_argument("--text", default=None,
                 help="held-out plain-text file: perplexity of the target and both anchors")
  p.add_argument("--eval_tokens", type=int, default=8192,
                 help="tokens of --text to evaluate on")
  p.add_argument("--seq_len", type=int, default=None,
                 help="evaluation sequence length (default: 256, or a GPT-2 anchor's learned "
                      "positions when fewer; a longer one is refused)")
  p.add_argument("--shrink_method", default="leading", choices=("leading", "weight_norm"),
                 help="units kept from the large anchor beyond the small anchor's counterparts: "
                      "leading ones or largest weight norms (all units when --no_align_units)")
  p.add_argument("--grow_method", default="zero", choices=("zero", "net2net"),
                 help="new units of the grown small anchor: zeros or Net2Net copies")
  p.add_argument("--depth", default="zero", choices=("zero", "identity", "repeat"),
                 help="new layers of the grown small anchor: all-zero layers (identities), "
                      "identity layers (the layer before with zero o/down) or repeats")
  p.add_argument("--no_align_layers", action="store_true",
                 help="take evenly spaced layers of the large anchor instead of the counterparts "
                      "of the small anchor's layers")
  p.add_argument("--no_align_units", action="store_true",
                 help="mix units by index instead of first reordering the large anchor's "
                      "channels, FFN neurons and heads to line up with their counterparts in the "
                      "small anchor (only right when the small anchor kept leading units)")
  p.add_argument("--rescale_norms", default=None, action=argparse.BooleanOptionalAction,
                 help="scale the grown small anchor's norm scales by sqrt(D_small / D_target) so "
                      "that alpha = 1 is the small anchor exactly (default: on with --method "
                      "cbd, off with --method paper)")
  p.add_argument("--dtype", default=None, choices=DTYPES,
                 help="dtype of the written weights (default: the anchors' dtype)")
  args = p.parse_args(argv)
  if args.eval_tokens < 1:
    p.error(f"--eval_tokens={args.eval_tokens} must be >= 1")
  if args.seq_len is not None and args.seq_len < 1:
    p.error(f"--seq_len={args.seq_len} must be >= 1")
  if args.calib_tokens < 1:
    p.error(f"--calib_tokens={args.calib_tokens} must be >= 1")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  from cbd_jax.interpolation import calibrate, target

  try:
    recipe = calibrate.Recipe(
        method=args.method, alpha=args.alpha, gamma=args.gamma, layers=args.layers,
        mix=args.mix,
        shrink_method=args.shrink_method, grow_method=args.grow_method, depth=args.depth,
        align_layers=not args.no_align_layers, align_units=not args.no_align_units,
        rescale_norms=args.rescale_norms)
    target.init_target(
        args.size, chain=None if args.anchors else args.chain, anchors=args.anchors,
        out=args.out, recipe=recipe, text=args.text, calib_text=args.calib_text,
        calib_tokens=args.calib_tokens, eval_tokens=args.eval_tokens, seq_len=args.seq_len,
        dtype=args.dtype, overwrite=args.overwrite, use_source=args.use_source,
        shape=args.shape)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  from cbd_jax import cli

  cli.run(main)
