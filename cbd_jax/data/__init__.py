"""Text -> packed token batches whose order depends only on (seed, step): the data pipeline's
one public interface (`make_train_data`, `make_eval_batches`, `calibration_rows` and what the
other sub-packages read), in front of its modules:

  documents     files or a hub dataset -> documents -> token ids; tokenizer fingerprints
  token_shards  a tokenised corpus as on-disk shards, written in parallel, memory-mapped
  packing       local sources: fixed-length sequences in a (seed, epoch)-seeded order
  streaming     streamed sources: a seeded window shuffle, resumable from saved positions
  calibration   init_model's calibration rows: a chain's first training batches, or any text

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

import json
import os
from pathlib import Path

import numpy as np

from cbd_jax.data.documents import (
  iter_documents,
  load_documents,
  resolve_files,
  stamp,
  tokenizer_fingerprint,
  train_bpe_tokenizer,
  training_tokens_key,
)
from cbd_jax.data.packing import (
  Batch,
  PackedTokens,
  heldout_size,
  load_tokens,
  local_tokens,
  to_batch,
)
from cbd_jax.data.streaming import StreamedTokens, pack_stream

__all__ = ["Batch", "PackedTokens", "StreamedTokens", "calibration_rows", "heldout_size",
           "iter_documents", "load_documents", "load_tokens", "make_eval_batches",
           "make_train_data", "pack_stream", "resolve_files", "to_batch", "tokenizer_fingerprint",
           "train_bpe_tokenizer", "training_tokens_key"]


def make_train_data(data_cfg, tokenizer, seq_len: int, cache_dir: str | os.PathLike,
                    process_index: int = 0, process_count: int = 1):
  """Training sequences: PackedTokens for local files, StreamedTokens when streaming."""
  seed = int(data_cfg.seed)
  if data_cfg.get("streaming", False) or resolve_files(data_cfg.train) is None:
    split, config = data_cfg.get("hub_split", "train"), data_cfg.get("hub_config") or None
    ds = load_documents(data_cfg.train, data_cfg.text_field, split, True, config)
    files = resolve_files(data_cfg.train)
    source_id = json.dumps([str(data_cfg.train), split, config, stamp(files or [])])
    return StreamedTokens(ds, tokenizer, seq_len, seed, data_cfg.text_field, process_index,
                          process_count, data_cfg.get("shuffle_buffer", 10_000),
                          Path(cache_dir) / "stream_state", source_id,
                          data_cfg.get("stream_snapshot_every", 100))
  tokens = local_tokens(data_cfg, data_cfg.train, tokenizer, cache_dir, process_index)
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


def make_eval_batches(data_cfg, tokenizer, seq_len: int, batch_size: int, num_batches: int,
                      cache_dir: str | os.PathLike, process_index: int = 0,
                      process_count: int = 1) -> list[Batch]:
  """Held-out batches: the ``heldout`` files or hub dataset (its first sequences, in order),
  else the tail of the (local) training text."""
  heldout = data_cfg.get("heldout")
  if heldout and resolve_files(heldout) is None:
    ds = load_documents(heldout, data_cfg.text_field,
                        data_cfg.get("heldout_split", "validation"), True,
                        data_cfg.get("heldout_config") or None)
    seqs = []
    for seq in pack_stream(ds, tokenizer, seq_len, data_cfg.text_field):
      seqs.append(seq)
      if len(seqs) == batch_size * num_batches:
        break
    packed = PackedTokens(np.concatenate(seqs) if seqs else np.zeros(0, np.uint32), seq_len, 0)
  elif heldout:
    packed = PackedTokens(local_tokens(data_cfg, heldout, tokenizer, cache_dir, process_index),
                          seq_len, 0)
  else:
    if resolve_files(data_cfg.train) is None:
      raise ValueError("a streamed training set needs held-out text: set data.heldout")
    tokens = local_tokens(data_cfg, data_cfg.train, tokenizer, cache_dir, process_index)
    n = len(tokens) // (seq_len + 1)
    held = heldout_size(n, data_cfg.get("heldout_fraction", 0.01))
    packed = PackedTokens(tokens, seq_len, 0, slice(n - held, n))
  return packed.in_order(batch_size, num_batches, process_index, process_count)
