"""Text -> packed token batches whose order depends only on (seed, step).

Documents are read through ``datasets`` (local text / jsonl / parquet files, or a hub dataset
name, streamed), tokenised with the link's tokenizer, joined with EOS and cut into sequences of
``seq_len + 1`` tokens (inputs ``ids = s[:-1]``, next-token ``labels = s[1:]``).

Local sources are tokenised once into a flat token file (cached under ``cache_dir``, keyed by the
files and the tokenizer); global sequence g = step * M * B + j is then sequence
``perm_epoch[g mod N]`` with ``perm_epoch`` a permutation seeded by (seed, epoch). A resumed run
asks for batch ``step`` and gets exactly what an uninterrupted run would have: nothing repeated,
nothing skipped. Each process reads only its rows ``[h B / P, (h + 1) B / P)`` of every
microbatch. Streamed sources are split between processes by ``datasets``, shuffled with a seeded
buffer and packed in stream order; resuming at step s re-reads (and drops) the first s batches.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
Batch = dict[str, np.ndarray]
_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json",
             ".parquet": "parquet"}


def _unique() -> str:
  """host.pid: names a temporary file no other process (on any host) writes at the same time."""
  return f"{socket.gethostname()}.{os.getpid()}"


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


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
  """Token ids of each document followed by EOS (when the tokenizer has one)."""
  eos = tokenizer.eos_token_id
  ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
  return [x + [eos] if eos is not None else x for x in ids]


def _documents(ds, text_field: str, batch_size: int = 1000) -> Iterator[list[str]]:
  for rows in ds.iter(batch_size=batch_size):
    yield [t for t in rows[text_field] if t and t.strip()]


def load_tokens(source: str, tokenizer, cache_dir: str | os.PathLike,
                text_field: str = "text") -> np.ndarray:
  """All documents of local ``source`` as one flat uint32 token array, cached on disk."""
  files = resolve_files(source)
  if files is None:
    raise ValueError(f"{source}: a hub dataset is streamed; set data.streaming=True")
  stamp = [(os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)) for f in files]
  key = hashlib.sha256(json.dumps([stamp, text_field, tokenizer_fingerprint(tokenizer)])
                       .encode()).hexdigest()[:20]
  path = Path(cache_dir) / f"tokens-{key}.npy"
  if path.exists():
    return np.load(path, mmap_mode="r")
  log.info("tokenising %s into %s", source, path)
  ds = load_documents(source, text_field)
  chunks = []
  for texts in _documents(ds, text_field):
    ids = _encode(tokenizer, texts)
    if ids:
      chunks.append(np.fromiter((t for x in ids for t in x), np.uint32))
  tokens = np.concatenate(chunks) if chunks else np.zeros((0,), np.uint32)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f"{path.name}.{_unique()}.part")
  with open(tmp, "wb") as f:
    np.save(f, tokens)
  os.replace(tmp, path)  # Whole or absent: a crash never leaves a truncated cache.
  return np.load(path, mmap_mode="r")


def _split_rows(rows: int, process_index: int, process_count: int) -> slice:
  if rows % process_count:
    raise ValueError(f"batch of {rows} sequences does not split over {process_count} processes; "
                     "make the batch size a multiple of the process count")
  per = rows // process_count
  return slice(process_index * per, (process_index + 1) * per)


def to_batch(seqs_MxBxS: np.ndarray) -> Batch:
  """Packed sequences [..., T + 1] -> ids, labels [..., T] (int32) and an all-ones mask."""
  seqs = np.asarray(seqs_MxBxS, np.int32)
  ids, labels = seqs[..., :-1], seqs[..., 1:]
  return {"ids": ids, "labels": labels, "mask": np.ones(ids.shape, np.float32)}


class PackedTokens:
  """Fixed-length sequences over a flat token array, in a (seed, epoch)-seeded order."""

  def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, rows: slice | None = None):
    self.seq_len, self.seed = seq_len, seed
    total = len(tokens) // (seq_len + 1)
    self.sequences = tokens[: total * (seq_len + 1)].reshape(total, seq_len + 1)
    if rows is not None:
      self.sequences = self.sequences[rows]
    if len(self.sequences) == 0:
      raise ValueError(f"{len(tokens)} tokens do not fill one sequence of {seq_len + 1}; give "
                       "more text or a shorter sequence length")
    self._perm: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return len(self.sequences)

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._perm:
      self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self))}
    return self._perm[epoch]

  def indices(self, step: int, microbatches: int, batch_size: int, process_index: int = 0,
              process_count: int = 1) -> np.ndarray:
    """Sequence indices [M, B / P] of this process's rows of global batch ``step``."""
    rows = np.arange(microbatches * batch_size).reshape(microbatches, batch_size)
    g = step * microbatches * batch_size + rows[:, _split_rows(batch_size, process_index,
                                                                process_count)]
    n = len(self)
    out = np.empty_like(g)
    for epoch in np.unique(g // n):
      where = g // n == epoch
      out[where] = self._permutation(int(epoch))[g[where] % n]
    return out

  def batch(self, step: int, microbatches: int, batch_size: int, process_index: int = 0,
            process_count: int = 1) -> Batch:
    """This process's slice [M, B / P, T] of global training batch ``step``."""
    idx = self.indices(step, microbatches, batch_size, process_index, process_count)
    return to_batch(self.sequences[idx.reshape(-1)].reshape(*idx.shape, -1))

  def in_order(self, batch_size: int, num_batches: int, process_index: int = 0,
               process_count: int = 1) -> list[Batch]:
    """Evaluation batches [B / P, T]: the first sequences, in file order, same on every call."""
    num_batches = min(num_batches, len(self) // batch_size)
    if num_batches == 0:
      raise ValueError(f"held-out text has {len(self)} sequences, fewer than one batch of "
                       f"{batch_size}; give more held-out text or a smaller eval batch")
    rows = _split_rows(batch_size, process_index, process_count)
    return [to_batch(self.sequences[i * batch_size: (i + 1) * batch_size][rows])
            for i in range(num_batches)]


def pack_stream(ds, tokenizer, seq_len: int, text_field: str = "text") -> Iterator[np.ndarray]:
  """Sequences of seq_len + 1 tokens cut from the documents of ``ds`` in stream order."""
  buf: list[int] = []
  for texts in _documents(ds, text_field, batch_size=64):
    for ids in _encode(tokenizer, texts):
      buf.extend(ids)
      while len(buf) >= seq_len + 1:
        yield np.asarray(buf[: seq_len + 1], np.uint32)
        del buf[: seq_len + 1]


class StreamedTokens:
  """Packed sequences from a streamed dataset: seeded shuffle buffer, one slice per process."""

  def __init__(self, ds, tokenizer, seq_len: int, seed: int, text_field: str = "text",
               process_index: int = 0, process_count: int = 1, shuffle_buffer: int = 10_000):
    from datasets.distributed import split_dataset_by_node

    self.ds = split_dataset_by_node(ds, rank=process_index, world_size=process_count)
    self.tokenizer, self.seq_len, self.seed = tokenizer, seq_len, seed
    self.text_field, self.shuffle_buffer = text_field, shuffle_buffer
    self.process_count = process_count
    self._iter, self._next_step = None, 0

  def _sequences(self) -> Iterator[np.ndarray]:
    epoch = 0
    while True:
      ds = self.ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
      ds.set_epoch(epoch)
      empty = True
      for seq in pack_stream(ds, self.tokenizer, self.seq_len, self.text_field):
        empty = False
        yield seq
      if empty:
        raise ValueError("the streamed dataset yielded no complete sequence")
      epoch += 1

  def batch(self, step: int, microbatches: int, batch_size: int, process_index: int = 0,
            process_count: int = 1) -> Batch:
    """This process's [M, B / P, T] for ``step``; steps must be asked for in increasing order."""
    del process_index
    per = batch_size // process_count
    _split_rows(batch_size, 0, process_count)
    if self._iter is None or step < self._next_step:
      self._iter, self._next_step = self._sequences(), 0
    while self._next_step < step:  # Resume: re-read and drop the batches already trained on.
      for _ in range(microbatches * per):
        next(self._iter)
      self._next_step += 1
    seqs = np.stack([next(self._iter) for _ in range(microbatches * per)])
    self._next_step += 1
    return to_batch(seqs.reshape(microbatches, per, -1))


def make_train_data(data_cfg, tokenizer, seq_len: int, cache_dir: str | os.PathLike,
                    process_index: int = 0, process_count: int = 1):
  """Training sequences: PackedTokens for local files, StreamedTokens when streaming."""
  seed = int(data_cfg.seed)
  if data_cfg.get("streaming", False) or resolve_files(data_cfg.train) is None:
    ds = load_documents(data_cfg.train, data_cfg.text_field, data_cfg.get("hub_split", "train"),
                        True, data_cfg.get("hub_config") or None)
    return StreamedTokens(ds, tokenizer, seq_len, seed, data_cfg.text_field, process_index,
                          process_count, data_cfg.get("shuffle_buffer", 10_000))
  tokens = load_tokens(data_cfg.train, tokenizer, cache_dir, data_cfg.text_field)
  packed = PackedTokens(tokens, seq_len, seed)
  if not data_cfg.get("heldout"):  # The held-out tail of the training text is never trained on.
    held = heldout_size(len(packed), data_cfg.get("heldout_fraction", 0.01))
    packed = PackedTokens(tokens, seq_len, seed, slice(0, len(packed) - held))
  return packed


def heldout_size(num_sequences: int, fraction: float) -> int:
  """Sequences kept back from the end of the training text: max(1, fraction * N)."""
  return max(1, int(num_sequences * fraction))


def make_eval_batches(data_cfg, tokenizer, seq_len: int, batch_size: int, num_batches: int,
                      cache_dir: str | os.PathLike, process_index: int = 0,
                      process_count: int = 1) -> list[Batch]:
  """Held-out batches: the ``heldout`` files or hub dataset (its first sequences, in order),
  else the tail of the (local) training text."""
  heldout = data_cfg.get("heldout")
  if heldout and resolve_files(heldout) is None:
    ds = load_documents(heldout, data_cfg.text_field, data_cfg.get("heldout_split", "validation"),
                        True, data_cfg.get("heldout_config") or None)
    seqs = []
    for seq in pack_stream(ds, tokenizer, seq_len, data_cfg.text_field):
      seqs.append(seq)
      if len(seqs) == batch_size * num_batches:
        break
    packed = PackedTokens(np.concatenate(seqs) if seqs else np.zeros(0, np.uint32), seq_len, 0)
  elif heldout:
    tokens = load_tokens(heldout, tokenizer, cache_dir, data_cfg.text_field)
    packed = PackedTokens(tokens, seq_len, 0)
  else:
    if resolve_files(data_cfg.train) is None:
      raise ValueError("a streamed training set needs held-out text: set data.heldout")
    tokens = load_tokens(data_cfg.train, tokenizer, cache_dir, data_cfg.text_field)
    n = len(tokens) // (seq_len + 1)
    held = heldout_size(n, data_cfg.get("heldout_fraction", 0.01))
    packed = PackedTokens(tokens, seq_len, 0, slice(n - held, n))
  return packed.in_order(batch_size, num_batches, process_index, process_count)


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
  tmp = out_dir.with_name(f"{out_dir.name}.{_unique()}.part")
  tok.save_pretrained(str(tmp))
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  try:
    os.replace(tmp, out_dir)
  except OSError:  # Another process finished the same tokenizer first: keep theirs.
    shutil.rmtree(tmp, ignore_errors=True)
  return AutoTokenizer.from_pretrained(str(out_dir))
