"""How well the FFN neurons of two anchors line up, before and after `align.align_units`.

For each small-anchor layer and its counterpart layer in the large anchor: the mean cosine
similarity of each small neuron to its best-matching large neuron, to the large neuron at the
same index, and to the same index after alignment (gate/up rows and down columns compared).

  python benchmarks/anchor_alignment.py          # the default chain's two anchors
  python benchmarks/anchor_alignment.py --small DIR --large DIR

Writes benchmarks/results/anchor_alignment.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cbd_jax.checkpoints import hf_io
from cbd_jax.interpolation import align
from cbd_jax.model import layout

RESULTS = Path(__file__).resolve().parent / "results" / "anchor_alignment.json"


def neuron_similarity(small, large, layer_s: int, layer_l: int) -> np.ndarray:
  """[F_small, F_large] cosine similarity of the FFN neurons of two layers."""
  (small_config, small_params), (large_config, large_params) = small, large
  channels = min(small_config.hidden_size, large_config.hidden_size)
  s = align._layer_slices(small_config, layout.flatten(small_params), layer_s, channels)["F"]
  l_ = align._layer_slices(large_config, layout.flatten(large_params), layer_l, channels)["F"]
  return align._features(s, l_)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--small", default="runs/smollm2_chain/anchors/smollm2-34m")
  p.add_argument("--large", default="runs/smollm2_chain/anchors/smollm2-80m")
  p.add_argument("--out", default=str(RESULTS))
  args = p.parse_args(argv)
  small, large = hf_io.load_hf_numpy(args.small), hf_io.load_hf_numpy(args.large)
  aligned = (large[0], align.align_units(*small, *large))
  counterparts = align.depth_counterparts(*small, *large)
  rows = []
  print(f"{'small layer':>11} {'large layer':>11} {'best match':>10} {'same index':>10} "
        f"{'aligned':>8}")
  for j, b in enumerate(counterparts):
    before, after = neuron_similarity(small, large, j, b), neuron_similarity(small, aligned, j, b)
    row = {"small_layer": j, "large_layer": int(b), "best_match": float(before.max(1).mean()),
           "same_index": float(np.diag(before).mean()),
           "same_index_aligned": float(np.diag(after).mean())}
    rows.append(row)
    print(f"{j:>11} {b:>11} {row['best_match']:>10.4f} {row['same_index']:>10.4f} "
          f"{row['same_index_aligned']:>8.4f}")
  result = {"small": args.small, "large": args.large, "layers": rows}
  Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
