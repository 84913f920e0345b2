"""Documents in, token ids out: local text / jsonl / parquet files or a hub dataset, read
through ``datasets``, each document encoded and followed by EOS; the keys that say which tokens a
source gives (`tokenizer_fingerprint`, `training_tokens_key`); the BPE tokenizer of a random
smoke source.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json",
             ".parquet": "parquet"}


def resolve_files(source: str | Sequence[str]) -> list[str] | None:
  """Local files named by a path, a glob or a comma-separated list; None for a hub name."""
  parts = [p.strip() for p in (source.split(",") if isinstance(source, str) else source)]
  files = []
  for part in parts:
    matches = sorted(glob.glob(os.path.expanduser(part)))
    files.extend(matches if matches else [part])
  if all(os.path.exists(f) for f in files):
    for f in files:
      if Path(f).suffix not in _BUILDERS:
        raise ValueError(f"{f}: unknown data file type; use one of {sorted(_BUILDERS)}")
    return files
  if len(parts) == 1 and "/" in parts[0] and not os.path.exists(os.path.dirname(parts[0]) or "."):
    return None  # "org/name": a hub dataset.
  missing = [f for f in files if not os.path.exists(f)]
  raise FileNotFoundError(f"data files not found: {missing}; give local text/jsonl/parquet "
                          "files or a hub dataset name like 'org/name'")


def load_documents(source: str, text_field: str = "text", split: str = "train",
                   streaming: bool = False, hub_config: str | None = None):
  """A ``datasets`` dataset of documents (local files or a hub name, which is always streamed)."""
  import datasets

  files = resolve_files(source)
  if files is None:
    return datasets.load_dataset(source, hub_config, split=split, streaming=True)
  builder = _BUILDERS[Path(files[0]).suffix]
  if any(_BUILDERS[Path(f).suffix] != builder for f in files):
    raise ValueError(f"data files mix formats: {files}; give files of one type")
  ds = datasets.load_dataset(builder, data_files={"train": files}, split="train",
                             streaming=streaming)
  if builder != "text" and text_field not in (ds.column_names or [text_field]):
    raise ValueError(f"{source}: no column {text_field!r} (columns: {ds.column_names}); set "
                     "data.text_field")
  return ds


def tokenizer_fingerprint(tokenizer) -> str:
  """A short hash of the tokenizer's vocabulary and rules."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab()))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
  """Token ids of each document followed by EOS (when the tokenizer has one)."""
  if not texts:
    return []
  eos = tokenizer.eos_token_id
  ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
  return [x + [eos] if eos is not None else x for x in ids]


def nonblank(texts: list[str | None]) -> list[str]:
  return [t for t in texts if t and t.strip()]


def encode_rows(tokenizer, text_field: str, rows: dict) -> list[list[int]]:
  """Token ids of the non-blank documents of a batch of rows (picklable for worker processes)."""
  return encode(tokenizer, nonblank(rows[text_field]))


def iter_documents(ds, text_field: str, batch_size: int = 1000) -> Iterator[list[str]]:
  for rows in ds.iter(batch_size=batch_size):
    yield nonblank(rows[text_field])


def hash_key(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def stamp(files: Sequence[str]) -> list:
  return [(os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)) for f in files]


# Data fields that do not change which tokens a link trains on: where and how fast they are made,
# and which text is held out (never trained on; only whether one is given matters).
_NOT_TRAINING_TOKENS = ("cache_dir", "cache_shared", "tokenize_workers", "tokenize_timeout_s",
                        "stream_snapshot_every", "heldout", "heldout_config", "heldout_split")


def training_tokens_key(data_cfg) -> dict:
  """What decides the training tokens, by content: the data fields that change them, with local
  training files as [path, size, mtime] (an edited file changes it) and the held-out text as
  whether one is given (without one, the training text's tail is held out)."""
  fields = {k: v for k, v in data_cfg.to_dict().items() if k not in _NOT_TRAINING_TOKENS}
  files = resolve_files(data_cfg.train)
  if files is not None:  # Local files (read whole or streamed); a hub name stays as it is.
    fields["train"] = stamp(files)
  fields["heldout_given"] = bool(data_cfg.get("heldout"))
  return json.loads(json.dumps(fields, default=str))


def train_bpe_tokenizer(files: Sequence[str], vocab_size: int, out_dir: str | os.PathLike):
  """A byte-level BPE tokenizer trained on ``files`` (EOS "<|endoftext|>"), cached in out_dir."""
  from transformers import AutoTokenizer, PreTrainedTokenizerFast

  out_dir = Path(out_dir)
  if (out_dir / "tokenizer.json").exists():
    return AutoTokenizer.from_pretrained(str(out_dir))
  import tokenizers

  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train([str(f) for f in files], vocab_size=vocab_size, min_frequency=2,
            special_tokens=["<|endoftext|>"], show_progress=False)
  tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                bos_token=None, pad_token="<|endoftext|>")
  tmp = out_dir.with_name(f"{out_dir.name}.{socket.gethostname()}.{os.getpid()}.part")
  tok.save_pretrained(str(tmp))
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  try:
    os.replace(tmp, out_dir)
  except OSError:  # Another process finished the same tokenizer first: keep theirs.
    shutil.rmtree(tmp, ignore_errors=True)
  return AutoTokenizer.from_pretrained(str(out_dir))
