r"""Hidden-state distillation on a chain: its anchors against the same chain built without it.

Two (or more) chain folders built from the same config apart from the links' hidden-state loss
(``--config.chain[i].loss.hidden_weight`` etc.). For every anchor of every chain:

  chain eval   the numbers the chain driver recorded in chain.json: KL(link teacher || anchor),
               CE and perplexity on the config's held-out batches (the same tokens in each chain)
  held-out     perplexity and KL(source || anchor) on another stretch of the held-out news text
               (``--skip_tokens`` on, ``--eval_tokens`` long): one common teacher for both anchors
  training     tokens/s of the link's logged steps and the span of its metrics records

  python benchmarks/bench_hidden.py --chains runs/smollm2_chain_nohidden runs/smollm2_chain_hidden

Prints a markdown table and writes benchmarks/results/hidden_default_chain.json (``--out``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def link_losses(doc: dict) -> dict:
  """{anchor name: its link's loss settings} from a manifest's recorded config."""
  chain = (doc.get("config") or {}).get("chain") or []
  return {link["name"]: link.get("loss", {}) for link in chain}


def training_speed(chain_dir: Path, name: str) -> dict:
  """Mean tokens/s over a link's logged train records (the first, which compiles, left out) and
  the seconds from its first train record to its eval record."""
  path = chain_dir / "metrics" / f"{name}.jsonl"
  if not path.is_file():
    return {}
  records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  train = [r for r in records if r.get("train/tokens_per_s")]
  evals = [r for r in records if "eval/ce" in r]
  out = {}
  if len(train) > 1:
    out["tokens_per_s"] = sum(r["train/tokens_per_s"] for r in train[1:]) / (len(train) - 1)
  if train and evals:
    out["logged_span_s"] = evals[-1]["time"] - train[0]["time"]
  hidden = [r["train/hidden"] for r in records if "train/hidden" in r]
  if hidden:
    out["hidden_first"], out["hidden_last"] = hidden[0], hidden[-1]
  return out


def _sums(config, t_config, params, t_params, ids_NxT, row_mask_N):
  """(sum CE of the anchor, sum KL(teacher || anchor)) over the rows' predicted tokens."""
  import jax.numpy as jnp

  from cbd_jax.distill.fused_loss import fused_cross_entropy, fused_kd_loss
  from cbd_jax.model import decoder

  inputs = ids_NxT[:, :-1]
  hidden, _ = decoder.apply_hidden(config, params, inputs)
  t_hidden, _ = decoder.apply_hidden(t_config, t_params, inputs)
  mask = jnp.broadcast_to(row_mask_N[:, None], hidden.shape[:2]).astype(jnp.float32)
  head, t_head = decoder.head_weight(config, params), decoder.head_weight(t_config, t_params)
  rows = min(head.shape[0], t_head.shape[0])
  v = min(config.vocab_limit, t_config.vocab_limit)
  ce, _ = fused_cross_entropy(hidden, head, ids_NxT[:, 1:], mask, vocab_limit=config.vocab_limit,
                              chunk_size=2048)
  kl, _ = fused_kd_loss(hidden, head[:rows], t_hidden, t_head[:rows], kind="fkl", mask=mask,
                        vocab_limit=v, chunk_size=2048)
  return ce, kl


@functools.cache
def _jitted_sums():
  import jax

  return jax.jit(_sums, static_argnums=(0, 1))


def heldout_scores(model_pair, source_pair, rows, batch_size: int = 8) -> dict:
  """Perplexity and KL(source || model) per token on ``rows`` [N, T + 1]."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  (config, params), (t_config, t_params) = model_pair, source_pair
  params, t_params = (jax.tree.map(jnp.asarray, p) for p in (params, t_params))
  ce = kl = 0.0
  for i in range(0, len(rows), batch_size):
    batch = rows[i:i + batch_size]
    real = np.arange(batch_size) < len(batch)
    batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(batch), 0)])
    c, k = _jitted_sums()(config, t_config, params, t_params, jnp.asarray(batch),
                 jnp.asarray(real, jnp.float32))
    ce, kl = ce + float(c), kl + float(k)
  n = rows[:, 1:].size
  return {"ce": ce / n, "ppl": math.exp(min(ce / n, 50.0)), "kl_source": kl / n}


def run(args) -> dict:
  from cbd_jax.checkpoints import assets, hf_io, manifest
  from cbd_jax.evaluation import heldout

  chains = [Path(c) for c in args.chains]
  docs = {c: manifest.read(c) for c in chains}
  source_path = next(iter(docs.values()))["source"]["path"]
  if any(d["source"]["path"] != source_path for d in docs.values()):
    raise SystemExit("the chains were built from different sources; compare chains of one source")
  source = hf_io.load_hf_numpy(source_path)
  tokenizer = hf_io.load_tokenizer(source_path)
  text = Path(args.text) if args.text else assets.english_text()["heldout"]
  rows = heldout.load_token_rows(tokenizer, text, args.eval_tokens, args.seq_len, args.skip_tokens)
  src = heldout_scores(source, source, rows)
  print(f"source: held-out ppl {src['ppl']:.2f} on {rows[:, 1:].size} tokens", flush=True)
  result = {"heldout": {"file": str(text), "tokens": int(rows[:, 1:].size),
                        "skip_tokens": args.skip_tokens, "seq_len": args.seq_len},
            "source": {"path": source_path, "ppl": src["ppl"]}, "chains": []}
  for chain_dir, doc in docs.items():
    losses = link_losses(doc)
    entry = {"chain": str(chain_dir), "anchors": []}
    for anchor in manifest.done_anchors(doc):
      pair = hf_io.load_hf_numpy(str(chain_dir / anchor["path"]))
      loss = losses.get(anchor["name"], {})
      row = {"name": anchor["name"], "num_params": anchor["num_params"],
             "hidden": {k: loss.get(k) for k in ("hidden_weight", "hidden_kind",
                                                  "hidden_layers", "projector")},
             "chain_eval": {k: anchor["eval"].get(k) for k in ("kl", "ce", "ppl")},
             "heldout": heldout_scores(pair, source, rows),
             "training": training_speed(chain_dir, anchor["name"])}
      entry["anchors"].append(row)
      print(f"{chain_dir.name} {row['name']}: chain eval ppl {row['chain_eval']['ppl']:,.1f} KL "
            f"{row['chain_eval']['kl']:.4f}; held-out ppl {row['heldout']['ppl']:,.1f} KL(source) "
            f"{row['heldout']['kl_source']:.4f}", flush=True)
    result["chains"].append(entry)
  result["machine"] = (f"{platform.node()} ({os.cpu_count()} CPUs), load "
                       f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  return result


def print_table(result: dict) -> None:
  print("\n| chain | anchor | hidden loss | chain eval KL | chain eval ppl | held-out ppl | "
        "KL(source) | train tokens/s |")
  print("|---|---|---|---:|---:|---:|---:|---:|")
  for chain in result["chains"]:
    for a in chain["anchors"]:
      h = a["hidden"]
      setting = (f"{h['hidden_kind']} x {h['hidden_weight']}, {h['projector']}"
                 if h.get("hidden_weight") else "none")
      speed = a["training"].get("tokens_per_s")
      print(f"| {Path(chain['chain']).name} | {a['name']} | {setting} | "
            f"{a['chain_eval']['kl']:.4f} | {a['chain_eval']['ppl']:,.1f} | "
            f"{a['heldout']['ppl']:,.1f} | {a['heldout']['kl_source']:.4f} | "
            f"{'-' if speed is None else f'{speed:.1f}'} |")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--chains", nargs="+", required=True, help="finished chain folders")
  p.add_argument("--text", default=None, help="held-out text (default: the fetched news text)")
  p.add_argument("--skip_tokens", type=int, default=8192,
                 help="held-out tokens skipped first (the chain eval reads the first ones)")
  p.add_argument("--eval_tokens", type=int, default=8192, help="held-out tokens scored")
  p.add_argument("--seq_len", type=int, default=128, help="held-out row length")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                      "hidden_default_chain.json"))
  args = p.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  result = run(args)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print_table(result)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
