"""The end-of-run report of a chain: held-out quality of each model, tokens, teacher compute, files.

For the source, every finished anchor and every interpolated target under ``<workdir>/targets``:
held-out perplexity and bits per byte (`evaluation.heldout`), training tokens, and the teacher
forward FLOPs spent to make it, counted as 2 * N_teacher per token the teacher reads (a KD link
runs its teacher once over every training token; a sequence-level KD link counts the positions
its teacher computed while writing the corpus). A target costs no teacher call: it is made from
two anchors by interpolation, and ``init_model`` never loads a teacher.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cbd_jax.checkpoints import gguf_cache, hf_io, manifest
from cbd_jax.evaluation import baselines, harness, heldout
from cbd_jax.interpolation import sizing
from cbd_jax.model.config import ModelConfig, num_params

log = logging.getLogger(__name__)
REPORT = "report.json"


def _shape(config: ModelConfig) -> str:
  return (f"{config.family} {config.num_layers}x{config.hidden_size} "
          f"ffn {config.intermediate_size}")


def chain_models(workdir: str | Path) -> list[dict[str, Any]]:
  """Source, finished anchors and targets of a chain, each {name, role, path, config, ...}."""
  workdir = Path(workdir)
  doc = manifest.read(workdir)
  source = doc["source"]
  path = source["path"]
  if path.endswith(".gguf"):  # Read through its converted folder (fast; same weights).
    path = str(gguf_cache.hf_folder(path))
  models = [{"name": Path(source["path"]).name.removesuffix(".gguf"), "role": "source",
             "path": path, "config": source["config"], "tokens": 0, "teacher_flops": 0}]
  teacher_params = source["num_params"]
  for anchor in manifest.done_anchors(doc):
    bridge = anchor.get("bridge") or {}
    flops = bridge.get("teacher_flops")
    if flops is None:  # A token-level KD link: one teacher forward per training token.
      flops = 2 * teacher_params * int(anchor.get("tokens", 0))
    models.append({"name": anchor["name"], "role": "anchor",
                   "path": str(workdir / anchor["path"]), "config": anchor["config"],
                   "tokens": int(anchor.get("tokens", 0)), "teacher_flops": int(flops)})
    teacher_params = anchor["num_params"]
  for summary in sorted((workdir / "targets").glob("*/cbd_init.json")):
    info = json.loads(summary.read_text())
    models.append({"name": f"target {info['size']}", "role": "target",
                   "path": str(summary.parent), "config": info["config"], "tokens": 0,
                   "teacher_flops": 0, "alpha": info["alpha"], "gamma": info.get("gamma"),
                   "anchors": [Path(info["small_anchor"]).name, Path(info["large_anchor"]).name]})
  return models


def evaluate_models(models: list[dict], text_file: str | Path, eval_tokens: int,
                    seq_len: int) -> list[dict]:
  """Adds held-out ``loss``, ``ppl``, ``bpb`` and ``num_params`` to each model entry."""
  texts: dict[str, heldout.HeldoutText] = {}
  for m in models:
    config, params = hf_io.load_hf_numpy(m["path"])
    manifest.check_recorded(m["path"], config, m["config"] if m["role"] == "anchor" else None)
    hf_io.check_finite(params, m["path"])
    tokenizer = hf_io.load_tokenizer(m["path"])
    key = str(len(tokenizer))
    if key not in texts:
      texts[key] = heldout.load_heldout(tokenizer, text_file, eval_tokens, seq_len)
    quality = heldout.evaluate(config, params, texts[key])
    m.update(loss=quality["loss"], ppl=quality["ppl"], bpb=quality["bpb"],
             eval_tokens=quality["tokens"], eval_bytes=quality["bytes"],
             num_params=num_params(config), shape=_shape(config),
             tasks=harness.read_task_scores(m["path"]))  # launch/evaluate.py's results.
    log.info("%s: held-out ppl %.2f, %.3f bits/byte", m["name"], m["ppl"], m["bpb"])
  return models


def count_baselines(workdir: str | Path, text_file: str | Path, eval_tokens: int,
                    seq_len: int) -> list[dict]:
  """Unigram and bigram count models of the chain's training text (`evaluation.baselines`), in the
  source's tokenizer, on the same held-out rows as the models: a model below them has learned no
  more than counts."""
  import ml_collections

  workdir = Path(workdir)
  doc = manifest.read(workdir)
  config = doc.get("config") or {}
  if not config.get("data", {}).get("train"):
    return []
  first = next((a for a in manifest.done_anchors(doc)), None)
  path = str(workdir / first["path"]) if first else doc["source"]["path"]
  tokenizer = hf_io.load_tokenizer(path)
  data_cfg = ml_collections.ConfigDict(config["data"])
  cache = data_cfg.get("cache_dir") or workdir / "data_cache"
  chain = config.get("chain") or [{}]
  rows = baselines.training_rows(data_cfg, tokenizer, int(chain[0].get("seq_len", seq_len)),
                                 cache)
  fitted = baselines.fit(rows, len(tokenizer))
  text = heldout.load_heldout(tokenizer, text_file, eval_tokens, seq_len)
  out = []
  for name, quality in baselines.evaluate(fitted, text.rows, text.byte_lengths).items():
    out.append({"name": f"{name} counts", "role": "counts", "path": "", "tokens": rows.size,
                "teacher_flops": 0, "num_params": 0, "shape": quality["smoothing"],
                "loss": quality["loss"], "ppl": quality["ppl"], "bpb": quality["bpb"],
                "eval_tokens": text.tokens, "eval_bytes": text.bytes, "tasks": {}})
    log.info("%s counts: held-out ppl %.2f", name, quality["ppl"])
  return out


def format_table(models: list[dict]) -> str:
  """A fixed-width table of the evaluated models."""
  head = (f"{'model':<18} {'role':<7} {'params':>8}  {'shape':<26} {'train tokens':>12} "
          f"{'teacher FLOPs':>13} {'ppl':>10} {'bits/byte':>9}")
  lines = [head, "-" * len(head)]
  for m in models:
    tokens = f"{m['tokens']:,}" if m["role"] != "source" else "-"
    params = sizing.format_count(m["num_params"]) if m["num_params"] else "-"
    flops = f"{m['teacher_flops']:.2e}" if m["teacher_flops"] else (
        "0" if m["role"] == "target" else "-")
    lines.append(f"{m['name'][:18]:<18} {m['role']:<7} "
                 f"{params:>8}  {m['shape'][:26]:<26} "
                 f"{tokens:>12} {flops:>13} {m['ppl']:>10.2f} {m['bpb']:>9.3f}")
  return "\n".join(lines)


def chain_report(workdir: str | Path, text_file: str | Path, eval_tokens: int = 4096,
                 seq_len: int = 128) -> dict:
  """Evaluates every model of the chain, writes ``<workdir>/report.json``; returns the report."""
  workdir = Path(workdir)
  models = evaluate_models(chain_models(workdir), text_file, eval_tokens, seq_len)
  models += count_baselines(workdir, text_file, eval_tokens, seq_len)
  anchors = [m for m in models if m["role"] == "anchor"]
  targets = [m for m in models if m["role"] == "target"]
  report = {
      "heldout": {"file": str(text_file), "eval_tokens": eval_tokens, "seq_len": seq_len},
      "models": models,
      "chain_tokens": sum(m["tokens"] for m in anchors),
      "chain_teacher_flops": sum(m["teacher_flops"] for m in anchors),
      "target_teacher_calls": 0,
      "files": {"manifest": str(workdir / "chain.json"),
                "anchors": [m["path"] for m in anchors],
                "targets": [m["path"] for m in targets],
                "metrics": str(workdir / "metrics"), "report": str(workdir / REPORT)},
  }
  (workdir / REPORT).write_text(json.dumps(report, indent=2) + "\n")
  return report


def format_report(report: dict) -> str:
  """The printed report: the table, the token / teacher-compute totals and where the files are."""
  models = report["models"]
  out = [f"Held-out text: {report['heldout']['file']} (first {report['heldout']['eval_tokens']:,}"
         f" tokens, rows of {report['heldout']['seq_len']})", "", format_table(models), ""]
  out.append(f"Chain: {report['chain_tokens']:,} training tokens, teacher forward FLOPs "
             f"{report['chain_teacher_flops']:.3e} (2 x teacher params x tokens, every link).")
  for m in models:
    if m["role"] == "target":
      out.append(f"{m['name']}: interpolated from {m['anchors'][0]} and {m['anchors'][1]} "
                 f"(alpha {m['alpha']:.3f}"
                 + (f", gamma {m['gamma']:.3f}" if m.get("gamma") is not None else "")
                 + "); teacher calls spent on it: 0, training tokens: 0.")
  out += [f"{m['name']} tasks: {harness.format_task_scores(m['tasks'])}"
          for m in models if m.get("tasks")]
  files = report["files"]
  out += ["", "Files:", f"  manifest  {files['manifest']}"]
  out += [f"  anchor    {p}" for p in files["anchors"]]
  out += [f"  target    {p}" for p in files["targets"]]
  out += [f"  metrics   {files['metrics']}", f"  report    {files['report']}"]
  return "\n".join(out)
