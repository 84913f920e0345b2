"""load_hf against a plain safetensors read of the same 0.5B-parameter Qwen2-shaped checkpoint.

Writes a random-weight checkpoint with the shape of Qwen2.5-0.5B (24 x 896, 14/2 heads, FFN 4864,
151,936 rows, tied), then times, alternating and from a warm page cache:
  raw:  safetensors.safe_open(framework="flax") reading every tensor onto the device;
  ours: cbd_jax.load_hf(folder) (read, validate, stack layers, device_put).
Prints a table and writes benchmarks/results/load.json. Target: ours <= 1.5 x raw.

  python benchmarks/bench_load.py [--dtype bfloat16|float32] [--repeats 3] [--dir /tmp/x]
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import cbd_jax
from cbd_jax.checkpoints.convert import to_hf_tensors
from cbd_jax.checkpoints.hf_config import to_hf_config
from cbd_jax.checkpoints.safetensors_io import write_safetensors
from cbd_jax.model.config import ModelConfig, num_params

QWEN2_0_5B = ModelConfig(family="qwen2", vocab_size=151_936, hidden_size=896, num_layers=24,
                         num_heads=14, num_kv_heads=2, head_dim=64, intermediate_size=4864,
                         max_position_embeddings=32768, rope_theta=1e6, norm_eps=1e-6,
                         tie_embeddings=True)


def write_checkpoint(folder: Path, dtype: str) -> int:
  """Random weights straight from numpy (no model init needed), in the HF layout."""
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: cbd_jax.init_params(QWEN2_0_5B, jax.random.key(0)))
  params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape, np.float32))
                        .astype(dtype), shapes)
  tensors = to_hf_tensors(QWEN2_0_5B, params)
  write_safetensors(folder / "model.safetensors", tensors)
  (folder / "config.json").write_text(json.dumps(to_hf_config(QWEN2_0_5B, dtype)))
  return sum(t.nbytes for t in tensors.values())


def read_raw(folder: Path):
  from safetensors import safe_open

  with safe_open(str(folder / "model.safetensors"), framework="flax") as f:
    out = {k: f.get_tensor(k) for k in f.keys()}
  return jax.block_until_ready(out)


def read_ours(folder: Path):
  return jax.block_until_ready(cbd_jax.load_hf(folder)[1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: tmp)")
  parser.add_argument("--out", default="benchmarks/results/load.json")
  args = parser.parse_args()
  folder = Path(args.dir or tempfile.mkdtemp(prefix="cbd_bench_load_"))
  folder.mkdir(parents=True, exist_ok=True)
  nbytes = write_checkpoint(folder, args.dtype)
  print(f"checkpoint: {num_params(QWEN2_0_5B) / 1e6:.0f}M params, {nbytes / 2**30:.2f} GiB "
        f"{args.dtype}, {folder}")
  read_raw(folder)  # Warm the page cache so both read from memory.
  times = {"raw safetensors": [], "cbd_jax.load_hf": []}
  for _ in range(args.repeats):
    for name, fn in (("raw safetensors", read_raw), ("cbd_jax.load_hf", read_ours)):
      start = time.perf_counter()
      fn(folder)
      times[name].append(time.perf_counter() - start)
  med = {k: statistics.median(v) for k, v in times.items()}
  ratio = med["cbd_jax.load_hf"] / med["raw safetensors"]
  print(f"{'reader':18s} {'median s':>9s} {'GiB/s':>7s}  runs")
  for name, t in med.items():
    runs = " ".join(f"{x:.2f}" for x in times[name])
    print(f"{name:18s} {t:9.2f} {nbytes / 2**30 / t:7.2f}  {runs}")
  print(f"ratio load_hf / raw = {ratio:.2f}  (target <= 1.5)")
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps({
      "benchmark": "load", "device": jax.devices()[0].device_kind, "dtype": args.dtype,
      "bytes": nbytes, "params": num_params(QWEN2_0_5B), "seconds": times, "median": med,
      "ratio": ratio}, indent=2))


if __name__ == "__main__":
  main()
