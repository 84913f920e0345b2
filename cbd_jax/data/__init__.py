"""Text -> packed token batches whose order depends only on (seed, step).

Documents are read through ``datasets`` (local text / jsonl / parquet files, or a hub dataset
name, streamed), tokenised with the link's tokenizer, joined with EOS and cut into sequences of
``seq_len + 1`` tokens (inputs ``ids = s[:-1]``, next-token ``labels = s[1:]``).

Local sources are tokenised once per (files, tokenizer) by parallel worker processes into token
shards under ``cache_dir`` (``token_shards``: uint16/uint32 files plus an ``index.json`` written
last). Process 0 writes them; the other processes wait for the index on the shared filesystem
(``data.cache_shared=False`` makes every process build its own). Reads are memory-mapped, so no
process holds the corpus in memory. Global sequence g = step * M * B + j is sequence
``perm_epoch[g mod N]`` with ``perm_epoch`` a permutation seeded by (seed, epoch). A resumed run
asks for batch ``step`` and gets exactly what an uninterrupted run would have: nothing repeated,
nothing skipped. Each process reads only its rows ``[h B / P, (h + 1) B / P)`` of every
microbatch.

Streamed sources are split between processes by ``datasets``, cut into windows of
``shuffle_buffer`` documents each permuted by (seed, epoch, window), and packed in that order.
Every ``stream_snapshot_every`` batches the stream's position (the dataset's ``state_dict`` at
the window's start, the group of documents within it and the leftover tokens) is saved as a small
JSON file under ``cache_dir/stream_state``; a fresh process asked for batch s starts from the
newest snapshot at or before s, so resuming costs at most one window and a few batches, not s
batches, and gives the batches of an uninterrupted stream.
"""

from __future__ import annotations

import dataclasses
import functools
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

from cbd_jax.data import token_shards

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
  if not texts:
    return []
  eos = tokenizer.eos_token_id
  ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
  return [x + [eos] if eos is not None else x for x in ids]


def _nonblank(texts: list[str | None]) -> list[str]:
  return [t for t in texts if t and t.strip()]


def _encode_rows(tokenizer, text_field: str, rows: dict) -> list[list[int]]:
  """Token ids of the non-blank documents of a batch of rows (picklable for worker processes)."""
  return _encode(tokenizer, _nonblank(rows[text_field]))


def _documents(ds, text_field: str, batch_size: int = 1000) -> Iterator[list[str]]:
  for rows in ds.iter(batch_size=batch_size):
    yield _nonblank(rows[text_field])


def _hash(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def _stamp(files: Sequence[str]) -> list:
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
    fields["train"] = _stamp(files)
  fields["heldout_given"] = bool(data_cfg.get("heldout"))
  return json.loads(json.dumps(fields, default=str))


def load_tokens(source: str, tokenizer, cache_dir: str | os.PathLike, text_field: str = "text",
                *, process_index: int = 0, shared: bool = True, workers: int = 0,
                timeout_s: float = 6 * 3600,
                block_bytes: int = 64 << 20) -> token_shards.TokenShards:
  """All documents of local ``source`` as one flat token stream, tokenised once into shards.

  Process 0 (every process when not ``shared``) tokenises with ``workers`` processes (0: one per
  core, fewer for a small corpus) into ``cache_dir/tokens-v2-<key>``; the others wait up to
  ``timeout_s`` for it.
  """
  files = resolve_files(source)
  if files is None:
    raise ValueError(f"{source}: a hub dataset is streamed; set data.streaming=True")
  key = _hash(_stamp(files), text_field, tokenizer_fingerprint(tokenizer))
  folder = Path(cache_dir) / f"tokens-v{token_shards.FORMAT}-{key}"

  def build(tmp: Path) -> None:
    log.info("tokenising %s into %s", source, folder)
    ds = load_documents(source, text_field)
    encode = functools.partial(_encode_rows, tokenizer, text_field)
    token_shards.write_shards(tmp, ds, encode, token_shards.token_dtype(len(tokenizer)),
                              workers, block_bytes)

  return token_shards.open_or_build(folder, build, process_index == 0 or not shared, timeout_s)


def _local_tokens(data_cfg, source: str, tokenizer, cache_dir, process_index: int):
  return load_tokens(source, tokenizer, cache_dir, data_cfg.text_field,
                     process_index=process_index, shared=data_cfg.get("cache_shared", True),
                     workers=int(data_cfg.get("tokenize_workers", 0)),
                     timeout_s=float(data_cfg.get("tokenize_timeout_s", 6 * 3600)))


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


class Sequences:
  """Rows [N, T + 1] of a token stream, read on demand by index, slice or index array."""

  def __init__(self, tokens: token_shards.TokenShards, width: int, first: int, count: int):
    self.tokens, self.width, self.first, self.count = tokens, width, first, count

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, key) -> np.ndarray:
    if isinstance(key, slice):
      return self[np.arange(self.count)[key]]
    idx = np.asarray(key, np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= self.count):
      raise IndexError(f"sequence index outside [0, {self.count})")
    rows = self.tokens.take((self.first + idx.reshape(-1)) * self.width, self.width)
    return rows.reshape(*idx.shape, self.width)


class PackedTokens:
  """Fixed-length sequences over a flat token stream, in a (seed, epoch)-seeded order."""

  def __init__(self, tokens, seq_len: int, seed: int, rows: slice | None = None):
    self.seq_len, self.seed = seq_len, seed
    if not isinstance(tokens, token_shards.TokenShards):
      tokens = token_shards.TokenShards.from_array(np.asarray(tokens))
    span = range(len(tokens) // (seq_len + 1))
    span = span[rows] if rows is not None else span
    if span.step != 1:
      raise ValueError(f"rows {rows}: give a contiguous slice of sequences")
    self.sequences = Sequences(tokens, seq_len + 1, span.start, len(span))
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
    return to_batch(self.sequences[idx])

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


_GROUP = 64  # Documents of a shuffle window tokenised together.
_STREAM_FORMAT = 1


@dataclasses.dataclass
class StreamPosition:
  """A place in a stream, enough to rebuild it without re-reading what came before it."""
  epoch: int = 0
  window: int = 0  # Shuffle window of this epoch.
  source: dict | None = None  # The dataset's state_dict at the window's start (None: epoch start).
  group: int = 0  # Group of _GROUP documents of the shuffled window.
  carry: list[int] = dataclasses.field(default_factory=list)  # Tokens left before the group.
  taken: int = 0  # Sequences already cut from carry + group.


class StreamedTokens:
  """Packed sequences from a streamed dataset: seeded window shuffle, one slice per process.

  With ``state_dir``, the position every ``snapshot_every`` batches is saved there, and a fresh
  object asked for batch s starts from the newest saved position at or before it.
  """

  def __init__(self, ds, tokenizer, seq_len: int, seed: int, text_field: str = "text",
               process_index: int = 0, process_count: int = 1, shuffle_buffer: int = 10_000,
               state_dir: str | os.PathLike | None = None, source_id: str = "",
               snapshot_every: int = 100):
    from datasets.distributed import split_dataset_by_node

    self.ds = split_dataset_by_node(ds, rank=process_index, world_size=process_count)
    self.tokenizer, self.seq_len, self.seed = tokenizer, seq_len, seed
    self.text_field, self.shuffle_buffer = text_field, max(1, int(shuffle_buffer))
    self.process_count, self.snapshot_every = process_count, max(1, int(snapshot_every))
    self.state_dir = None
    if state_dir is not None:
      key = _hash(source_id, tokenizer_fingerprint(tokenizer), seq_len, seed, text_field,
                  self.shuffle_buffer, process_index, process_count, _GROUP, _STREAM_FORMAT)
      self.state_dir = Path(state_dir) / key
    self._iter, self._done, self._last = None, 0, StreamPosition()

  def _windows(self, start: StreamPosition) -> Iterator[tuple[int, dict | None, list]]:
    """(index, dataset state at its start, documents) of each window of start.epoch."""
    self.ds.set_epoch(start.epoch)
    self.ds.load_state_dict(start.source)  # None: from the epoch's start.
    window, source = start.window, start.source
    for rows in self.ds.iter(batch_size=self.shuffle_buffer):
      yield window, source, rows[self.text_field]
      window, source = window + 1, self.ds.state_dict()

  def _pack(self, at: StreamPosition, docs: list, buf: list[int]):
    """Sequences of one window (from group at.group), each with the position after it."""
    order = np.random.default_rng([self.seed, at.epoch, at.window]).permutation(len(docs))
    docs, width = [docs[i] for i in order], self.seq_len + 1
    for group in range(at.group, -(-len(docs) // _GROUP)):
      carry = list(buf)
      for ids in _encode(self.tokenizer, _nonblank(docs[group * _GROUP:(group + 1) * _GROUP])):
        buf.extend(ids)
      count = len(buf) // width
      skip = at.taken if group == at.group else 0
      for k in range(skip, count):
        pos = dataclasses.replace(at, group=group, carry=carry, taken=k + 1)
        yield np.asarray(buf[k * width:(k + 1) * width], np.uint32), pos
      del buf[:count * width]
    return buf

  def _sequences(self, start: StreamPosition) -> Iterator[tuple[np.ndarray, StreamPosition]]:
    """The stream from ``start`` on, through every later epoch."""
    while True:
      buf, produced = list(start.carry), False
      whole = (start.window, start.group, start.taken) == (0, 0, 0) and start.source is None
      for window, source, docs in self._windows(start):
        at = dataclasses.replace(start, window=window, source=source)
        for seq, pos in self._pack(at, docs, buf):
          produced = True
          yield seq, pos
        start = StreamPosition(start.epoch, window + 1)
      if not produced and whole:
        raise ValueError(f"the streamed dataset yielded no complete sequence of "
                         f"{self.seq_len + 1} tokens in a whole epoch; give more text")
      start = StreamPosition(start.epoch + 1)

  def _snapshots(self) -> dict[int, Path]:
    """Saved positions by the number of sequences before them."""
    if self.state_dir is None or not self.state_dir.is_dir():
      return {}
    out = {}
    for path in self.state_dir.glob("seq_*.json"):
      if path.stem[4:].isdigit():
        out[int(path.stem[4:])] = path
    return out

  def _seek(self, target: int, rows: int) -> None:
    """Continues from the newest saved position <= target (ahead of the current one), unless
    the current position is at most ``snapshot_every`` batches before target."""
    if self._iter is not None and 0 <= target - self._done <= self.snapshot_every * rows:
      return
    snaps = {n: p for n, p in self._snapshots().items() if n <= target}
    if self._iter is not None and target >= self._done:
      snaps = {n: p for n, p in snaps.items() if n > self._done}
    for n in sorted(snaps, reverse=True):
      try:
        start = StreamPosition(**json.loads(snaps[n].read_text()))
      except (OSError, ValueError, TypeError) as e:
        log.warning("ignoring stream snapshot %s (%s)", snaps[n], e)
        continue
      self._iter, self._done, self._last = self._sequences(start), n, start
      return
    if self._iter is None or target < self._done:
      self._iter, self._done, self._last = self._sequences(StreamPosition()), 0, StreamPosition()

  def _save(self) -> None:
    path = self.state_dir / f"seq_{self._done}.json"
    if path.exists():
      return
    try:
      text = json.dumps(dataclasses.asdict(self._last))
    except TypeError as e:  # A dataset whose state is not JSON: resume by replaying instead.
      log.warning("stream positions not saved (%s); a resumed run re-reads the stream", e)
      self.state_dir = None
      return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{_unique()}.part")
    tmp.write_text(text)
    os.replace(tmp, path)

  def _next(self) -> np.ndarray:
    seq, self._last = next(self._iter)
    self._done += 1
    return seq

  def batch(self, step: int, microbatches: int, batch_size: int, process_index: int = 0,
            process_count: int = 1) -> Batch:
    """This process's [M, B / P, T] for ``step``; any step, cheapest in increasing order."""
    del process_index
    per = batch_size // process_count
    _split_rows(batch_size, 0, process_count)
    rows = microbatches * per
    self._seek(step * rows, rows)
    while self._done < step * rows:  # At most snapshot_every batches since a saved position.
      self._next()
    if self.state_dir is not None and step % self.snapshot_every == 0 and step:
      self._save()
    seqs = np.stack([self._next() for _ in range(rows)])
    return to_batch(seqs.reshape(microbatches, per, -1))


def make_train_data(data_cfg, tokenizer, seq_len: int, cache_dir: str | os.PathLike,
                    process_index: int = 0, process_count: int = 1):
  """Training sequences: PackedTokens for local files, StreamedTokens when streaming."""
  seed = int(data_cfg.seed)
  if data_cfg.get("streaming", False) or resolve_files(data_cfg.train) is None:
    split, config = data_cfg.get("hub_split", "train"), data_cfg.get("hub_config") or None
    ds = load_documents(data_cfg.train, data_cfg.text_field, split, True, config)
    files = resolve_files(data_cfg.train)
    source_id = json.dumps([str(data_cfg.train), split, config, _stamp(files or [])])
    return StreamedTokens(ds, tokenizer, seq_len, seed, data_cfg.text_field, process_index,
                          process_count, data_cfg.get("shuffle_buffer", 10_000),
                          Path(cache_dir) / "stream_state", source_id,
                          data_cfg.get("stream_snapshot_every", 100))
  tokens = _local_tokens(data_cfg, data_cfg.train, tokenizer, cache_dir, process_index)
  packed = PackedTokens(tokens, seq_len, seed)
  if not data_cfg.get("heldout"):  # The held-out tail of the training text is never trained on.
    held = heldout_size(len(packed), data_cfg.get("heldout_fraction", 0.01))
    packed = PackedTokens(tokens, seq_len, seed, slice(0, len(packed) - held))
  return packed


def calibration_rows(train, link, tokens: int, process_index: int = 0,
                     process_count: int = 1) -> np.ndarray:
  """Rows [N, T + 1] of the first training batches of ``link`` (``train``: `make_train_data`'s),
  at least ``tokens`` tokens, gathered from every process so all hold the same rows."""
  from jax.experimental import multihost_utils

  want = -(-max(1, tokens) // link.seq_len)
  local, step = [], 0
  while sum(len(r) for r in local) * process_count < want:
    b = train.batch(step, link.microbatches, link.batch_size, process_index, process_count)
    rows = np.concatenate([b["ids"], b["labels"][..., -1:]], axis=-1)
    local.append(rows.reshape(-1, link.seq_len + 1))
    step += 1
  rows = np.concatenate(local)
  if process_count > 1:
    rows = np.asarray(multihost_utils.process_allgather(rows)).reshape(-1, rows.shape[-1])
  return rows[:want]


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
    packed = PackedTokens(_local_tokens(data_cfg, heldout, tokenizer, cache_dir, process_index),
                          seq_len, 0)
  else:
    if resolve_files(data_cfg.train) is None:
      raise ValueError("a streamed training set needs held-out text: set data.heldout")
    tokens = _local_tokens(data_cfg, data_cfg.train, tokenizer, cache_dir, process_index)
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
