"""`init_target`: a model of any size between two anchors, written as a Hugging Face folder.

Anchors come from a finished chain (its ``chain.json`` manifest: the two adjacent anchors with
status "done" whose parameter counts bracket the size) or from two HF folders given directly.
No teacher and no source model are loaded.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cbd_jax import hf_io, interpolate, sizing
from cbd_jax.config import ModelConfig, num_params

MANIFEST = "chain.json"


def pick_anchors(chain_dir: str | Path, size: str | int, use_source: bool = False
                 ) -> tuple[Path, Path]:
  """(small, large) anchor folders of a chain: adjacent "done" anchors bracketing ``size``."""
  chain_dir = Path(chain_dir)
  manifest = chain_dir / MANIFEST
  if not manifest.exists():
    raise FileNotFoundError(f"{manifest} not found; build the chain first (python "
                            "launch/train_chain.py), pass --chain DIR, or pass --anchors A,B")
  try:
    chain = json.loads(manifest.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{manifest}: invalid JSON ({e}); rebuild or repair the manifest") from None
  entries = [a for a in chain.get("anchors", []) if a.get("status") == "done"]
  if use_source and "source" in chain:
    entries.append({"name": "source", **chain["source"]})
  found = []
  for entry in entries:
    count = entry.get("num_params") or num_params(ModelConfig.from_dict(entry["config"]))
    found.append((int(count), chain_dir / entry["path"], entry.get("name", entry["path"])))
  found.sort()
  if len(found) < 2:
    raise ValueError(f"{manifest}: {len(found)} finished anchor(s), interpolation needs two; "
                     "let the chain finish more anchors or pass --anchors A,B")
  want = sizing.parse_size(size)
  tol = 0.03
  for (p_s, path_s, _), (p_l, path_l, _) in zip(found, found[1:], strict=False):
    if p_s * (1 - tol) <= want <= p_l * (1 + tol):
      return path_s, path_l
  names = ", ".join(f"{name} ({sizing.format_count(p)})" for p, _, name in found)
  raise ValueError(f"size {size} ({sizing.format_count(want)}) is outside the finished anchors' "
                   f"range [{sizing.format_count(found[0][0])}, "
                   f"{sizing.format_count(found[-1][0])}] ({names}); ask for a size in it")


def _has_tokenizer(folder: Path) -> bool:
  return folder.is_dir() and any((folder / f).exists() for f in (
      "tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model"))


def load_token_rows(tokenizer, text_file: str | Path, max_tokens: int, seq_len: int) -> np.ndarray:
  """Token ids [N, seq_len + 1] from the start of a text file (paragraphs joined by newlines)."""
  path = Path(text_file)
  if not path.exists():
    raise FileNotFoundError(f"{path}: text file not found; pass an existing --text file")
  ids: list[int] = []
  with path.open(encoding="utf-8") as f:
    for line in f:
      if line.strip():
        ids += tokenizer(line.strip() + "\n", add_special_tokens=False)["input_ids"]
      if len(ids) >= max_tokens + seq_len + 1:
        break
  rows = min(len(ids), max_tokens) // (seq_len + 1)
  if rows == 0:
    raise ValueError(f"{path}: only {len(ids)} tokens, fewer than one row of {seq_len + 1}; "
                     "give a longer text or a smaller seq_len")
  return np.asarray(ids[:rows * (seq_len + 1)], np.int32).reshape(rows, seq_len + 1)


def init_target(size: str | int, chain: str | Path | None = None, anchors=None,
                out: str | Path | None = None, alpha: float | None = None,
                alpha_sweep: bool = False, text: str | Path | None = None,
                shrink_method: str = "leading", grow_method: str = "zero",
                depth: str = "zero", renormalize: bool = False, align_layers: bool = True,
                align_units: bool = True, dtype: str | None = None,
                overwrite: bool = False, use_source: bool = False, eval_tokens: int = 8192,
                seq_len: int = 256, log: Callable[[str], None] = print) -> dict:
  """Interpolates a ``size`` model from two anchors, saves it to ``out``; returns a summary.

  ``anchors`` (two folders) takes precedence over ``chain``. With ``text``, the held-out
  perplexity is measured on its first ``eval_tokens`` tokens; ``alpha_sweep`` picks alpha on the
  first half of those rows and reports perplexity on the second half.
  """
  start = time.time()
  if alpha is not None and alpha_sweep:
    raise ValueError("--alpha and --alpha_sweep both given; pass one of them")
  if alpha_sweep and text is None:
    raise ValueError("--alpha_sweep scores alphas by held-out loss; pass --text FILE")
  if anchors:
    if isinstance(anchors, str):
      anchors = [a for a in anchors.split(",") if a]
    if len(anchors) != 2:
      raise ValueError(f"--anchors takes two folders separated by a comma, got {len(anchors)}")
    paths = [Path(a) for a in anchors]
  else:
    chain = Path(chain or "runs/smollm2_chain")
    paths = list(pick_anchors(chain, size, use_source))
  out = Path(out) if out else Path(chain or paths[0].parent) / "targets" / str(size)
  if out.exists() and any(out.iterdir()) and not overwrite:
    raise FileExistsError(f"{out}: folder exists and is not empty; choose another --out or pass "
                          "--overwrite")
  loaded = [hf_io.load_hf(str(p)) for p in paths]
  order = sorted(range(2), key=lambda i: num_params(loaded[i][0]))
  small, large = loaded[order[0]], loaded[order[1]]
  path_s, path_l = paths[order[0]], paths[order[1]]
  target = sizing.resolve_size(size, small[0], large[0])
  log(f"small anchor: {path_s}: {sizing.describe(small[0])}")
  log(f"large anchor: {path_l}: {sizing.describe(large[0])}")
  log(f"target {size}: {sizing.describe(target)}")

  tok_path = next((p for p in (path_s, path_l) if _has_tokenizer(p)), None)
  tokenizer = hf_io.load_tokenizer(str(tok_path)) if tok_path else None
  rows = sweep_rows = None
  if text is not None:
    if tokenizer is None:
      raise ValueError(f"--text needs a tokenizer, and neither {path_s} nor {path_l} has one; "
                       "add the tokenizer files to an anchor folder")
    rows = load_token_rows(tokenizer, text, eval_tokens, seq_len)
    if alpha_sweep:
      if len(rows) < 2:
        raise ValueError(f"{text}: too short to split for --alpha_sweep; give a longer text")
      sweep_rows, rows = rows[:len(rows) // 2], rows[len(rows) // 2:]
  kwargs = dict(shrink_method=shrink_method, grow_method=grow_method, depth=depth,
                align_layers=align_layers, align_units=align_units)
  sweep = None
  if alpha_sweep:
    alpha, sweep = interpolate.sweep_alpha(small, large, target, sweep_rows,
                                           renormalize=renormalize, **kwargs)
    log("alpha sweep (held-out loss): " + ", ".join(f"{a:.2f}: {v:.4f}" for a, v in sweep.items()))
  elif alpha is None:
    alpha = interpolate.default_alpha(small[0], large[0], target)
  log(f"alpha = {alpha:.4f} (weight of the small anchor)")
  params = interpolate.interpolate(small, large, target, alpha, renormalize=renormalize, **kwargs)
  perplexity = None
  if rows is not None:
    loss = interpolate.heldout_loss(target, params, rows)
    perplexity = math.exp(loss)
    log(f"held-out perplexity: {perplexity:.3f} ({rows.size - len(rows)} tokens of {text})")
  hf_io.save_hf(target, params, out, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite)
  seconds = time.time() - start
  summary = {"size": str(size), "out": str(out), "small_anchor": str(path_s),
             "large_anchor": str(path_l), "alpha": alpha, "alpha_sweep": sweep,
             "num_params": num_params(target), "config": target.to_dict(),
             "perplexity": perplexity, "seconds": seconds, **kwargs, "renormalize": renormalize}
  (out / "cbd_init.json").write_text(json.dumps(summary, indent=2) + "\n")
  log(f"wrote {out} ({sizing.format_count(num_params(target))} params) in {seconds:.1f} s")
  return summary
