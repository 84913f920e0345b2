"""Fused vs naive KD loss and gradient: peak memory and time at a Qwen-size vocabulary.

    python benchmarks/bench_fused_loss.py --tokens 2048            # CPU
    python benchmarks/bench_fused_loss.py --tokens 32768 --repeats 10   # one GPU

Both variants compute sum_t KL(p_t || q_t) with p, q from hidden [1, tokens, D] @ head^T [D, V]
and its gradient w.r.t. the student's hidden states and head. Each variant runs in its own
subprocess (same shapes, same inputs), which reports
  - XLA's compiled memory analysis: temp + output bytes (what the step allocates beyond its
    inputs; the inputs, 2 heads and 2 hidden states, are the same for both and listed apart),
  - the device's peak bytes in use where the backend reports it (GPU/TPU), else the process's
    peak resident memory (ru_maxrss) minus its resident memory before compiling,
  - the median wall time of ``--repeats`` runs after one warm-up run.
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
  ap.add_argument("--tokens", type=int, default=2048, help="batch * seq tokens")
  ap.add_argument("--vocab", type=int, default=151_936)
  ap.add_argument("--dim", type=int, default=896, help="student hidden size")
  ap.add_argument("--teacher-dim", type=int, default=896)
  ap.add_argument("--chunk-size", type=int, default=1024, help="fused: tokens per chunk")
  ap.add_argument("--kind", default="fkl")
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--variants", default="naive,fused")
  ap.add_argument("--out", type=Path, default=RESULTS)
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  return ap.parse_args(argv)


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(args) -> dict:
  """Runs one variant in this process and returns its measurements."""
  import jax
  import jax.numpy as jnp

  from cbd_jax import fused_loss, losses

  dt = jnp.dtype(args.dtype)
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  n, v, d, dt_t = args.tokens, args.vocab, args.dim, args.teacher_dim
  hs = jax.random.normal(ks[0], (1, n, d), dt)
  ws = (0.05 * jax.random.normal(ks[1], (v, d))).astype(dt)
  ht = jax.random.normal(ks[2], (1, n, dt_t), dt)
  wt = (0.05 * jax.random.normal(ks[3], (v, dt_t))).astype(dt)

  if args.worker == "naive":
    def loss(hs, ws, ht, wt):
      zs = jnp.einsum("btd,vd->btv", hs, ws, preferred_element_type=jnp.float32)
      zt = jnp.einsum("btd,vd->btv", ht, wt, preferred_element_type=jnp.float32)
      return losses.kd_loss_sum(zs, zt, args.kind)[0]
  else:
    def loss(hs, ws, ht, wt):
      return fused_loss.fused_kd_loss(hs, ws, ht, wt, args.kind, chunk_size=args.chunk_size)[0]

  step = jax.jit(jax.value_and_grad(loss, (0, 1)))
  jax.block_until_ready((hs, ws, ht, wt))
  rss_before = _rss_bytes()
  compiled = step.lower(hs, ws, ht, wt).compile()
  mem = compiled.memory_analysis()
  out = compiled(hs, ws, ht, wt)  # warm-up
  jax.block_until_ready(out)
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(hs, ws, ht, wt))
    times.append(time.perf_counter() - t0)
  stats = jax.devices()[0].memory_stats() or {}
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  dev = jax.devices()[0]
  return {
      "variant": args.worker,
      "device": f"{dev.platform}: {dev.device_kind}",
      "loss": float(out[0]),
      "grad_head_norm": float(jnp.linalg.norm(out[1][1].astype(jnp.float32))),
      "xla_temp_bytes": int(mem.temp_size_in_bytes),
      "xla_output_bytes": int(mem.output_size_in_bytes),
      "xla_argument_bytes": int(mem.argument_size_in_bytes),
      "xla_peak_bytes": int(mem.temp_size_in_bytes + mem.output_size_in_bytes),
      "device_peak_bytes": int(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats
      else None,
      "rss_peak_bytes": int(peak_rss),
      "rss_growth_bytes": int(peak_rss - rss_before),
      "times_s": times,
      "median_s": statistics.median(times),
  }


def _run_variant(variant: str, argv: list[str]) -> dict:
  cmd = [sys.executable, __file__, *argv, "--worker", variant]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    return {"variant": variant, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _gib(x) -> str:
  return f"{'-':>8s}" if x is None else f"{x / 2**30:8.3f}"


def main(argv=None):
  args = _parse(argv)
  if args.worker:
    print(json.dumps(_worker(args)))
    return 0
  forwarded = list(argv if argv is not None else sys.argv[1:])
  rows = {v: _run_variant(v, forwarded) for v in args.variants.split(",")}
  device = next((r["device"] for r in rows.values() if "device" in r), "unknown")
  failed = {v: r["error"] for v, r in rows.items() if "error" in r}
  if failed:
    print(f"variant(s) failed: {failed}", file=sys.stderr)
  print(f"KD ({args.kind}) loss + grad, tokens={args.tokens} V={args.vocab} D={args.dim} "
        f"dtype={args.dtype} chunk={args.chunk_size} on {device}")
  cols = ("xla_peak_bytes", "xla_temp_bytes", "device_peak_bytes", "rss_growth_bytes")
  print(f"{'variant':8s} {'xla peak':>9s} {'xla temp':>9s} {'dev peak':>9s} {'rss grow':>9s} "
        f"{'median s':>9s}  (GiB)")
  for v, r in rows.items():
    if "error" not in r:
      print(f"{v:8s} " + " ".join(_gib(r[c]) + " " for c in cols) + f"{r['median_s']:9.3f}")
  ratios = {}
  if "naive" in rows and "fused" in rows and not failed:
    n, f = rows["naive"], rows["fused"]
    ratios = {
        "memory_xla_peak": f["xla_peak_bytes"] / n["xla_peak_bytes"],
        "memory_rss_growth": f["rss_growth_bytes"] / max(n["rss_growth_bytes"], 1),
        "time": f["median_s"] / n["median_s"],
        "loss_rel_diff": abs(f["loss"] - n["loss"]) / abs(n["loss"]),
    }
    if n["device_peak_bytes"] and f["device_peak_bytes"]:
      ratios["memory_device_peak"] = f["device_peak_bytes"] / n["device_peak_bytes"]
    print("fused / naive: " + ", ".join(f"{k} {v:.4g}" for k, v in ratios.items()))
    print(f"targets: memory <= 0.125 ({'met' if ratios['memory_xla_peak'] <= 0.125 else 'MISSED'})"
          f", time <= 1.3 ({'met' if ratios['time'] <= 1.3 else 'MISSED'})")
  result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                       if k != "worker"},
            "device": device, "inputs_bytes_each_variant": rows.get("naive", {}).get(
                "xla_argument_bytes"), "variants": rows, "ratios": ratios}
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {args.out}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
