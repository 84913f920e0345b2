"""`init_target`: a model of any size between two anchors, written as a Hugging Face folder.

Anchors come from a finished chain (its ``chain.json`` manifest: the two adjacent anchors with
status "done" whose parameter counts bracket the size) or from two HF folders given directly.
No teacher is called: the anchors are the only models loaded (with ``use_source`` the chain's
source may be one of them, as the largest anchor).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from cbd_jax.checkpoints import hf_io, manifest
from cbd_jax.data import calibration
from cbd_jax.evaluation import heldout
from cbd_jax.interpolation import calibrate, sizing
from cbd_jax.model.config import num_params

MANIFEST = manifest.MANIFEST
DEFAULT_SEQ_LEN = 256  # Held-out rows of --text.


def pick_anchors(chain_dir: str | Path, size: str | int, use_source: bool = False
                 ) -> tuple[Path, Path]:
  """(small, large) anchor folders of a chain: adjacent "done" anchors bracketing ``size``."""
  chain_dir = Path(chain_dir)
  if not (chain_dir / MANIFEST).exists():
    raise FileNotFoundError(f"{chain_dir / MANIFEST} not found; build the chain first (python "
                            "launch/train_chain.py), pass --chain DIR, or pass --anchors A,B")
  doc = manifest.read(chain_dir)
  found = [(int(e["num_params"]), chain_dir / e["path"], e["name"])
           for e in manifest.done_anchors(doc)]
  if use_source:  # As train_chain read it: a hub id, or a path from the current folder.
    found.append((int(doc["source"]["num_params"]), Path(doc["source"]["path"]), "source"))
  found.sort(key=lambda x: x[0])
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


def chain_folders(chain_dir: Path) -> list[Path]:
  """Every anchor folder listed in the chain's manifest and its source: what init_model must
  never overwrite."""
  doc = manifest.read(chain_dir)
  return [chain_dir / a["path"] for a in doc["anchors"]] + [Path(doc["source"]["path"])]


def _anchor_names(chain_dir: Path, doc: dict, folders) -> list[str]:
  """Names of the chain's anchors among ``folders``."""
  wanted = {Path(f).resolve() for f in folders}
  return [a["name"] for a in doc["anchors"] if (chain_dir / a["path"]).resolve() in wanted]


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


def _tokenizer(paths, needed_for: str | None):
  """The first anchor folder's tokenizer; a one-line ValueError when ``needed_for`` names what
  needs one and no anchor folder has one."""
  folder = next((p for p in paths if _has_tokenizer(p)), None)
  if folder is None and needed_for:
    raise ValueError(f"{needed_for} needs a tokenizer, and neither {paths[0]} nor {paths[1]} has "
                     "one; add the tokenizer files to an anchor folder, or pass --method paper "
                     "and no --text")
  return hf_io.load_tokenizer(str(folder)) if folder else None


def _positions(configs) -> int | None:
  """The fewest learned positions (GPT-2) of ``configs``; None when none has a position table."""
  return min((c.max_position_embeddings for c in configs if c.is_gpt2), default=None)


def _eval_seq_len(seq_len: int | None, limit: int | None, log) -> int:
  """--seq_len within the models' learned positions: by default the smaller of 256 and the
  positions (with a notice); a longer explicit one is a one-line ValueError."""
  if seq_len is None:
    seq_len = DEFAULT_SEQ_LEN
    if limit is not None and limit < seq_len:
      log(f"held-out rows of {limit} tokens, the anchors' learned positions (not "
          f"{DEFAULT_SEQ_LEN})")
      seq_len = limit
  elif limit is not None and seq_len > limit:
    raise ValueError(f"--seq_len {seq_len} is longer than the anchors' {limit} learned positions "
                     f"(GPT-2 max_position_embeddings); pass --seq_len {limit} or less")
  return seq_len


def _calibration(chain_dir, doc, calib_text, recipe, text, folders, log):
  """The calibration source (`data.calibration`): ``calib_text``, else the chain's training data in
  the batches of the smaller anchor's link; None (with a notice) when there is none or the
  recipe calibrates nothing."""
  if recipe.method != "cbd":
    return None
  if calib_text:
    source = calibration.of_text(str(calib_text), doc)
  elif doc is not None:
    source = calibration.of_chain(chain_dir, doc, _anchor_names(chain_dir, doc, folders))
  else:
    source = None
  if source is None:
    where = (f"{chain_dir / MANIFEST} records no training data" if doc is not None else
             "--anchors without --calib_text")
    log(f"no calibration text ({where}): alpha from parameter counts, evenly spread layers")
  elif text:
    calibration.check_apart(source, text)
  return source


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
                calib_tokens: int = 2048, eval_tokens: int = 8192, seq_len: int | None = None,
                dtype: str | None = None, overwrite: bool = False, use_source: bool = False,
                shape: str = "auto", log: Callable[[str], None] = print) -> dict:
  """Makes a ``size`` model from two anchors (`calibrate.make_target`), saves it to ``out`` and
  returns a summary. ``anchors`` (two folders) takes precedence over ``chain``. Calibration reads
  the first training batches of ``calib_text`` (default: the chain's training data;
  `data.calibration`), never ``text``, on which the target and both anchors are measured (first
  ``eval_tokens`` tokens, rows of ``seq_len``, default 256 within GPT-2's positions). ``shape``
  (`sizing.target_shapes`): "auto" makes the target on the line between the anchors and on the
  large anchor's width and keeps the one with the lower calibration loss."""
  start = time.time()
  recipe = recipe or calibrate.Recipe()
  path_a, path_b, chain_dir = _resolve(size, chain, anchors, use_source)
  doc = manifest.read(chain_dir) if chain_dir else None
  protected = chain_folders(chain_dir) if chain_dir else [path_a, path_b]
  out = Path(out) if out else (chain_dir or path_a.parent) / "targets" / str(size)
  _check_out(out, protected + [path_a, path_b], overwrite)
  calib = _calibration(chain_dir, doc, calib_text, recipe, text, (path_a, path_b), log)
  needed = " and ".join(w for w, on in (("calibration", calib), ("--text", text)) if on)
  tokenizer = _tokenizer((path_a, path_b), needed or None)
  loaded = sorted([(_load_anchor(p, chain_dir), p) for p in (path_a, path_b)],
                  key=lambda x: num_params(x[0][0]))
  (small, path_s), (large, path_l) = loaded
  shapes = sizing.target_shapes(size, small[0], large[0], shape)
  positions = _positions((small[0], large[0], *shapes))
  seq_len = _eval_seq_len(seq_len, positions, log) if text else seq_len
  log(f"small anchor: {path_s}: {sizing.describe(small[0])}")
  log(f"large anchor: {path_l}: {sizing.describe(large[0])}")
  log(f"target {size}: " + " or ".join(sizing.describe(t) for t in shapes))
  eval_rows = heldout.load_token_rows(tokenizer, text, eval_tokens, seq_len) if text else None
  calib_rows = (calibration.load_rows(calib, tokenizer, calib_tokens, positions) if calib
                else None)
  if calib_rows is not None:
    log(f"calibration: {calib_rows[:, 1:].size} tokens of {calib.name}")
  target, params, info = calibrate.make_sized_target(small, large, shapes, recipe, calib_rows,
                                                     log)
  perplexity = None
  if eval_rows is not None:
    ppl = _measure({"small anchor": small, "target": (target, params), "large anchor": large},
                   eval_rows, text, log)
    perplexity = ppl["target"]
  hf_io.save_hf(target, params, out, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite)
  seconds = time.time() - start
  summary = {"size": str(size), "out": str(out), "small_anchor": str(path_s),
             "large_anchor": str(path_l), **info, "calib_text": calib.name if calib else "",
             "num_params": num_params(target), "config": target.to_dict(),
             "perplexity": perplexity, "anchor_perplexity": ppl if perplexity else None,
             "seconds": seconds}
  (out / "cbd_init.json").write_text(json.dumps(summary, indent=2) + "\n")
  log(f"wrote {out} ({sizing.format_count(num_params(target))} params) in {seconds:.1f} s")
  return summary
