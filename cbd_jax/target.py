"""`init_target`: a model of any size between two anchors, written as a Hugging Face folder.

Anchors come from a finished chain (its ``chain.json`` manifest: the two adjacent anchors with
status "done" whose parameter counts bracket the size) or from two HF folders given directly.
No teacher and no source model are loaded.
"""

from __future__ import annotations

import glob
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from cbd_jax import calibrate, heldout, hf_io, manifest, sizing
from cbd_jax.config import num_params

MANIFEST = manifest.MANIFEST


def pick_anchors(chain_dir: str | Path, size: str | int, use_source: bool = False
                 ) -> tuple[Path, Path]:
  """(small, large) anchor folders of a chain: adjacent "done" anchors bracketing ``size``."""
  chain_dir = Path(chain_dir)
  if not (chain_dir / MANIFEST).exists():
    raise FileNotFoundError(f"{chain_dir / MANIFEST} not found; build the chain first (python "
                            "launch/train_chain.py), pass --chain DIR, or pass --anchors A,B")
  doc = manifest.read(chain_dir)
  entries = manifest.done_anchors(doc)
  if use_source:
    entries.append({"name": "source", **doc["source"]})
  found = sorted((int(e["num_params"]), chain_dir / e["path"], e.get("name", e["path"]))
                 for e in entries)
  if len(found) < 2:
    raise ValueError(f"{chain_dir / MANIFEST}: {len(found)} finished anchor(s), interpolation "
                     "needs two; let the chain finish more anchors or pass --anchors A,B")
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


def chain_folders(chain_dir: Path) -> tuple[list[Path], Path | None]:
  """(every anchor folder listed in the chain's manifest, the chain's local training text file or
  None): what init_model must never overwrite, and what it calibrates on by default."""
  doc = manifest.read(chain_dir)
  folders = [chain_dir / a["path"] for a in doc["anchors"]] + [Path(doc["source"]["path"])]
  train = str((doc.get("config") or {}).get("data", {}).get("train", ""))
  files = sorted(glob.glob(train)) if train else []
  return folders, (Path(files[0]) if files and Path(files[0]).is_file() else None)


def _check_out(out: Path, protected: list[Path], overwrite: bool) -> None:
  """Refuses an ``out`` that is a file, an anchor or source of the chain, or a non-empty folder
  (unless ``overwrite``)."""
  if out.exists() and not out.is_dir():
    raise FileExistsError(f"{out} is a file; pass an --out folder path")
  resolved = out.resolve()
  for folder in protected:
    if resolved == folder.resolve():
      raise FileExistsError(f"{out} is a model of the chain ({folder}); choose another --out")
  if out.exists() and any(out.iterdir()) and not overwrite:
    raise FileExistsError(f"{out}: folder exists and is not empty; choose another --out or pass "
                          "--overwrite")


def _resolve(size, chain, anchors, use_source):
  """(small folder, large folder, chain folder or None) from --anchors or the chain."""
  if anchors:
    if isinstance(anchors, str):
      anchors = [a for a in anchors.split(",") if a]
    if len(anchors) != 2:
      raise ValueError(f"--anchors takes two folders separated by a comma, got {len(anchors)}")
    return Path(anchors[0]), Path(anchors[1]), None
  chain = Path(chain or "runs/smollm2_chain")
  return (*pick_anchors(chain, size, use_source), chain)


def _load_anchor(path: Path, chain_dir: Path | None):
  """(config, params) of an anchor: finite weights, and the model its chain's manifest records."""
  config, params = hf_io.load_hf(str(path))
  if chain_dir is not None:
    recorded = manifest.recorded_configs(chain_dir, manifest.read(chain_dir))
    manifest.check_recorded(path, config, recorded.get(Path(path).resolve()))
  hf_io.check_finite(params, path)
  return config, params


def _tokenizer(paths):
  folder = next((p for p in paths if _has_tokenizer(p)), None)
  return hf_io.load_tokenizer(str(folder)) if folder else None


def _measure(models: dict, rows, text, log) -> dict[str, float]:
  """{name: held-out perplexity} of (config, params) models on the same token rows."""
  out = {}
  for name, (config, params) in models.items():
    out[name] = math.exp(min(heldout.mean_nll(config, params, rows), 50.0))
  log("held-out perplexity on " + f"{rows[:, 1:].size} tokens of {text}: " +
      ", ".join(f"{name} {ppl:,.2f}" for name, ppl in out.items()))
  return out


def init_target(size: str | int, chain: str | Path | None = None, anchors=None,
                out: str | Path | None = None, recipe: calibrate.Recipe | None = None,
                text: str | Path | None = None, calib_text: str | Path | None = None,
                calib_tokens: int = 2048, eval_tokens: int = 8192, seq_len: int = 256,
                dtype: str | None = None, overwrite: bool = False, use_source: bool = False,
                log: Callable[[str], None] = print) -> dict:
  """Makes a ``size`` model from two anchors (`calibrate.make_target`), saves it to ``out`` and
  returns a summary. ``anchors`` (two folders) takes precedence over ``chain``. Calibration reads
  ``calib_text`` (default: the chain's training text), never ``text``, on which the target and
  both anchors are measured (first ``eval_tokens`` tokens)."""
  start = time.time()
  recipe = recipe or calibrate.Recipe()
  path_a, path_b, chain_dir = _resolve(size, chain, anchors, use_source)
  protected, chain_text = chain_folders(chain_dir) if chain_dir else ([path_a, path_b], None)
  out = Path(out) if out else (chain_dir or path_a.parent) / "targets" / str(size)
  _check_out(out, protected + [path_a, path_b], overwrite)
  loaded = sorted([(_load_anchor(p, chain_dir), p) for p in (path_a, path_b)],
                  key=lambda x: num_params(x[0][0]))
  (small, path_s), (large, path_l) = loaded
  target = sizing.resolve_size(size, small[0], large[0])
  log(f"small anchor: {path_s}: {sizing.describe(small[0])}")
  log(f"large anchor: {path_l}: {sizing.describe(large[0])}")
  log(f"target {size}: {sizing.describe(target)}")
  tokenizer = _tokenizer((path_s, path_l))
  if (text or calib_text) and tokenizer is None:
    raise ValueError(f"--text and --calib_text need a tokenizer, and neither {path_s} nor "
                     f"{path_l} has one; add the tokenizer files to an anchor folder")
  calib_text = calib_text or (chain_text if recipe.method == "cbd" else None)
  eval_rows = heldout.load_token_rows(tokenizer, text, eval_tokens, seq_len) if text else None
  calib_rows = (heldout.load_token_rows(tokenizer, calib_text, calib_tokens, min(seq_len, 128))
                if calib_text and recipe.method == "cbd" else None)
  params, info = calibrate.make_target(small, large, target, recipe, calib_rows, log)
  perplexity = None
  if eval_rows is not None:
    ppl = _measure({"small anchor": small, "target": (target, params), "large anchor": large},
                   eval_rows, text, log)
    perplexity = ppl["target"]
  hf_io.save_hf(target, params, out, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite)
  seconds = time.time() - start
  summary = {"size": str(size), "out": str(out), "small_anchor": str(path_s),
             "large_anchor": str(path_l), **info, "calib_text": str(calib_text or ""),
             "num_params": num_params(target), "config": target.to_dict(),
             "perplexity": perplexity, "anchor_perplexity": ppl if perplexity else None,
             "seconds": seconds}
  (out / "cbd_init.json").write_text(json.dumps(summary, indent=2) + "\n")
  log(f"wrote {out} ({sizing.format_count(num_params(target))} params) in {seconds:.1f} s")
  return summary
