r"""The paper's central claim, in shape: a target initialised from a chain, with no teacher call,
against the usual ways of making a model of that size, at equal training-token budgets S.

  (a) CBD: interpolation of the two anchors that bracket the size, 0 recovery tokens
  (b) CBD + S tokens of recovery (plain LM loss, no teacher)
  (c) random initialisation + S tokens (LM loss)
  (d) Grow of the small anchor alone + S tokens (LM loss)
  (e) Shrink of the source directly (weight selection) + S tokens (LM loss)
  (f) KD from the source + S tokens (forward KL; starts from Shrink of the source by default)

Held-out loss is measured on text of another origin than the training text, with the target's
own tokenizer, at several points along the S tokens. Teacher forward FLOPs are counted as
2 * N_teacher * tokens for every teacher forward: those spent building the anchors (once, shared
by every target made from the chain) apart from those spent on this target.

  python benchmarks/bench_cbd_claim.py                          # reuses runs/smollm2_chain
  python benchmarks/bench_cbd_claim.py --build                  # builds that chain first
  python benchmarks/bench_cbd_claim.py --preset cpu4 --build --out /tmp/claim4   # 4x budgets
  python benchmarks/bench_cbd_claim.py --preset gpu --build --out /tmp/claim   # one GPU, ~5 min

Writes <out>/cbd_claim.json and <out>/cbd_claim.png (default out: benchmarks/results).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = {"a": "CBD interpolation, 0 tokens", "b": "CBD + S (LM loss)",
           "c": "random init + S (LM loss)", "d": "Grow(small anchor) + S (LM loss)",
           "e": "Shrink(source) + S (LM loss)", "f": "KD from source + S"}


@dataclasses.dataclass(frozen=True)
class Preset:
  """Budgets of one run: the chain (when built here) and the comparison."""

  size: str = "50m"
  tokens: int = 8192            # S
  evals: int = 2                # evaluation points after 0 (S / evals apart)
  batch_size: int = 8
  seq_len: int = 128
  lr: float = 1e-3
  eval_tokens: int = 4096
  dtype: str = "float32"
  chain_tokens: tuple = ()      # per-link token budgets when building the chain (() = config's)
  chain_batch: int = 0          # batch size of the chain's links when building (0 = config's)


PRESETS = {
    # Two CPU cores: about 15 minutes on an idle machine (the default chain built beforehand).
    "cpu": Preset(),
    # Two CPU cores, four times the default chain's budgets and S: about 50 minutes idle.
    "cpu4": Preset(tokens=32_768, evals=4, chain_tokens=(98_304, 131_072)),
    # One H100/H200: the chain and the comparison together in about 5 minutes.
    "gpu": Preset(tokens=1_048_576, evals=4, batch_size=32, seq_len=256, lr=1e-3,
                  eval_tokens=65_536, dtype="bfloat16", chain_tokens=(4_194_304, 4_194_304),
                  chain_batch=32),
}


def _default_config(arg: str = ""):
  spec = importlib.util.spec_from_file_location("default_config", ROOT / "configs" / "default.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def build_chain(workdir: Path, preset: Preset) -> None:
  """The embedded default chain (configs/default.py), with the preset's budgets if it has any."""
  from cbd_jax.chain import driver

  config = _default_config()
  config.workdir = str(workdir)
  config.log.progress = False
  for i, link in enumerate(config.chain):
    if preset.chain_tokens:
      link.tokens = preset.chain_tokens[i]
    if preset.chain_batch:
      link.batch_size, link.seq_len = preset.chain_batch, preset.seq_len
      link.optimizer.warmup_steps = 20
    link.dtype = preset.dtype
  config.checkpoint.every = 10**9
  config.log.every = 10 if not preset.chain_batch else 50
  driver.run_chain(config)


def load_models(chain_dir: Path, size: str):
  """(source, small, large, target config, manifest, Shrink settings of the chain's first link)
  of a finished chain."""
  from cbd_jax.checkpoints import gguf_cache, hf_io
  from cbd_jax.interpolation import sizing, target

  doc = json.loads((chain_dir / "chain.json").read_text())
  small_path, large_path = target.pick_anchors(chain_dir, size)
  small, large = hf_io.load_hf_numpy(small_path), hf_io.load_hf_numpy(large_path)
  source_path = doc["source"]["path"]
  if source_path.endswith(".gguf"):
    source_path = gguf_cache.hf_folder(source_path)
  source = hf_io.load_hf_numpy(source_path)
  target_config = sizing.resolve_size(size, small[0], large[0])
  first = (doc.get("config") or {}).get("chain", [{}])[0]
  shrink = {"method": first.get("shrink") or "leading",
            "layers": first.get("shrink_layers") or "even",
            "rescale": bool(first.get("shrink_rescale", True)),
            "refit": bool(first.get("shrink_refit", False))}
  return source, small, large, target_config, doc, shrink, (small_path, large_path)


def initialisations(source, small, large, target_config, shrink: dict, calib_rows,
                    seed: int = 0):
  """Host params on the target's shape for every method (b's and a's are the same: the default
  of launch/init_model.py on the line's shape, calibrated on the chain's training text; e's and
  f's: the Shrink the chain's first link starts from, `prune.shrink` with its settings, cut
  straight to the target's shape)."""
  import jax
  import numpy as np

  from cbd_jax.chain import source as source_mod
  from cbd_jax.interpolation import calibrate, prune, resize

  cbd, _ = calibrate.make_target(small, large, target_config, calibrate.Recipe(), calib_rows)
  grown = resize.grow(small[0], small[1], target_config, method="zero", depth="zero")
  shrunk, _ = prune.shrink(source[0], source[1], target_config, shrink["method"], calib_rows,
                           shrink["layers"], rescale=shrink["rescale"], refit=shrink["refit"])
  host = lambda p: jax.tree.map(np.asarray, p)  # noqa: E731
  return {"b": host(cbd), "c": source_mod.init_host_params(target_config, seed),
          "d": host(grown), "e": host(shrunk), "f": host(shrunk)}


def zero_step_variants(small, large, target_config, calib_rows, evaluate) -> dict[str, float]:
  """Held-out loss at 0 tokens of other recipes (no training, no teacher): the paper's plain
  formula, and the default without unit alignment or without residual gains; ``calib_rows`` is
  training text."""
  from cbd_jax.interpolation import calibrate

  recipes = {"paper's formula": calibrate.Recipe(method="paper"),
             "no unit alignment": calibrate.Recipe(align_units=False),
             "no residual gains": calibrate.Recipe(gains=False)}
  return {name: evaluate(calibrate.make_target(small, large, target_config, r, calib_rows,
                                               log=lambda _: None)[0])
          for name, r in recipes.items()}


def chain_teacher_flops(doc: dict) -> int:
  """2 * N_teacher * tokens summed over the chain's links (each link's teacher: its predecessor)."""
  total, teacher = 0, doc["source"]["num_params"]
  for anchor in doc["anchors"]:
    total += 2 * teacher * int(anchor.get("tokens", 0))
    teacher = anchor["num_params"]
  return total


def run(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from cbd_jax import data
  from cbd_jax.checkpoints import hf_io
  from cbd_jax.distill.lm_step import make_lm_step
  from cbd_jax.distill.train_step import (
    LossSettings,
    init_train_state,
    make_optimizer,
    make_train_step,
    place_params,
    state_shardings,
  )
  from cbd_jax.evaluation import heldout
  from cbd_jax.model.config import num_params
  from cbd_jax.model.sharding import global_batch, make_mesh, tree_shardings

  preset = dataclasses.replace(PRESETS[args.preset], **{k: v for k, v in dict(
      size=args.size, tokens=args.tokens, eval_tokens=args.eval_tokens).items() if v})
  chain_dir = Path(args.chain)
  t0 = time.time()
  if args.build or not (chain_dir / "chain.json").exists():
    if not args.build:
      raise SystemExit(f"error: {chain_dir / 'chain.json'} not found; build the chain first "
                       "(python launch/train_chain.py) or pass --build")
    build_chain(chain_dir, preset)
  chain_seconds = time.time() - t0
  source, small, large, target_config, doc, shrink, paths = load_models(chain_dir, preset.size)
  target_config = target_config.replace(dtype=preset.dtype)
  print(f"target {preset.size}: {target_config.num_layers} x {target_config.hidden_size}, "
        f"{num_params(target_config):,} params, between {paths[0].name} and {paths[1].name}")
  tokenizer = hf_io.load_tokenizer(str(paths[0]))
  cfg = doc["config"]["data"]
  text = heldout.load_heldout(tokenizer, cfg["heldout"], preset.eval_tokens, preset.seq_len)
  train = data.PackedTokens(data.load_tokens(cfg["train"], tokenizer, chain_dir / "data_cache"),
                            preset.seq_len, int(cfg.get("seed", 0)))
  calib_rows = np.asarray(train.sequences[:16], np.int32)
  inits = initialisations(source, small, large, target_config.replace(dtype="float32"), shrink,
                          calib_rows)
  steps = max(1, preset.tokens // (preset.batch_size * preset.seq_len))
  per_step = preset.batch_size * preset.seq_len
  eval_at = sorted({0, *[round(steps * (i + 1) / preset.evals) for i in range(preset.evals)]})
  mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  optimizer, schedule = make_optimizer(preset.lr, steps, warmup_steps=steps // 20,
                                       schedule="cosine", min_lr_ratio=0.1)
  sh = state_shardings(target_config, optimizer, mesh)
  lm_step = make_lm_step(target_config, optimizer, mesh, schedule=schedule, chunk_size=4096)
  teacher = source[0].replace(dtype=preset.dtype)
  kd_step = make_train_step(target_config, teacher, optimizer, LossSettings(chunk_size=4096),
                            mesh, schedule=schedule)
  teacher_params = place_params(source[1], tree_shardings(source[1], mesh),
                                jnp.dtype(preset.dtype))
  eval_config = target_config.replace(dtype="float32")

  def evaluate(params) -> float:
    loss = heldout.evaluate(eval_config, jax.device_get(params), text)["loss"]
    if not math.isfinite(loss):
      raise FloatingPointError(f"held-out loss is {loss}")
    return loss

  variants = zero_step_variants(small, large, target_config.replace(dtype="float32"),
                                calib_rows, evaluate)
  for name, loss in variants.items():
    print(f"  (a) {'CBD interpolation, ' + name:<50} tokens {0:>10,}  held-out loss {loss:.4f}")
  curves, seconds = {}, {}
  for method in "bcdef":
    start = time.time()
    placed = place_params(inits[method], sh.params, jnp.float32)
    state = jax.jit(lambda p: init_train_state(p, optimizer), out_shardings=sh)(placed)
    curve = []
    for step in range(steps + 1):
      if step in eval_at:
        curve.append((step * per_step, evaluate(state.params)))
        print(f"  ({method}) {METHODS[method]:<34} tokens {step * per_step:>10,}  held-out "
              f"loss {curve[-1][1]:.4f}", flush=True)
      if step == steps:
        break
      batch = global_batch(mesh, train.batch(step, 1, preset.batch_size), 1)
      if method == "f":
        state, m = kd_step(state, teacher_params, batch)
      else:
        state, m = lm_step(state, batch)
    if not math.isfinite(float(m["loss"])):
      raise FloatingPointError(f"method {method}: training loss is {float(m['loss'])}")
    curves[method], seconds[method] = curve, time.time() - start
  curves["a"] = curves["b"][:1]
  result = _summary(preset, doc, source, small, large, target_config, paths, curves, seconds,
                    steps * per_step, chain_seconds, args)
  result["a_variants_loss_at_0"] = variants
  return result


def _summary(preset, doc, source, small, large, target_config, paths, curves, seconds, budget,
             chain_seconds, args) -> dict:
  from cbd_jax.model.config import num_params

  build = chain_teacher_flops(doc)
  on_target = {"a": 0, "b": 0, "c": 0, "d": 0, "e": 0, "f": 2 * num_params(source[0]) * budget}
  anchors = {"a": build, "b": build, "c": 0, "d": build, "e": 0, "f": 0}
  rows = []
  for m in "abcdef":
    final = curves[m][-1]
    rows.append({"method": m, "description": METHODS[m], "tokens": final[0],
                 "heldout_loss": final[1], "heldout_ppl": math.exp(min(final[1], 50)),
                 "teacher_flops_target": on_target[m], "teacher_flops_anchors": anchors[m],
                 "curve": curves[m], "seconds": seconds.get(m, 0.0)})
  loss = {r["method"]: r["heldout_loss"] for r in rows}
  claims = {"a_beats_c_at_S": loss["a"] < loss["c"], "a_beats_d_at_S": loss["a"] < loss["d"],
            "a_beats_d_at_0": loss["a"] < curves["d"][0][1],
            "b_beats_c_at_S": loss["b"] < loss["c"]}
  return {"preset": dataclasses.asdict(preset), "budget_tokens": budget,
          "chain": str(args.chain), "chain_build_seconds": chain_seconds,
          "source": {"path": doc["source"]["path"], "num_params": num_params(source[0])},
          "anchors": {"small": [str(paths[0]), num_params(small[0])],
                      "large": [str(paths[1]), num_params(large[0])]},
          "chain_tokens": [a.get("tokens", 0) for a in doc["anchors"]],
          "target": {"size": preset.size, "num_params": num_params(target_config),
                     "layers": target_config.num_layers, "width": target_config.hidden_size},
          "heldout": doc["config"]["data"]["heldout"], "rows": rows, "claims": claims,
          "device": _device()}


def _device() -> str:
  import jax

  d = jax.devices()[0]
  return f"{jax.default_backend()}: {getattr(d, 'device_kind', d.platform)} x{jax.device_count()}"


def print_table(result: dict) -> None:
  print(f"\nTarget {result['target']['size']} ({result['target']['num_params']:,} params, "
        f"{result['target']['layers']} x {result['target']['width']}), S = "
        f"{result['budget_tokens']:,} tokens, held-out: {Path(result['heldout']).name}, "
        f"{result['device']}")
  head = (f"{'':3} {'method':<34} {'tokens':>10} {'loss':>8} {'ppl':>10} "
          f"{'teacher FLOPs (target)':>22} {'(anchors, once)':>16}")
  print(head + "\n" + "-" * len(head))
  for r in result["rows"]:
    print(f"({r['method']}) {r['description']:<34} {r['tokens']:>10,} {r['heldout_loss']:>8.4f} "
          f"{r['heldout_ppl']:>10.2f} {r['teacher_flops_target']:>22.3e} "
          f"{r['teacher_flops_anchors']:>16.3e}")
  for name, loss in result.get("a_variants_loss_at_0", {}).items():
    print(f"(a) {'  ' + name:<34} {0:>10,} {loss:>8.4f} {math.exp(min(loss, 50)):>10.2f}")
  for name, ok in result["claims"].items():
    print(f"  {name}: {'yes' if ok else 'NO'}")


def plot(result: dict, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in result["rows"]:
    xs, ys = zip(*r["curve"])
    if r["method"] == "a":
      ax.axhline(ys[0], color="black", linestyle="--", linewidth=1,
                 label=f"(a) {r['description']}")
    else:
      ax.plot(xs, ys, marker="o", label=f"({r['method']}) {r['description']}")
  ax.set_xlabel("training tokens of the target")
  ax.set_ylabel("held-out loss (nats / token)")
  ax.set_title(f"{result['target']['size']} target, {result['device']}")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  p.add_argument("--chain", default=None, help="chain folder (default: runs/smollm2_chain, or "
                 "runs/smollm2_chain_PRESET with another --preset)")
  p.add_argument("--build", action="store_true", help="build (or finish) the chain first")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  p.add_argument("--size", default=None, help="target size between the two anchors")
  p.add_argument("--tokens", type=int, default=None, help="S, training tokens per method")
  p.add_argument("--eval_tokens", type=int, default=None)
  args = p.parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.chain is None:
    args.chain = "runs/smollm2_chain" + ("" if args.preset == "cpu" else f"_{args.preset}")
  result = run(args)
  print_table(result)
  (out / "cbd_claim.json").write_text(json.dumps(result, indent=2) + "\n")
  plot(result, out / "cbd_claim.png")
  print(f"wrote {out / 'cbd_claim.json'} and {out / 'cbd_claim.png'}")
  return 0


if __name__ == "__main__":
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  sys.exit(main())
