"""Calibration rows of `init_model`: the first training batches of a chain's data, or of
``--calib_text``, read through the training data path (`data.make_train_data`,
`data.calibration_rows`), so every source a chain trains on (text, jsonl or parquet files, a hub
dataset) calibrates as it trains, and none is ever read as raw lines.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from cbd_jax import data

DEFAULT_SEQ_LEN = 128  # Rows of --calib_text (a chain's own text uses its link's rows).
_DATA = {"text_field": "text", "seed": 0}


@dataclasses.dataclass(frozen=True)
class Source:
  """Where calibration rows come from: a data config (``data.*`` of a chain), the batches of one
  link (seq_len, batch_size, microbatches) and the token cache of its training run."""

  data: dict
  link: dict
  cache_dir: str | None
  name: str  # The text, for logs and the summary.


def of_chain(chain_dir: Path, doc: dict, anchor_names) -> Source | None:
  """The chain's own training data, in the batches of the last link (in chain order: the
  smallest) that trained one of ``anchor_names`` (the first link when none did); None when the
  manifest records no training data (a manifest not written by train_chain)."""
  config = doc.get("config") or {}
  train = (config.get("data") or {}).get("train")
  if not train:
    return None
  links = [dict(link) for link in config.get("chain") or ()]
  named = [x for x in links if x.get("name") in set(anchor_names)]
  link = named[-1] if named else (links[0] if links else {})
  cache = config["data"].get("cache_dir") or str(Path(chain_dir) / "data_cache")
  return Source({**_DATA, **config["data"]}, _batches(link), cache, str(train))


def of_text(calib_text: str, doc: dict | None) -> Source:
  """``--calib_text`` (files or a hub dataset name), streamed from its start in rows of
  `DEFAULT_SEQ_LEN`; a chain's text field and hub split apply to it as to the chain's data."""
  chain_data = ((doc or {}).get("config") or {}).get("data") or {}
  files = data.resolve_files(calib_text)
  field = "text" if files and Path(files[0]).suffix in (".txt", ".text") else (
      chain_data.get("text_field") or "text")
  spec = {**_DATA, "train": calib_text, "text_field": field, "streaming": True,
          "hub_split": chain_data.get("hub_split") or "train", "shuffle_buffer": 1000}
  return Source(spec, _batches({}), None, str(calib_text))


def _batches(link: dict) -> dict:
  return {"seq_len": int(link.get("seq_len") or DEFAULT_SEQ_LEN),
          "batch_size": int(link.get("batch_size") or 1),
          "microbatches": int(link.get("microbatches") or 1)}


def check_apart(source: Source, text: str | os.PathLike) -> None:
  """Calibration never reads the held-out ``text``: a one-line ValueError when its source
  includes that file."""
  files = data.resolve_files(source.data["train"])
  held = Path(text).resolve()
  if files and held in {Path(f).resolve() for f in files}:
    raise ValueError(f"the calibration text {source.name} includes the held-out --text {text}; "
                     "calibration never reads the held-out text: pass another --text or "
                     "--calib_text")


def load_rows(source: Source, tokenizer, tokens: int, positions: int | None = None
              ) -> np.ndarray:
  """Rows [N, seq_len + 1], at least ``tokens`` predicted tokens, of the source's first training
  batches, tokenised by ``tokenizer``, seq_len at most ``positions``; a source that cannot be
  read is a one-line ValueError."""
  import ml_collections

  spec = dict(source.data, stream_snapshot_every=2**62)  # Never writes stream positions.
  link = SimpleNamespace(**source.link)
  link.seq_len = min(link.seq_len, positions or link.seq_len)
  with tempfile.TemporaryDirectory(prefix="cbd-calib-") as tmp:
    try:
      train = data.make_train_data(ml_collections.ConfigDict(spec), tokenizer, link.seq_len,
                                   source.cache_dir or tmp)
      return data.calibration_rows(train, link, tokens)
    except OSError as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else ""
      raise ValueError(f"calibration text {source.name}: cannot be read ({type(e).__name__}: "
                       f"{first}); pass --calib_text with a local text, jsonl or parquet file"
                       ) from None
