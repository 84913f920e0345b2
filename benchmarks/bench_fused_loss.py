"""Fused vs naive KD loss and gradient: peak memory and time at a Qwen-size vocabulary.

    python benchmarks/bench_fused_loss.py --tokens 4096 --time-tokens 2048     # CPU, 24 GB
    python benchmarks/bench_fused_loss.py --tokens 32768 --repeats 10        # one GPU

Every variant computes sum_t KL(p_t || q_t) with p, q from hidden [1, tokens, D] @ head^T [D, V]
and its gradient w.r.t. the student's hidden states and head. Variants: ``naive`` (whole logits)
and ``fused`` (``cbd_jax.distill.fused_loss``; ``fused:512`` picks a chunk size).

Memory: each variant runs once in its own subprocess (same shapes, same inputs), reporting
  - XLA's compiled memory analysis: temp + output bytes (what the step allocates beyond its
    inputs; the inputs, 2 heads and 2 hidden states, are the same for every variant),
  - the device's peak bytes in use where the backend reports it (GPU/TPU), and the process's
    peak resident memory growth (ru_maxrss minus resident memory before compiling).
Time: one more subprocess compiles every variant and runs them in turn (naive, fused, naive,
fused, ...) ``--repeats`` times after a warm-up, so a shared machine's load hits them alike;
the median per variant is reported (on ``--time-tokens`` tokens, default ``--tokens``).
Prints a table with fused / naive ratios and writes benchmarks/results/fused_loss.json.
Targets: fused peak memory <= 1/8 of naive, fused time <= 1.3x naive.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "fused_loss.json"


def _parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", type=int, default=4096, help="batch * seq tokens")
  ap.add_argument("--time-tokens", type=int, default=None,
                  help="tokens for the timing phase (default --tokens); it holds every variant "
                       "at once, so a small shared machine may need fewer")
  ap.add_argument("--vocab", type=int, default=151_936)
  ap.add_argument("--dim", type=int, default=896, help="student hidden size")
  ap.add_argument("--teacher-dim", type=int, default=896)
  ap.add_argument("--chunk-size", type=int, default=256, help="fused: tokens per chunk")
  ap.add_argument("--kind", default="fkl")
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--variants", default="naive,fused", help="naive, fused or fused:CHUNK")
  ap.add_argument("--skip-memory", action="store_true", help="time only")
  ap.add_argument("--analysis-only", action="store_true",
                  help="memory phase compiles without running: XLA figures only, no RSS")
  ap.add_argument("--out", type=Path, default=RESULTS)
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  return ap.parse_args(argv)


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _inputs(args, n: int):
  import jax
  import jax.numpy as jnp

  dt = jnp.dtype(args.dtype)
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  v, d, d_t = args.vocab, args.dim, args.teacher_dim
  hs = jax.random.normal(ks[0], (1, n, d), dt)
  ws = (0.05 * jax.random.normal(ks[1], (v, d))).astype(dt)
  ht = jax.random.normal(ks[2], (1, n, d_t), dt)
  wt = (0.05 * jax.random.normal(ks[3], (v, d_t))).astype(dt)
  return jax.block_until_ready((hs, ws, ht, wt))


def _step(variant: str, args):
  """jit(value_and_grad) of one variant's loss w.r.t. student hidden and head."""
  import jax
  import jax.numpy as jnp

  from cbd_jax.distill import fused_loss, losses

  name, _, chunk = variant.partition(":")
  if name == "naive":
    def loss(hs, ws, ht, wt):
      zs = jnp.einsum("btd,vd->btv", hs, ws, preferred_element_type=jnp.float32)
      zt = jnp.einsum("btd,vd->btv", ht, wt, preferred_element_type=jnp.float32)
      return losses.kd_loss_sum(zs, zt, args.kind)[0]
  elif name == "fused":
    chunk_size = int(chunk or args.chunk_size)

    def loss(hs, ws, ht, wt):
      return fused_loss.fused_kd_loss(hs, ws, ht, wt, args.kind, chunk_size=chunk_size)[0]
  else:
    raise SystemExit(f"unknown variant {variant!r}; use naive, fused or fused:CHUNK")
  return jax.jit(jax.value_and_grad(loss, (0, 1)))


def _memory_worker(args) -> dict:
  """Compiles and runs one variant once; returns memory figures."""
  import jax
  import jax.numpy as jnp

  inputs = _inputs(args, args.tokens)
  rss_before = _rss_bytes()
  compiled = _step(args.worker, args).lower(*inputs).compile()
  mem = compiled.memory_analysis()
  dev = jax.devices()[0]
  result = {
      "device": f"{dev.platform}: {dev.device_kind}",
      "xla_temp_bytes": int(mem.temp_size_in_bytes),
      "xla_output_bytes": int(mem.output_size_in_bytes),
      "xla_argument_bytes": int(mem.argument_size_in_bytes),
      "xla_peak_bytes": int(mem.temp_size_in_bytes + mem.output_size_in_bytes),
      "device_peak_bytes": None, "rss_growth_bytes": None,
  }
  if args.analysis_only:
    return result
  t0 = time.perf_counter()
  out = jax.block_until_ready(compiled(*inputs))
  result["first_run_s"] = time.perf_counter() - t0
  stats = dev.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    result["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  result.update(rss_growth_bytes=int(peak_rss - rss_before), loss=float(out[0]),
                grad_head_norm=float(jnp.linalg.norm(out[1][1].astype(jnp.float32))))
  return result


def _time_worker(args) -> dict:
  """Compiles every variant, then runs them in turn; returns each one's run times."""
  import jax

  variants = args.variants.split(",")
  inputs = _inputs(args, args.time_tokens or args.tokens)
  compiled = {v: _step(v, args).lower(*inputs).compile() for v in variants}
  for v in variants:  # warm-up
    jax.block_until_ready(compiled[v](*inputs))
  times = {v: [] for v in variants}
  for _ in range(args.repeats):
    for v in variants:
      t0 = time.perf_counter()
      jax.block_until_ready(compiled[v](*inputs))
      times[v].append(time.perf_counter() - t0)
  dev = jax.devices()[0]
  return {v: {"device": f"{dev.platform}: {dev.device_kind}", "times_s": t,
              "median_s": statistics.median(t)} for v, t in times.items()}


def _run_worker(worker: str, argv: list[str]) -> dict:
  proc = subprocess.run([sys.executable, __file__, *argv, "--worker", worker],
                        capture_output=True, text=True)
  if proc.returncode != 0:
    return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _gib(x) -> str:
  return f"{'-':>9s}" if x is None else f"{x / 2**30:9.3f}"


def main(argv=None):
  args = _parse(argv)
  if args.worker:
    result = _time_worker(args) if args.worker == "time" else _memory_worker(args)
    print(json.dumps(result))
    return 0
  forwarded = list(argv if argv is not None else sys.argv[1:])
  variants = args.variants.split(",")
  rows = {v: {} if args.skip_memory else _run_worker(v, forwarded) for v in variants}
  timing = _run_worker("time", forwarded)
  for v in variants:
    rows[v].update(timing.get(v, {"error": timing.get("error", "no timing")}))
  failed = {v: r["error"] for v, r in rows.items() if "error" in r}
  if failed:
    print(f"variant(s) failed: {failed}", file=sys.stderr)
  device = next((r["device"] for r in rows.values() if "device" in r), "unknown")
  print(f"KD ({args.kind}) loss + grad w.r.t. student hidden and head: tokens={args.tokens} "
        f"(timing: {args.time_tokens or args.tokens}) V={args.vocab} D={args.dim} "
        f"dtype={args.dtype} chunk={args.chunk_size} on {device}")
  cols = ("xla_peak_bytes", "xla_temp_bytes", "device_peak_bytes", "rss_growth_bytes")
  print(f"{'variant':12s}{'xla peak':>9s}{'xla temp':>9s}{'dev peak':>9s}{'rss grow':>9s}  "
        f"(GiB){'median s':>10s}")
  for v, r in rows.items():
    if "error" not in r:
      print(f"{v:12s}" + "".join(_gib(r.get(c)) for c in cols) + f"{r['median_s']:15.3f}")
  ratios = {}
  base = rows.get("naive", {})
  for v, r in rows.items():
    if v == "naive" or "error" in r or "error" in base:
      continue
    ratio = {"time": r["median_s"] / base["median_s"]}
    if not args.skip_memory:
      ratio.update(memory_xla_peak=r["xla_peak_bytes"] / base["xla_peak_bytes"],
                   memory_xla_temp=r["xla_temp_bytes"] / base["xla_temp_bytes"])
      if base.get("rss_growth_bytes") and r.get("rss_growth_bytes"):
        ratio["memory_rss_growth"] = r["rss_growth_bytes"] / base["rss_growth_bytes"]
      if "loss" in base and "loss" in r:
        ratio["loss_rel_diff"] = abs(r["loss"] - base["loss"]) / abs(base["loss"])
      if base.get("device_peak_bytes") and r.get("device_peak_bytes"):
        ratio["memory_device_peak"] = r["device_peak_bytes"] / base["device_peak_bytes"]
    ratios[v] = ratio
    print(f"{v} / naive: " + ", ".join(f"{k} {x:.4g}" for k, x in ratio.items()))
    verdict = lambda ok: "met" if ok else "MISSED"
    mem = ratio.get("memory_xla_peak")
    mem_text = "not measured" if mem is None else verdict(mem <= 0.125)
    print(f"  targets: memory <= 0.125 ({mem_text}), time <= 1.3 ({verdict(ratio['time'] <= 1.3)})")
  config = {k: (str(x) if isinstance(x, Path) else x) for k, x in vars(args).items()
            if k != "worker"}
  result = {"config": config, "device": device, "load_avg_after": os.getloadavg(),
            "variants": rows, "ratios": ratios}
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {args.out}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
