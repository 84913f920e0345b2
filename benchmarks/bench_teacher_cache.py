r"""The teacher cache against the live teacher: training speed and the anchor's quality.

  python benchmarks/bench_teacher_cache.py --part speed     # step time, alternating rounds
  python benchmarks/bench_teacher_cache.py --part quality   # link 0 of the default chain

speed: the default chain's first link (SmolLM2-135M teacher, 30 x 576, vocab 49,152; its ~70M
anchor, 24 x 384), batch 8 x 128, fp32, random weights: the live KD step (teacher forward +
student forward/backward) against the cached step (student only, top-k teacher from the batch)
for k = 64 and 256; rounds alternate, the median step time of each is reported.

quality: link 0 of configs/default.py trained three ways in this process on the same data and
budget: live (the default), from a cache with k = 64 and with k = 256; held-out KL to the teacher
and perplexity of each anchor (the driver's evaluation, on the same held-out batches). Workdirs
under runs/teacher_cache_bench/.

Both print a table and write benchmarks/results/teacher_cache_<part>.json with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def _args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--part", choices=("speed", "quality"), required=True)
  p.add_argument("--rounds", type=int, default=3, help="speed: alternating rounds")
  p.add_argument("--steps", type=int, default=3, help="speed: timed steps per round")
  p.add_argument("--ks", default="64,256", help="cache sizes k, comma-separated")
  return p.parse_args()


def _default_link0():
  from cbd_jax.checkpoints import assets, gguf_cache, hf_io
  from configs import default

  teacher = hf_io.load_model_config(gguf_cache.hf_folder(str(assets.smollm2_gguf())))
  return default.get_config(""), teacher, teacher.replace(**default.ANCHOR_80M, head_dim=64)


def speed(args) -> dict:
  import jax
  import numpy as np

  from cbd_jax.chain.source import init_host_params
  from cbd_jax.distill import teacher_cache
  from cbd_jax.distill.train_step import (
    LossSettings,
    make_init_state,
    make_optimizer,
    make_train_step,
  )
  from cbd_jax.model.sharding import make_mesh

  config, teacher, student = _default_link0()
  mesh, b, t = make_mesh({"data": -1}), 8, 128
  loss = LossSettings(chunk_size=2048)
  opt, _ = make_optimizer(1e-3, total_steps=100)
  t_params = jax.device_put(init_host_params(teacher, 0))
  tokens = np.random.default_rng(0).integers(0, 49152, (1, b, t + 1)).astype(np.int32)
  batch = {"ids": tokens[..., :-1], "labels": tokens[..., 1:], "mask": np.ones((1, b, t),
                                                                             np.float32)}
  variants = {"live": (make_train_step(student, teacher, opt, loss, mesh), t_params, batch)}
  for k in map(int, args.ks.split(",")):
    topk = teacher_cache.make_topk(teacher, k, 1.0, 2048, mesh, ())
    idx, logp, rest = jax.device_get(topk(t_params, batch["ids"]))
    variants[f"cached k={k}"] = (teacher_cache.make_cached_step(student, opt, loss, mesh, (),
                                                                None), None,
                                 dict(batch, t_idx=idx, t_logp=logp, t_rest=rest))
  init = make_init_state(student, opt, mesh)
  states = {name: init(init_host_params(student, 1)) for name in variants}
  times = {name: [] for name in variants}
  for name, (step, extra, b_) in variants.items():  # Compile, outside the timing.
    states[name], m = step(states[name], extra, b_)
    jax.block_until_ready(m)
  for _ in range(args.rounds):
    for name, (step, extra, b_) in variants.items():
      start = time.perf_counter()
      for _ in range(args.steps):
        states[name], m = step(states[name], extra, b_)
      jax.block_until_ready(m)
      times[name].append((time.perf_counter() - start) / args.steps)
  live = statistics.median(times["live"])
  rows = {name: {"step_s": statistics.median(ts), "tokens_per_s": b * t / statistics.median(ts),
                 "speedup_vs_live": live / statistics.median(ts)} for name, ts in times.items()}
  return {"rows": rows, "batch": [b, t], "rounds": args.rounds, "steps": args.steps}


def quality(args) -> dict:
  from cbd_jax.chain import driver

  rows = {}
  for k in [0, *map(int, args.ks.split(","))]:
    config, _, _ = _default_link0()
    name = "live" if not k else f"cached k={k}"
    config.workdir = str(ROOT / "runs" / "teacher_cache_bench" / ("live" if not k else f"k{k}"))
    config.chain = (config.chain[0],)
    config.chain[0].teacher_cache.k = k
    config.log.progress = False
    start = time.time()
    entry = driver.run_chain(config)["anchors"][0]
    ev = entry["eval"]
    rows[name] = {"kl": ev["kl"], "ppl": ev["ppl"], "teacher_ppl": ev["teacher_ppl"],
                  "seconds_this_run": time.time() - start, "tokens": entry["tokens"]}
    print(f"{name}: {rows[name]}", flush=True)
  return {"rows": rows, "link": "configs/default.py chain[0] (smollm2-80m)"}


def main():
  args = _args()
  load_before = os.getloadavg()
  result = (speed if args.part == "speed" else quality)(args)
  result.update(part=args.part, load_avg_before=load_before, load_avg_after=os.getloadavg(),
                machine=f"{os.cpu_count()} CPU cores")
  print(f"{'variant':<14} " + " ".join(f"{k:>16}" for k in next(iter(result['rows'].values()))))
  for name, row in result["rows"].items():
    print(f"{name:<14} " + " ".join(f"{v:>16.4g}" for v in row.values()))
  print(f"load average before {load_before}, after {result['load_avg_after']}")
  RESULTS.mkdir(parents=True, exist_ok=True)
  out = RESULTS / f"teacher_cache_{args.part}.json"
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
