"""Packed sequences of a flat token stream, in an order that depends only on (seed, step).

Local sources are tokenised once into on-disk shards (`data.token_shards`) and read through
memory maps. Global sequence g = step * M * B + j is sequence ``perm_epoch[g mod N]`` with
``perm_epoch`` a permutation seeded by (seed, epoch); each process reads only its rows
``[h B / P, (h + 1) B / P)`` of every microbatch.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import numpy as np

from cbd_jax.data import token_shards
from cbd_jax.data.documents import (
  encode_rows,
  hash_key,
  load_documents,
  resolve_files,
  stamp,
  tokenizer_fingerprint,
)

log = logging.getLogger(__name__)
Batch = dict[str, np.ndarray]


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
  key = hash_key(stamp(files), text_field, tokenizer_fingerprint(tokenizer))
  folder = Path(cache_dir) / f"tokens-v{token_shards.FORMAT}-{key}"

  def build(tmp: Path) -> None:
    log.info("tokenising %s into %s", source, folder)
    ds = load_documents(source, text_field)
    encode = functools.partial(encode_rows, tokenizer, text_field)
    token_shards.write_shards(tmp, ds, encode, token_shards.token_dtype(len(tokenizer)),
                              workers, block_bytes)

  return token_shards.open_or_build(folder, build, process_index == 0 or not shared, timeout_s)


def local_tokens(data_cfg, source: str, tokenizer, cache_dir, process_index: int):
  return load_tokens(source, tokenizer, cache_dir, data_cfg.text_field,
                     process_index=process_index, shared=data_cfg.get("cache_shared", True),
                     workers=int(data_cfg.get("tokenize_workers", 0)),
                     timeout_s=float(data_cfg.get("tokenize_timeout_s", 6 * 3600)))


def split_rows(rows: int, process_index: int, process_count: int) -> slice:
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
    g = step * microbatches * batch_size + rows[:, split_rows(batch_size, process_index,
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
    rows = split_rows(batch_size, process_index, process_count)
    return [to_batch(self.sequences[i * batch_size: (i + 1) * batch_size][rows])
            for i in range(num_batches)]


def heldout_size(num_sequences: int, fraction: float) -> int:
  """Sequences kept back from the end of the training text: max(1, fraction * N)."""
  return max(1, int(num_sequences * fraction))


