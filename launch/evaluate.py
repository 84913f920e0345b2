"""Evaluate a model on standard tasks with lm-evaluation-harness, run by the JAX model.

  python launch/evaluate.py --model=runs/gpt2_chain/targets/138m --tasks=hellaswag
  python launch/evaluate.py --model=DIR --tasks=hellaswag,arc_easy --num_fewshot=0 --limit=200
  python launch/evaluate.py --model=DIR --tasks=cbd_news_next --include_path=tasks/

Writes lm-eval's results JSON beside the model (``DIR/lm_eval/results.json``, or ``--output``)
and prints lm-eval's table. Needs the ``eval`` extra: ``pip install -e ".[eval]"``.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--model", required=True,
                 help="Hugging Face folder (an anchor, an init_model target, any supported "
                      "checkpoint), hub id or .gguf file")
  p.add_argument("--tasks", required=True,
                 help="comma-separated lm-eval task names, e.g. hellaswag,arc_easy")
  p.add_argument("--num_fewshot", type=int, default=None,
                 help="few-shot examples per prompt (default: each task's own)")
  p.add_argument("--limit", type=float, default=None,
                 help="examples per task (a fraction when below 1); for quick checks only")
  p.add_argument("--include_path", default=None,
                 help="folder of extra task YAML files (local tasks)")
  p.add_argument("--batch_size", type=int, default=16,
                 help="sequences per forward pass (rounded up to a multiple of the devices)")
  p.add_argument("--max_length", type=int, default=None,
                 help="context length (default: the model's max_position_embeddings)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="weights and compute dtype")
  p.add_argument("--fsdp", type=int, default=1,
                 help="devices that shard the weights (the others split the batch)")
  p.add_argument("--output", default=None,
                 help="results JSON path (default: MODEL/lm_eval/results.json)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)  # Standard tasks fetch their data from the hub: not forced offline.
  try:
    from lm_eval.utils import make_table

    from cbd_jax.evaluation import harness
  except ImportError as e:
    print(f"error: {e.name or e} is not installed; run pip install -e '.[eval]'", file=sys.stderr)
    return 2
  try:
    results = harness.evaluate_model(
        args.model, args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
        include_path=args.include_path, batch_size=args.batch_size, output=args.output,
        max_length=args.max_length, dtype=args.dtype, fsdp=args.fsdp)
  except (ValueError, FileNotFoundError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(make_table(results))
  print(f"results: {args.output or harness.results_path(args.model)}")
  return 0


if __name__ == "__main__":
  from cbd_jax import cli

  cli.run(main)
