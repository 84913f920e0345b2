r"""Throughput of the distillation train step.

  python benchmarks/bench_train_step.py          # CPU: ours vs a plain PyTorch transformers loop
  python benchmarks/bench_train_step.py --gpu    # GPU: 0.5B-shaped student, 1.5B teacher, MFU
  python benchmarks/bench_train_step.py --gpu --link 1.5b --remat   # 1.5B student, 7B teacher

CPU mode: the same teacher and student shapes (Qwen2 architecture, random weights), batch, data
and fp32 numerics on this machine, both steps = teacher forward + student forward/backward with a
forward-KL loss + AdamW; rounds alternate between the two and the median step time of each is
reported, with the ratio ours / PyTorch in tokens/s. It also measures the step's matmul floor:
every matmul the step must do (each linear's forward, and for the student its input and weight
gradients; attention's batched products; the output heads), timed alone with both JAX and PyTorch
on this machine, the faster counted. The floor is the time of those matmuls alone, with nothing
else costing anything, so PyTorch's step time / floor is the highest ratio any implementation of
the same fp32 arithmetic can reach here (`--no-floor` skips it).

GPU mode: a Qwen2.5-0.5B-shaped student and a Qwen2.5-1.5B-shaped teacher (random weights),
bf16 compute with fp32 master weights, one device. Model FLOPs per token are
6 N_student + 2 N_teacher + 12 L_s H_s hd_s T + 4 L_t H_t hd_t T (attention as in PaLM, not
halved for causality; N counts the tied output head once); MFU = FLOP/s / peak (989 TFLOP/s
dense bf16 for H100 and H200). A watchdog makes the script fail rather than hang.

Both print a table and write benchmarks/results/train_step_{cpu_v<vocab>[_smollm2],gpu[_7b]}.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}
GPU_LINKS = {"0.5b": ("0.5B", "1.5B"), "1.5b": ("1.5B", "7B")}  # --link: (student, teacher)


def _args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--gpu", action="store_true", help="GPU mode (0.5B student, 1.5B teacher)")
  p.add_argument("--batch", type=int, default=None, help="sequences per microbatch")
  p.add_argument("--microbatches", type=int, default=None)
  p.add_argument("--seq", type=int, default=None, help="sequence length")
  p.add_argument("--steps", type=int, default=None, help="timed steps per round")
  p.add_argument("--rounds", type=int, default=3, help="CPU: alternating rounds")
  p.add_argument("--remat", action="store_true", help="GPU: rematerialise the student's layers")
  p.add_argument("--link", choices=tuple(GPU_LINKS), default="0.5b",
                 help="GPU: student Qwen2.5-0.5B from a 1.5B teacher, or 1.5B from a 7B teacher")
  p.add_argument("--timeout", type=int, default=170, help="GPU: watchdog seconds")
  p.add_argument("--vocab", type=int, default=49152,
                 help="CPU: vocabulary size (default: SmolLM2's 49,152)")
  p.add_argument("--shape", choices=("small", "smollm2"), default="small",
                 help="CPU: 'small' (teacher 6 x 384, student 4 x 256, 8 x 128 tokens) or "
                      "'smollm2' (SmolLM2-135M-shaped teacher 30 x 576, student 12 x 384, "
                      "4 x 256 tokens, loss chunk 1,024)")
  p.add_argument("--no-floor", dest="floor", action="store_false",
                 help="CPU: skip timing the step's matmuls alone (the floor, ~1-2 min)")
  p.add_argument("--chunk", type=int, default=None,
                 help="fused-loss chunk in tokens (default: 128 on CPU, 1024 with --shape "
                      "smollm2, 4096 on GPU)")
  return p.parse_args()


def cpu_shapes(vocab: int = 49152, shape: str = "small"):
  from cbd_jax.model.config import ModelConfig

  teacher = ModelConfig(family="qwen2", vocab_size=vocab, hidden_size=384, num_layers=6,
                        num_heads=6, num_kv_heads=2, head_dim=64, intermediate_size=1024,
                        tie_embeddings=True, rope_theta=1e6, norm_eps=1e-6)
  if shape == "smollm2":  # SmolLM2-135M's shape as the teacher, a 12-layer student.
    teacher = teacher.replace(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                              intermediate_size=1536, rope_theta=1e5, norm_eps=1e-5)
    return teacher.replace(hidden_size=384, num_layers=12, num_heads=6, num_kv_heads=2,
                           intermediate_size=1024), teacher
  student = teacher.replace(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=768)
  return student, teacher


def gpu_shapes(link: str = "0.5b"):
  """(student, teacher): Qwen2.5-0.5B from 1.5B ("0.5b") or Qwen2.5-1.5B from 7B ("1.5b")."""
  from cbd_jax.model.config import ModelConfig

  small = ModelConfig(family="qwen2", vocab_size=151936, real_vocab_size=151665,
                      hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                      intermediate_size=4864, tie_embeddings=True, rope_theta=1e6,
                      norm_eps=1e-6, max_position_embeddings=32768)
  mid = small.replace(hidden_size=1536, num_layers=28, num_heads=12, head_dim=128,
                      intermediate_size=8960)
  if link == "0.5b":
    return small, mid
  big = mid.replace(vocab_size=152064, hidden_size=3584, num_heads=28, num_kv_heads=4,
                    intermediate_size=18944, tie_embeddings=False)  # Qwen2.5-7B: untied head.
  return mid, big


def _random_params(config, seed: int, shardings=None, dtype=None):
  """normal(0.02) weights and unit norm scales, drawn on the device (nothing on the host)."""
  import jax
  import jax.numpy as jnp

  from cbd_jax.model.decoder import abstract_params

  shapes = abstract_params(config)
  dtype = dtype or jnp.float32

  def draw():
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for key, (path, leaf) in zip(keys, leaves, strict=True):
      if path[-1].key == "scale":
        out.append(jnp.ones(leaf.shape, dtype))
      else:
        out.append((0.02 * jax.random.normal(key, leaf.shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)
  return jax.jit(draw, out_shardings=shardings)()


def _ours(student, teacher, batch, micro, seq, chunk, lr=1e-4):
  """(run(n) -> seconds for n steps, tokens per step) for our jitted step on all local devices."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from cbd_jax.distill.train_step import (
    LossSettings,
    abstract_params,
    init_train_state,
    make_optimizer,
    make_train_step,
    state_shardings,
  )
  from cbd_jax.model.sharding import make_mesh, tree_shardings

  mesh = make_mesh({"data": -1})
  opt, _ = make_optimizer(lr, 1000, weight_decay=0.0, grad_clip=0.0, b2=0.999)
  sh = state_shardings(student, opt, mesh)
  params = _random_params(student, 1, sh.params)
  state = jax.jit(lambda p: init_train_state(p, opt), out_shardings=sh, donate_argnums=0)(params)
  t_params = _random_params(teacher, 2, tree_shardings(abstract_params(teacher), mesh),
                            jnp.dtype(teacher.dtype))
  step = make_train_step(student, teacher, opt, LossSettings(chunk_size=chunk), mesh)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, student.vocab_limit, size=(micro, batch, seq + 1)).astype(np.int32)
  data = {"ids": tokens[..., :-1], "labels": tokens[..., 1:],
          "mask": np.ones((micro, batch, seq), np.float32)}
  data = jax.device_put(data, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp"))))
  box = {"state": state}

  def run(n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      box["state"], metrics = step(box["state"], t_params, data)
    float(metrics["loss"])  # Waits for the device.
    box["loss"] = float(metrics["loss"])
    return time.perf_counter() - start
  return run, box


def _torch(student, teacher, batch, micro, seq, lr=1e-4):
  """The plain PyTorch transformers KD loop: full logits, log_softmax KL, AdamW."""
  import numpy as np
  import torch
  import torch.nn.functional as F
  from transformers import Qwen2Config, Qwen2ForCausalLM

  def build(c, seed):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                      num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
                      intermediate_size=c.intermediate_size, tie_word_embeddings=True,
                      rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps,
                      max_position_embeddings=c.max_position_embeddings)
    return Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa",
                                         dtype=torch.float32)
  s_model, t_model = build(student, 1).train(), build(teacher, 2).eval()
  for p in t_model.parameters():
    p.requires_grad_(False)
  opt = torch.optim.AdamW(s_model.parameters(), lr=lr, weight_decay=0.0)
  rng = np.random.default_rng(0)
  ids = torch.from_numpy(rng.integers(0, student.vocab_size, size=(micro, batch, seq))
                         .astype(np.int64))
  box = {}

  def step():
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for m in range(micro):
      with torch.no_grad():
        t_logp = F.log_softmax(t_model(ids[m]).logits.float(), -1)
      s_logp = F.log_softmax(s_model(ids[m]).logits.float(), -1)
      kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="sum") / (micro * batch * seq)
      kl.backward()
      total += float(kl.detach())
    opt.step()
    return total

  def run(n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      box["loss"] = step()
    return time.perf_counter() - start
  return run, box


def step_matmuls(student, teacher, batch: int, seq: int) -> list[tuple]:
  """Every matmul of one KD step: (what, count, batch, m, k, n, form) per distinct product.

  form "nt": [m, k] x [n, k]^T (a linear's forward, weights [out, in]); "nn": [m, k] x [k, n]
  (input gradient); "tn": [k, m]^T x [k, n] (weight gradient, contracting the tokens). The
  teacher runs forward only; the student forward and both gradients (the first layer's input
  gradient included: the tied embedding trains). Attention is counted in full, not halved for
  causality (both sides compute it so on CPU).
  """
  tokens, out = batch * seq, []
  for who, c, train in (("teacher", teacher, False), ("student", student, True)):
    d, f, hd = c.hidden_size, c.intermediate_size, c.head_dim
    linears = {"q": (d, c.num_heads * hd), "kv": (d, c.num_kv_heads * hd),
               "o": (c.num_heads * hd, d), "gate/up": (d, f), "down": (f, d)}
    per_layer = {"q": 1, "kv": 2, "o": 1, "gate/up": 2, "down": 1}
    for name, (k_in, n_out) in linears.items():
      count = per_layer[name] * c.num_layers
      out.append((f"{who} {name}", count, 1, tokens, k_in, n_out, "nt"))
      if train:
        out.append((f"{who} {name} dx", count, 1, tokens, n_out, k_in, "nn"))
        out.append((f"{who} {name} dw", count, 1, n_out, tokens, k_in, "tn"))
    heads = batch * c.num_heads
    # Forward: Q K^T and P V; backward: dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q.
    out.append((f"{who} attn qk", c.num_layers, heads, seq, hd, seq, "nt"))
    out.append((f"{who} attn pv", c.num_layers, heads, seq, seq, hd, "nn"))
    if train:
      out.append((f"{who} attn dp", c.num_layers, heads, seq, hd, seq, "nt"))
      out.append((f"{who} attn dv/dk", 2 * c.num_layers, heads, seq, seq, hd, "tn"))
      out.append((f"{who} attn dq", c.num_layers, heads, seq, seq, hd, "nn"))
    out.append((f"{who} head", 1, 1, tokens, d, c.vocab_size, "nt"))
    if train:
      out.append((f"{who} head dx", 1, 1, tokens, c.vocab_size, d, "nn"))
      out.append((f"{who} head dw", 1, 1, c.vocab_size, tokens, d, "tn"))
  return out


def matmul_floor(student, teacher, batch: int, seq: int, reps: int = 3) -> dict:
  """Times each distinct matmul of the step alone (JAX and PyTorch, best of ``reps``)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  def operands(b, m, k, n, form):
    a = (k, m) if form == "tn" else (m, k)
    w = (n, k) if form == "nt" else (k, n)
    rng = np.random.default_rng(0)
    return [rng.standard_normal((b, *s), np.float32) for s in (a, w)]

  specs = {"nt": "bmk,bnk->bmn", "nn": "bmk,bkn->bmn", "tn": "bkm,bkn->bmn"}

  def best(fn, *args):
    fn(*args)
    times = []
    for _ in range(reps):
      start = time.perf_counter()
      fn(*args)
      times.append(time.perf_counter() - start)
    return min(times)

  def on_jax(x, y, f):
    f(x, y).block_until_ready()

  def on_torch(x, y, form):  # Transposed views: BLAS reads them in place, as autograd does.
    torch.bmm(x.transpose(1, 2) if form == "tn" else x, y.transpose(1, 2) if form == "nt" else y)

  rows, seen = [], {}
  for what, count, b, m, k, n, form in step_matmuls(student, teacher, batch, seq):
    key = (b, m, k, n, form)
    if key not in seen:
      x, y = operands(*key)
      f = jax.jit(functools.partial(jnp.einsum, specs[form]))
      seen[key] = (best(on_jax, jnp.asarray(x), jnp.asarray(y), f),
                   best(on_torch, torch.from_numpy(x), torch.from_numpy(y), form))
    t_jax, t_torch = seen[key]
    flop = 2 * b * m * k * n
    rows.append({"what": what, "count": count, "shape": f"{b}x[{m}x{k}]x[{k}x{n}] {form}",
                 "flop": flop, "jax_s": t_jax, "torch_s": t_torch,
                 "gflop_per_s": flop / min(t_jax, t_torch) / 1e9})
  total = {name: sum(r["count"] * r[name] for r in rows) for name in ("flop", "jax_s", "torch_s")}
  floor = sum(r["count"] * min(r["jax_s"], r["torch_s"]) for r in rows)
  return {"floor_s": floor, "flop": total["flop"], "jax_only_s": total["jax_s"],
          "torch_only_s": total["torch_s"], "matmuls": rows}


def cpu_main(args):
  import jax
  import torch

  torch.set_num_threads(os.cpu_count() or 1)
  student, teacher = cpu_shapes(args.vocab, args.shape)
  big = args.shape == "smollm2"
  batch, micro = args.batch or (4 if big else 8), args.microbatches or 1
  seq, chunk = args.seq or (256 if big else 128), args.chunk or (1024 if big else 128)
  steps = args.steps or 2
  tokens = batch * micro * seq
  ours, ours_box = _ours(student, teacher, batch, micro, seq, chunk)
  theirs, theirs_box = _torch(student, teacher, batch, micro, seq)
  compile_s = ours(1)
  theirs(1)
  times = {"ours": [], "pytorch": []}
  for r in range(args.rounds):
    order = [("ours", ours), ("pytorch", theirs)]
    for name, run in order if r % 2 == 0 else order[::-1]:
      times[name].append(run(steps) / steps)
  med = {k: statistics.median(v) for k, v in times.items()}
  floor = matmul_floor(student, teacher, batch * micro, seq) if args.floor else None
  result = {
      "mode": "cpu", "machine": f"{platform.processor() or platform.machine()}, "
                                f"{os.cpu_count()} cores", "jax": jax.__version__,
      "torch": torch.__version__, "student": student.to_dict(), "teacher": teacher.to_dict(),
      "batch": batch, "microbatches": micro, "seq_len": seq, "tokens_per_step": tokens,
      "shape": args.shape, "chunk_size": chunk, "load_avg": os.getloadavg(),
      "steps_per_round": steps, "rounds": args.rounds,
      "first_step_s (ours, compile)": compile_s,
      "step_s": med, "step_s_all": times,
      "tokens_per_s": {k: tokens / v for k, v in med.items()},
      "speedup_ours_over_pytorch": med["pytorch"] / med["ours"],
      "final_loss": {"ours": ours_box["loss"], "pytorch": theirs_box["loss"]},
      "matmul_floor": floor,
  }
  print(f"\ndistillation step, fp32, CPU ({result['machine']}): teacher {teacher.num_layers}x"
        f"{teacher.hidden_size}, student {student.num_layers}x{student.hidden_size}, vocab "
        f"{student.vocab_size}, {batch}x{seq} tokens x {micro} microbatches")
  print(f"{'':10s} {'step (s)':>10s} {'tokens/s':>10s}")
  for k in ("ours", "pytorch"):
    print(f"{k:10s} {med[k]:10.3f} {tokens / med[k]:10.0f}")
  print(f"ratio (ours / pytorch tokens/s): {result['speedup_ours_over_pytorch']:.2f}x "
        "(target >= 1.5x)")
  if floor:
    print(f"\nthe step's matmuls alone ({floor['flop'] / 1e9:.0f} GFLOP), each timed on its own, "
          f"the faster of JAX and PyTorch: {floor['floor_s']:.3f} s (JAX alone "
          f"{floor['jax_only_s']:.3f} s, PyTorch alone {floor['torch_only_s']:.3f} s)")
    print(f"highest possible ratio (PyTorch's step / that floor): "
          f"{med['pytorch'] / floor['floor_s']:.2f}x; ours spends "
          f"{100 * floor['floor_s'] / med['ours']:.0f}% of its step at the floor")
  suffix = "_smollm2" if big else ""
  _write(f"train_step_cpu_v{student.vocab_size}{suffix}.json", result)


def _flops_per_token(student, teacher, seq: int) -> float:
  from cbd_jax.model.config import num_params

  def attn(c, factor):
    return factor * c.num_layers * c.num_heads * c.head_dim * seq
  return (6 * num_params(student) + 2 * num_params(teacher) + attn(student, 12)
          + attn(teacher, 4))


def gpu_main(args):
  import jax

  def on_alarm(signum, frame):
    raise TimeoutError(f"GPU benchmark exceeded its {args.timeout} s watchdog")
  signal.signal(signal.SIGALRM, on_alarm)
  signal.alarm(args.timeout)
  if jax.default_backend() != "gpu":
    sys.exit(f"error: --gpu needs a GPU; JAX sees {jax.devices()}")
  device = jax.devices()[0]
  kind = device.device_kind
  peak = next((v for k, v in PEAK_BF16.items() if k in kind), None)
  student, teacher = gpu_shapes(args.link)
  names = GPU_LINKS[args.link]
  student = student.replace(dtype="bfloat16", remat=args.remat)
  teacher = teacher.replace(dtype="bfloat16")
  batch, micro, seq = args.batch or 8, args.microbatches or 2, args.seq or 2048
  steps = args.steps or 10
  tokens = batch * micro * seq
  t0 = time.perf_counter()
  run, box = _ours(student, teacher, batch, micro, seq, args.chunk or 4096)
  setup_s = time.perf_counter() - t0
  compile_s = run(1)
  run(2)  # Warm-up.
  step_s = run(steps) / steps
  flops = _flops_per_token(student, teacher, seq) * tokens / step_s
  stats = device.memory_stats() or {}
  result = {
      "mode": "gpu", "device": kind, "devices": jax.device_count(), "jax": jax.__version__,
      "student": f"Qwen2.5-{names[0]} shape", "teacher": f"Qwen2.5-{names[1]} shape",
      "dtype": "bfloat16",
      "remat": args.remat, "batch": batch, "microbatches": micro, "seq_len": seq,
      "tokens_per_step": tokens, "setup_s": setup_s, "first_step_s (compile)": compile_s,
      "step_s": step_s, "tokens_per_s": tokens / step_s, "model_tflops_per_s": flops / 1e12,
      "peak_tflops_per_s": peak / 1e12 if peak else None,
      "mfu": flops / (peak * jax.device_count()) if peak else None,
      "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "loss": box["loss"],
  }
  signal.alarm(0)
  print(f"\ndistillation step on {kind}: student Qwen2.5-{names[0]} shape, teacher "
        f"Qwen2.5-{names[1]} shape, bf16, {batch}x{seq} tokens x {micro} microbatches, "
        f"remat={args.remat}")
  for key in ("first_step_s (compile)", "step_s", "tokens_per_s", "model_tflops_per_s", "mfu",
              "peak_memory_gib", "loss"):
    value = result[key]
    print(f"{key:24s} {value:12.4f}" if isinstance(value, float) else f"{key:24s} {value}")
  _write("train_step_gpu.json" if args.link == "0.5b" else "train_step_gpu_7b.json", result)


def _write(name: str, result: dict) -> None:
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / name).write_text(json.dumps(result, indent=2, default=str) + "\n")
  print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
  args = _args()
  gpu_main(args) if args.gpu else cpu_main(args)
