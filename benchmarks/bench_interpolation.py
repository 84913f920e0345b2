"""Quality check: held-out perplexity at zero training steps of an interpolated target vs baselines.

Two anchors come from the real SmolLM2-135M teacher, chain-style: the large anchor is the teacher
shrunk to fewer layers, the small anchor is the large one shrunk to fewer still; each is then
fine-tuned for a few dozen steps with the plain LM loss on Wikipedia text.
The target sits on the line between them. Compared on news text (another source than the
training text), with no training of the target:

  random init | Grow(small) alone | Shrink(large) alone | interpolation (default alpha, and alpha
  and variant chosen on a Wikipedia slice the anchors were not trained on)

  python benchmarks/bench_interpolation.py    # ~10 min CPU time on 2 cores; a rerun reuses the
                                              # anchors cached under ~/.cache/cbd-jax
Writes benchmarks/results/interpolation.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cbd_jax.checkpoints import assets, hf_io
from cbd_jax.interpolation import calibrate, importance, mixing, resize, sizing
from cbd_jax.model import decoder, layout
from cbd_jax.model.config import num_params

RESULTS = Path(__file__).resolve().parent / "results" / "interpolation.json"


def token_rows(tokenizer, path: Path, n_rows: int, seq_len: int, skip_rows: int = 0):
  """Rows [n_rows, seq_len + 1] of consecutive tokens of a text file, after ``skip_rows`` rows."""
  need, ids = (skip_rows + n_rows) * (seq_len + 1), []
  with path.open(encoding="utf-8") as f:
    for line in f:
      ids += tokenizer(line.strip() + "\n", add_special_tokens=False)["input_ids"]
      if len(ids) >= need:
        break
  if len(ids) < need:
    raise ValueError(f"{path}: {len(ids)} tokens, {need} needed; lower the row counts")
  return np.asarray(ids[:need], np.int32).reshape(-1, seq_len + 1)[skip_rows:]


def finetune(config, params, rows, batch: int, lr: float):
  """Plain LM-loss AdamW fine-tuning over ``rows`` in batches; returns (params, losses)."""
  steps = len(rows) // batch
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), max(2, steps),
                                                lr / 10)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))

  def loss_fn(p, ids):
    logits = decoder.forward(config, p, ids[:, :-1])[..., :config.vocab_limit]
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  @jax.jit
  def step(p, state, ids):
    loss, grads = jax.value_and_grad(loss_fn)(p, ids)
    updates, state = opt.update(grads, state, p)
    return optax.apply_updates(p, updates), state, loss

  params = jax.device_put(params)
  state, losses = opt.init(params), []
  for i in range(steps):
    params, state, loss = step(params, state, jnp.asarray(rows[i * batch:(i + 1) * batch]))
    losses.append(float(loss))
  return jax.tree.map(np.asarray, params), losses


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=20, help="fine-tuning steps per anchor")
  p.add_argument("--large_layers", type=int, default=22)
  p.add_argument("--small_layers", type=int, default=14)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq_len", type=int, default=128, help="fine-tuning sequence length")
  p.add_argument("--lr", type=float, default=3e-4)
  p.add_argument("--eval_rows", type=int, default=12, help="held-out rows of 256 tokens")
  p.add_argument("--select_rows", type=int, default=8,
                 help="Wikipedia rows (unseen in fine-tuning) for choosing alpha and method")
  p.add_argument("--out", default=str(RESULTS))
  p.add_argument("--rebuild", action="store_true",
                 help="rebuild the anchors even if this configuration's are cached")
  args = p.parse_args(argv)
  start = time.time()
  timings = {}

  def lap(name):
    timings[name] = round(time.time() - start - sum(timings.values()), 1)

  gguf = str(assets.smollm2_gguf())
  teacher_cfg, teacher = hf_io.load_hf_numpy(gguf, dtype=np.float32)
  tokenizer = hf_io.load_tokenizer(gguf)
  text = assets.english_text()
  n_train = 2 * args.steps * args.batch
  train = token_rows(tokenizer, text["train"], n_train, args.seq_len)
  select = token_rows(tokenizer, text["train"], args.select_rows, 256,
                      skip_rows=n_train * (args.seq_len + 1) // 257 + 1)
  heldout = token_rows(tokenizer, text["heldout"], args.eval_rows, 256)
  lap("load teacher, tokenizer and text")

  # Anchors, chain-style: teacher -> large -> small, each dropping the layers that change the
  # residual stream least (block influence on training rows), then fine-tuned. Widths are kept:
  # dropping channels, heads or neurons costs far more healing than a CPU benchmark can run.
  large_config = teacher_cfg.replace(num_layers=args.large_layers)
  small_config = teacher_cfg.replace(num_layers=args.small_layers)
  key = (f"L{args.large_layers}-S{args.small_layers}-steps{args.steps}-b{args.batch}-"
         f"t{args.seq_len}-lr{args.lr}")
  cache = assets.cache_dir() / "bench_interpolation" / f"{key}.npz"
  if cache.exists() and not args.rebuild:
    saved = np.load(cache)
    large, small = ({k[2:]: saved[k] for k in saved.files if k.startswith(f"{r}/")}
                    for r in ("L", "S"))
    large, small = layout.unflatten(large), layout.unflatten(small)
    large_losses, small_losses = saved["losses_L"].tolist(), saved["losses_S"].tolist()
    lap(f"anchors loaded from {cache}")
  else:
    calib = train[:2]
    large0 = resize.shrink(teacher_cfg, teacher, large_config,
                           layer_select=importance.block_influence(teacher_cfg, teacher, calib))
    large, large_losses = finetune(large_config, large0, train[:n_train // 2], args.batch, args.lr)
    lap("large anchor: shrink + fine-tune")
    small0 = resize.shrink(large_config, large, small_config,
                           layer_select=importance.block_influence(large_config, large, calib))
    small, small_losses = finetune(small_config, small0, train[n_train // 2:], args.batch, args.lr)
    lap("small anchor: shrink + fine-tune")
    cache.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{r}/{k}": v for r, tree in (("L", large), ("S", small))
              for k, v in layout.flatten(tree).items()}
    with open(cache.with_suffix(".part"), "wb") as f:
      np.savez(f, losses_L=large_losses, losses_S=small_losses, **arrays)
    cache.with_suffix(".part").rename(cache)
  target_size = (num_params(small_config) + num_params(large_config)) // 2
  target_cfg = sizing.resolve_size(target_size, small_config, large_config)
  s_anchor, l_anchor = (small_config, small), (large_config, large)

  def ppl(config, params, rows=heldout):
    return math.exp(heldout.mean_nll(config, params, rows))

  rows = {"teacher (SmolLM2-135M, for reference)": ppl(teacher_cfg, teacher),
          "large anchor itself": ppl(large_config, large),
          "small anchor itself": ppl(small_config, small)}
  del teacher
  lap("anchors evaluated")
  alpha0 = mixing.default_alpha(small_config, large_config, target_cfg)
  rows["target: random init"] = ppl(target_cfg, decoder.init_params(target_cfg,
                                                                    jax.random.PRNGKey(0)))
  rows["target: Grow(small) alone (identity layers: the small anchor's function)"] = ppl(
      target_cfg, resize.grow(small_config, small, target_cfg))
  rows["target: Shrink(large) alone (evenly spaced layers)"] = ppl(
      target_cfg, resize.shrink(large_config, large, target_cfg))
  bi_large = importance.block_influence(large_config, large, select)  # Teacher-free, on Wikipedia.
  rows["target: Shrink(large) alone (layers by block influence on Wikipedia)"] = ppl(
      target_cfg, resize.shrink(large_config, large, target_cfg, layer_select=bi_large))
  rows[f"target: interpolation, alpha={alpha0:.2f} (default), zero layers, no alignment"] = (
      ppl(target_cfg, mixing.interpolate(s_anchor, l_anchor, target_cfg, alpha0, "plain",
                                         align_layers=False)))
  variants = {"zero layers": dict(depth="zero", mix="plain"),
              "zero layers, extra layers by block influence": dict(
                  depth="zero", mix="plain", large_layer_scores=bi_large),
              "identity layers": dict(depth="identity", mix="plain"),
              "zero layers + renormalize": dict(depth="zero", mix="whole"),
              "zero layers, output mix": dict(depth="zero", mix="output")}
  for name, kw in variants.items():
    rows[f"target: interpolation, alpha={alpha0:.2f} (default), aligned, {name}"] = ppl(
        target_cfg, mixing.interpolate(s_anchor, l_anchor, target_cfg, alpha0, **kw))
  lap("baselines and default-alpha interpolation evaluated")
  swept = ("zero layers", "zero layers, extra layers by block influence")
  def sweep(mix, **view_kw):
    views = mixing.anchor_views(s_anchor, l_anchor, target_cfg, **view_kw)
    return mixing.choose_alpha(target_cfg, views, mix, select, refinements=0)

  sweeps = {name: sweep(**variants[name]) for name in swept}
  chosen = min(sweeps, key=lambda n: sweeps[n][1][sweeps[n][0]])
  alpha_sel = sweeps[chosen][0]
  rows[f"target: interpolation, alpha={alpha_sel:.2f} and '{chosen}' chosen on Wikipedia"] = ppl(
      target_cfg, mixing.interpolate(s_anchor, l_anchor, target_cfg, alpha_sel,
                                     **variants[chosen]))
  default, info = calibrate.make_target(s_anchor, l_anchor, target_cfg, calibrate.Recipe(), select,
                                        log=lambda _: None)
  rows[f"target: init_model's default (calibrated on Wikipedia: alpha={info['alpha']:.2f}, "
       f"{info['layer_choice']} layers)"] = ppl(target_cfg, default)
  lap("alpha and variant chosen on Wikipedia, evaluated on news")

  print(f"\nanchors: small {sizing.describe(small_config)}\n         large "
        f"{sizing.describe(large_config)}\ntarget:  {sizing.describe(target_cfg)}")
  print(f"fine-tuning ({args.steps} steps x {args.batch} x {args.seq_len} tokens each): large "
        f"{large_losses[0]:.2f} -> {large_losses[-1]:.2f}, small {small_losses[0]:.2f} -> "
        f"{small_losses[-1]:.2f} nats")
  print(f"\n| held-out news perplexity, {heldout.size - len(heldout)} tokens, 0 target steps "
        "| ppl |\n|---|---:|")
  for name, value in rows.items():
    print(f"| {name} | {value:.1f} |")
  print("\nselection sweeps (Wikipedia loss): " + "; ".join(
      f"{n}: " + ", ".join(f"{a:.2f}:{v:.3f}" for a, v in s[1].items()) for n, s in
      sweeps.items()))
  result = {"perplexity": rows, "default_alpha": alpha0, "selected": {"alpha": alpha_sel,
                                                                      "method": chosen},
            "selection_losses": {n: s[1] for n, s in sweeps.items()},
            "anchors": {"small": small_config.to_dict(), "large": large_config.to_dict()},
            "target": target_cfg.to_dict(), "num_params": {
                "small": num_params(small_config), "large": num_params(large_config),
                "target": num_params(target_cfg)},
            "finetune_losses": {"large": large_losses, "small": small_losses},
            "args": vars(args), "heldout_tokens": int(heldout.size - len(heldout)),
            "seconds": timings, "total_seconds": round(time.time() - start, 1),
            "machine": f"{platform.machine()}, {jax.device_count()} {jax.default_backend()} "
                       f"device(s), jax {jax.__version__}"}
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
  print(f"\ntimings (s): {timings}; total {result['total_seconds']} s; wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
