"""Packed sequences of a streamed dataset: a seeded window shuffle, one slice per process, and
snapshots of the stream's position so a resumed run starts near where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cbd_jax.data.documents import encode, hash_key, iter_documents, nonblank, tokenizer_fingerprint
from cbd_jax.data.packing import Batch, split_rows, to_batch
from cbd_jax.files import write_text_atomic

log = logging.getLogger(__name__)


def pack_stream(ds, tokenizer, seq_len: int, text_field: str = "text") -> Iterator[np.ndarray]:
  """Sequences of seq_len + 1 tokens cut from the documents of ``ds`` in stream order."""
  buf: list[int] = []
  for texts in iter_documents(ds, text_field, batch_size=64):
    for ids in encode(tokenizer, texts):
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
      key = hash_key(source_id, tokenizer_fingerprint(tokenizer), seq_len, seed, text_field,
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
      for ids in encode(self.tokenizer, nonblank(docs[group * _GROUP:(group + 1) * _GROUP])):
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
    write_text_atomic(path, text)

  def _next(self) -> np.ndarray:
    seq, self._last = next(self._iter)
    self._done += 1
    return seq

  def batch(self, step: int, microbatches: int, batch_size: int, process_index: int = 0,
            process_count: int = 1) -> Batch:
    """This process's [M, B / P, T] for ``step``; any step, cheapest in increasing order."""
    del process_index
    per = batch_size // process_count
    split_rows(batch_size, 0, process_count)
    rows = microbatches * per
    self._seek(step * rows, rows)
    while self._done < step * rows:  # At most snapshot_every batches since a saved position.
      self._next()
    if self.state_dir is not None and step % self.snapshot_every == 0 and step:
      self._save()
    seqs = np.stack([self._next() for _ in range(rows)])
    return to_batch(seqs.reshape(microbatches, per, -1))


