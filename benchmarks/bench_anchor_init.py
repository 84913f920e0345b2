r"""How a chain link's student starts: held-out perplexity at 0 steps and after the link's budget.

For one link of a chain config (default: link 0 of configs/default.py, SmolLM2-135M -> the 80M
anchor), the same link is run once per initialisation, with the same KD tokens, learning rate and
data order:

  weight_norm          units of largest weight norm, evenly spaced layers (the earlier default)
  activation_even      units ranked by activations on the link's training rows, even layers
  activation_raw       activation units, greedy block-influence layers, norms not rescaled
  activation           activation units, greedy layers, norms rescaled (the default)
  activation_refit     the default, then o/down refit by least squares where units were cut
  random               random init: the control for "the init carried the teacher's knowledge"

beside the unigram and bigram counts of the training text (the control for "the model learned
more than counts"). Held-out text: news prose (another source than the training text) read after
the first ``--skip_tokens`` tokens, so not the tokens `launch/report.py` shows for the demo.

  python benchmarks/bench_anchor_init.py                                 # link 0 of the default
  python benchmarks/bench_anchor_init.py --inits activation,random --out /tmp/ai
  python benchmarks/bench_anchor_init.py --link 1 --teacher runs/smollm2_chain/anchors/smollm2-80m

Writes <out>/anchor_init<suffix>.json and .png (training KD loss against tokens, per init).
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
INITS = {  # name: (shrink, shrink_layers, shrink_rescale, shrink_refit)
    "weight_norm": ("weight_norm", "even", False, False),
    "activation_even": ("activation", "even", True, False),
    "activation_raw": ("activation", "greedy", False, False),
    "activation": ("activation", "greedy", True, False),
    "activation_refit": ("activation", "greedy", True, True),
    "random": ("random", "even", False, False),
}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--config", default=str(ROOT / "configs" / "default.py"),
                 help="chain config file (any --config.FIELD=VALUE after it applies)")
  p.add_argument("--link", type=int, default=0, help="index of the link in config.chain")
  p.add_argument("--teacher", default="",
                 help="the link's teacher folder (needed for --link > 0: a finished anchor)")
  p.add_argument("--inits", default=",".join(INITS), help=f"comma-separated, of {list(INITS)}")
  p.add_argument("--tokens", type=int, default=0, help="KD tokens per run (0: the link's budget)")
  p.add_argument("--eval_tokens", type=int, default=8192, help="held-out tokens")
  p.add_argument("--skip_tokens", type=int, default=8192, help="held-out tokens skipped first")
  p.add_argument("--seq_len", type=int, default=128, help="held-out row length")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="output folder")
  p.add_argument("--workdir", default="/tmp/bench_anchor_init", help="where the runs go")
  p.add_argument("--suffix", default="", help="appended to the output file names")
  args, rest = p.parse_known_args(argv)
  args.overrides = [a[len("--config."):] for a in rest if a.startswith("--config.")]
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    p.error(f"unknown arguments {unknown}")
  bad = set(args.inits.split(",")) - set(INITS)
  if bad:
    p.error(f"unknown inits {sorted(bad)}; use {list(INITS)}")
  return args


def link_config(args, init: str):
  """The chain config with only the benchmarked link, started by ``init``, in its own workdir."""
  from cbd_jax import cli

  config = cli.load_config(args.config, args.overrides, lock=False)
  link = config.chain[args.link]
  link.shrink, link.shrink_layers, link.shrink_rescale, link.shrink_refit = INITS[init]
  if args.tokens:
    link.tokens = args.tokens
  if args.link > 0:
    if not args.teacher:
      raise SystemExit("--link > 0 needs --teacher (the finished anchor before the link)")
    config.source.path = args.teacher
  config.chain = (link,)
  config.workdir = str(Path(args.workdir) / init)
  config.log.progress = False
  return config


def zero_step(config, rows) -> tuple[float, float]:
  """(held-out perplexity of the link's student as it starts, seconds to make it)."""
  from cbd_jax.chain import driver, source
  from cbd_jax.evaluation import heldout

  source_path, tokenizer_path = source.prepare_source(config)
  strategy = driver.make_strategy(config, 0, Path(config.workdir), {"path": "anchors/x"},
                                  source_path, tokenizer_path)
  start = time.time()
  s_config, params = strategy.new_student()
  seconds = time.time() - start
  return math.exp(min(heldout.mean_nll(s_config, params, rows), 50.0)), seconds


def curve(workdir: Path, name: str, tokens_per_step: int) -> list[tuple[int, float]]:
  """(tokens, training KD loss) of every logged window of a link."""
  out = []
  for line in (workdir / "metrics" / f"{name}.jsonl").read_text().splitlines():
    row = json.loads(line)
    if "train/kd" in row:
      out.append((row["step"] * tokens_per_step, row["train/kd"]))
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import cbd_jax
  from cbd_jax.chain import driver
  from cbd_jax.checkpoints import assets, hf_io
  from cbd_jax.evaluation import baselines, heldout

  inits = args.inits.split(",")
  results, teacher_ppl = {}, None
  for init in inits:
    config = link_config(args, init)
    link = config.chain[0]
    tokenizer = hf_io.load_tokenizer(config.source.get("tokenizer") or config.source.path)
    text = heldout.load_heldout(tokenizer, assets.english_text()["heldout"], args.eval_tokens,
                                args.seq_len, args.skip_tokens)
    if teacher_ppl is None:
      t_config, t_params = cbd_jax.load_hf(config.source.path)
      teacher_ppl = heldout.evaluate(t_config, t_params, text)["ppl"]
      print(f"teacher {config.source.path}: held-out ppl {teacher_ppl:.2f}", flush=True)
    ppl0, init_s = zero_step(config, text.rows)
    start = time.time()
    doc = driver.run_chain(config)
    train_s = time.time() - start
    entry = doc["anchors"][0]
    s_config, params = cbd_jax.load_hf(str(Path(config.workdir) / entry["path"]))
    final = heldout.evaluate(s_config, params, text)
    per_step = link.batch_size * link.microbatches * link.seq_len
    results[init] = {"shrink": INITS[init], "ppl_0": ppl0, "ppl_end": final["ppl"],
                     "bpb_end": final["bpb"], "tokens": entry["tokens"], "init_s": init_s,
                     "run_s": train_s, "num_params": entry["num_params"],
                     "curve": curve(Path(config.workdir), link.name, per_step)}
    print(f"{init:>16}: held-out ppl {ppl0:,.1f} at 0 steps -> {final['ppl']:,.1f} after "
          f"{entry['tokens']:,} tokens (init {init_s:.0f} s, run {train_s:.0f} s)", flush=True)
  rows = baselines.training_rows(config.data, tokenizer, link.seq_len,
                                 Path(args.workdir) / "data_cache")
  counts = baselines.evaluate(baselines.fit(rows, len(tokenizer)), text.rows, text.byte_lengths)
  table = [f"{'init':>16} {'ppl at 0':>12} {'ppl after':>10} {'bits/byte':>9}"]
  table += [f"{k:>16} {r['ppl_0']:>12,.1f} {r['ppl_end']:>10,.1f} {r['bpb_end']:>9.3f}"
            for k, r in results.items()]
  table += [f"{k + ' counts':>16} {'':>12} {v['ppl']:>10,.1f} {v['bpb']:>9.3f}"
            for k, v in counts.items()]
  print(f"\nlink {link.name}: {results[inits[0]]['num_params']:,} params, teacher held-out ppl "
        f"{teacher_ppl:.2f}, {args.eval_tokens} news tokens after {args.skip_tokens}")
  print("\n".join(table))
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = out / f"anchor_init{args.suffix}"
  doc = {"link": link.to_dict(), "teacher": str(config.source.path), "teacher_ppl": teacher_ppl,
         "heldout": {"tokens": text.tokens, "skip_tokens": args.skip_tokens},
         "results": results, "counts": counts,
         "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                     "load_average": os.getloadavg()}}
  stem.with_suffix(".json").write_text(json.dumps(doc, indent=2, default=float) + "\n")
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
      xs, ys = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
      ax.plot(xs, ys, marker="o", ms=3, label=f"{name} ({r['ppl_end']:,.0f})")
    ax.set_xlabel("KD tokens")
    ax.set_ylabel("training KD loss (nats)")
    ax.set_yscale("log")
    ax.set_title(f"link {link.name}: student start (held-out ppl after the link)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
  except ImportError:
    print("matplotlib not installed: no PNG")
  print(f"wrote {stem.with_suffix('.json')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
