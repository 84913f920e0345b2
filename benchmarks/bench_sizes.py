r"""Targets of every size between a chain's anchors, at zero training steps.

For each pair of adjacent finished anchors of a chain, a grid of sizes strictly between them
(evenly spaced in parameters), and at each size the held-out perplexity of:

  cbd         the default of launch/init_model.py (calibrated on the chain's training text; its
              shape, on the line between the anchors or the large anchor's width with fewer
              layers and FFN neurons, chosen there too, so it may differ from the others')
  paper       the paper's formula: alpha from parameter counts, every padded weight * (1 - alpha)
  grow        Grow of the small anchor alone (its function, on the line's shape)
  shrink      Shrink of the large anchor alone (evenly spaced layers, leading units)
  random      random initialisation

beside the anchors themselves. Held-out text: news prose (another source than the training
text), read after the first ``--skip_tokens`` tokens, so the figures are not on the text the method
was developed on. Calibration reads only the chain's training text. No teacher is called.

  python benchmarks/bench_sizes.py                              # runs/smollm2_chain, 7 sizes
  python benchmarks/bench_sizes.py --chain /tmp/claim/chain --points 9 --out /tmp/sizes

Writes <out>/sizes_<chain>.json and <out>/sizes_<chain>.png (default out: benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
METHODS = ("cbd", "paper", "grow", "shrink", "random")


def anchors_of(chain_dir: Path) -> list[tuple[str, Path]]:
  """[(name, folder)] of the chain's finished anchors, smallest first."""
  from cbd_jax.checkpoints import manifest

  done = sorted(manifest.done_anchors(manifest.read(chain_dir)), key=lambda a: a["num_params"])
  return [(a["name"], chain_dir / a["path"]) for a in done]


def grid(small_cfg, large_cfg, points: int) -> list:
  """Target configs at ``points`` sizes evenly spaced strictly between the anchors (distinct)."""
  from cbd_jax.interpolation import sizing
  from cbd_jax.model.config import num_params

  p_s, p_l = num_params(small_cfg), num_params(large_cfg)
  configs = {}
  for k in range(1, points + 1):
    config = sizing.resolve_size(p_s + k * (p_l - p_s) // (points + 1), small_cfg, large_cfg)
    configs.setdefault(num_params(config), config)
  return [configs[p] for p in sorted(configs)]


def initialisations(small, large, target, calib_rows, log) -> dict:
  """({method: host params} for every method of `METHODS`, info): "cbd" is init_model's default
  (its shape chosen by `calibrate.make_sized_target` among ``target``, on the line between the
  anchors, and the large anchor's width; ``info["shape"]``), every other method on ``target``."""
  import jax
  import numpy as np

  from cbd_jax.chain import source as source_mod
  from cbd_jax.interpolation import calibrate, resize, sizing
  from cbd_jax.model.config import num_params

  shapes = sizing.target_shapes(num_params(target), small[0], large[0])
  shape, cbd, info = calibrate.make_sized_target(small, large, shapes, calibrate.Recipe(),
                                                 calib_rows, log)
  info["shape"] = shape
  paper, _ = calibrate.make_target(small, large, target, calibrate.Recipe(method="paper"),
                                   None, log=lambda _: None)
  grown = resize.grow(*small, target, method="zero", depth="identity", rescale_norms=True)
  shrunk = resize.shrink(*large, target)
  host = lambda p: jax.tree.map(np.asarray, p)  # noqa: E731
  return {"cbd": host(cbd), "paper": host(paper), "grow": host(grown), "shrink": host(shrunk),
          "random": source_mod.init_host_params(target, 0)}, info


def run(args) -> dict:
  from cbd_jax.checkpoints import hf_io, manifest
  from cbd_jax.data import calibration
  from cbd_jax.evaluation import heldout
  from cbd_jax.interpolation import sizing
  from cbd_jax.model.config import num_params

  chain_dir = Path(args.chain)
  pairs = anchors_of(chain_dir)
  if len(pairs) < 2:
    raise SystemExit(f"{chain_dir}: fewer than two finished anchors; build the chain first")
  calib_source = calibration.of_chain(chain_dir, manifest.read(chain_dir), [pairs[0][0]])
  if calib_source is None:
    raise SystemExit(f"{chain_dir}: the manifest records no training data; no calibration text")
  text = Path(args.text) if args.text else None
  if text is None:
    from cbd_jax.checkpoints import assets
    text = assets.english_text()["heldout"]
  tokenizer = hf_io.load_tokenizer(str(pairs[0][1]))
  rows = heldout.load_token_rows(tokenizer, text, args.eval_tokens, args.seq_len,
                                 args.skip_tokens)
  calib = calibration.load_rows(calib_source, tokenizer, args.calib_tokens)
  ppl = lambda cfg, p: math.exp(min(heldout.mean_nll(cfg, p, rows), 50.0))  # noqa: E731
  models = {name: hf_io.load_hf_numpy(path) for name, path in pairs}
  anchors = [{"name": n, "num_params": num_params(models[n][0]), "ppl": ppl(*models[n]),
              "shape": sizing.describe(models[n][0])} for n, _ in pairs]
  for a in anchors:
    print(f"anchor {a['name']}: {a['shape']}: perplexity {a['ppl']:,.1f}", flush=True)
  sizes = []
  for (s_name, _), (l_name, _) in zip(pairs, pairs[1:], strict=False):
    small, large = models[s_name], models[l_name]
    for target in grid(small[0], large[0], args.points):
      start = time.time()
      inits, info = initialisations(small, large, target, calib, log=lambda _: None)
      cbd_shape = info["shape"]
      row = {"small": s_name, "large": l_name, "num_params": num_params(target),
             "shape": f"{target.num_layers} x {target.hidden_size}",
             "cbd_shape": sizing.describe(cbd_shape), "cbd_num_params": num_params(cbd_shape),
             "alpha": info["alpha"], "gamma": info.get("gamma"),
             "layers": info.get("layer_choice"),
             "ppl": {m: ppl(cbd_shape if m == "cbd" else target, p) for m, p in inits.items()},
             "seconds": round(time.time() - start, 1)}
      sizes.append(row)
      print(f"{sizing.format_count(row['num_params']):>7} {row['shape']:>9} (cbd: "
            f"{row['cbd_shape']}) alpha "
            f"{row['alpha']:.3f} {row['layers']:>9}: " + "  ".join(
                f"{m} {v:,.1f}" for m, v in row["ppl"].items()) + f"  ({row['seconds']} s)",
            flush=True)
  return {"chain": str(chain_dir), "heldout": {"file": str(text), "tokens": int(
      rows[:, 1:].size), "skip_tokens": args.skip_tokens}, "calibration": {
          "file": calib_source.name, "tokens": int(calib[:, 1:].size)},
          "anchors": anchors, "sizes": sizes, "goal": goal(anchors, sizes),
          "machine": f"{platform.node()} ({os.cpu_count()} CPUs), load {os.getloadavg()[0]:.1f}"}


def goal(anchors: list, sizes: list) -> dict:
  """Per size: the default no worse than the worse anchor, and better than the small one above
  the midpoint in parameters; and whether perplexity falls with size at every step from the
  small anchor through the grid to the large anchor (strictly: a flat stretch is not falling)."""
  by_name = {a["name"]: a for a in anchors}
  checks = []
  for row in sizes:
    s, big = by_name[row["small"]], by_name[row["large"]]
    worse = max(s["ppl"], big["ppl"])
    above_mid = row["num_params"] > (s["num_params"] + big["num_params"]) / 2
    ok = row["ppl"]["cbd"] <= worse and (not above_mid or row["ppl"]["cbd"] < s["ppl"])
    checks.append({"num_params": row["num_params"], "ok": ok, "above_midpoint": above_mid})
  falls = True
  for pair in {(row["small"], row["large"]) for row in sizes}:
    curve = ([by_name[pair[0]]["ppl"]] + [r["ppl"]["cbd"] for r in sizes
                                          if (r["small"], r["large"]) == pair]
             + [by_name[pair[1]]["ppl"]])
    falls &= all(b < a for a, b in zip(curve, curve[1:], strict=False))
  return {"all_ok": all(c["ok"] for c in checks), "sizes": checks, "falls": falls}


def plot(result: dict, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  params = [r["num_params"] / 1e6 for r in result["sizes"]]
  for method in METHODS[:-1]:
    ax.plot(params, [r["ppl"][method] for r in result["sizes"]], marker="o", label=method)
  ax.scatter([a["num_params"] / 1e6 for a in result["anchors"]],
             [a["ppl"] for a in result["anchors"]], marker="*", s=160, c="k", label="anchors",
             zorder=5)
  ax.set_yscale("log")
  ax.set_xlabel("parameters (M)")
  ax.set_ylabel("held-out perplexity, 0 training steps")
  ax.set_title(f"Targets between anchors ({Path(result['chain']).name})")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def print_table(result: dict) -> None:
  print("\n| params | shape | cbd's shape | alpha | layers | " + " | ".join(METHODS) + " |")
  print("|---:|---|---|---:|---|" + "---:|" * len(METHODS))
  for r in result["sizes"]:
    print(f"| {r['num_params'] / 1e6:.1f}M | {r['shape']} | {r['cbd_shape']} | {r['alpha']:.3f} "
          f"| {r['layers']} | "
          + " | ".join(f"{r['ppl'][m]:,.1f}" for m in METHODS) + " |")
  anchors = ", ".join(f"{a['name']} {a['ppl']:,.1f}" for a in result["anchors"])
  print(f"\nanchors: {anchors}; goal met at every size: {result['goal']['all_ok']}; "
        f"falls with size at every step: {result['goal']['falls']}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--chain", default="runs/smollm2_chain", help="finished chain folder")
  p.add_argument("--points", type=int, default=7, help="sizes between each pair of anchors")
  p.add_argument("--text", default=None, help="held-out text (default: the fetched news text)")
  p.add_argument("--skip_tokens", type=int, default=8192,
                 help="held-out tokens skipped first (the method was developed on them)")
  p.add_argument("--eval_tokens", type=int, default=8192, help="held-out tokens scored")
  p.add_argument("--seq_len", type=int, default=128, help="held-out row length")
  p.add_argument("--calib_tokens", type=int, default=2048, help="calibration tokens")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  args = p.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  result = run(args)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = f"sizes_{Path(args.chain).name}"
  (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
  plot(result, out / f"{stem}.png")
  print_table(result)
  print(f"wrote {out / stem}.json and .png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
