"""Training windows for a vocabulary-bridged link: one text, two tokenizations, aligned positions.

The training text (paragraphs joined by newlines) is cut into windows of ``seq_len + 1`` student
tokens; each window's text is tokenised by both sides (student ids truncated to ``seq_len + 1``,
teacher ids to ``teacher_len``) and aligned by token end offsets (`vocab_bridge.align_text`).
A pair (i, j) is kept when the teacher's position i and the student's position j both lie in
their inputs and the student has a label at j, so both predict the text after the same byte.
Window g of step s is ``perm_epoch[g mod N]``, g = s * M * B + row, with ``perm_epoch`` seeded by
(seed, epoch): the order depends only on (seed, step), as in `cbd_jax.data`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from cbd_jax.distill import vocab_bridge

log = logging.getLogger(__name__)
Batch = dict[str, np.ndarray]


def load_student_tokenizer(spec: str):
  """A transformers tokenizer from a folder / hub id, or "vocab.json,merges.txt" (GPT-2 BPE)."""
  parts = [p.strip() for p in str(spec).split(",") if p.strip()]
  if len(parts) == 2 and all(p.endswith((".json", ".txt")) for p in parts):
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    for p in parts:
      if not os.path.exists(os.path.expanduser(p)):
        raise FileNotFoundError(f"{p}: tokenizer file not found; run launch/fetch_assets.py")
    vocab, merges = (os.path.expanduser(p) for p in parts)
    bpe = tokenizers.ByteLevelBPETokenizer(vocab, merges)
    bpe.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")
  from cbd_jax.checkpoints import hf_io

  return hf_io.load_tokenizer(spec)


def read_paragraphs(source: str, text_field: str = "text", max_chars: int = 0) -> list[str]:
  """Documents of local text/jsonl/parquet files (``max_chars`` > 0 stops after that many)."""
  from cbd_jax import data

  if data.resolve_files(source) is None:
    raise ValueError(f"{source}: a vocabulary-bridged link reads local files; download the "
                     "dataset and pass its files")
  out, total = [], 0
  for rows in data.load_documents(source, text_field).iter(batch_size=1000):
    for text in rows[text_field]:
      if text and text.strip():
        out.append(text.strip())
        total += len(text)
    if max_chars and total >= max_chars:
      break
  return out


@dataclasses.dataclass
class AlignedWindows:
  """Both tokenizations of N text windows, right-padded, with their aligned pairs."""

  student_ids: np.ndarray   # [N, T + 1] int32
  student_len: np.ndarray   # [N] real tokens in each row
  teacher_ids: np.ndarray   # [N, U] int32
  teacher_pos: np.ndarray   # [N, A] int32
  student_pos: np.ndarray   # [N, A] int32
  pair_mask: np.ndarray     # [N, A] bool
  seed: int = 0

  def __len__(self) -> int:
    return len(self.student_ids)

  def rows(self, idx: np.ndarray) -> Batch:
    """Arrays of the windows ``idx`` (any shape): ids/labels/mask [..., T] and the pairs."""
    s = self.student_ids[idx]
    n = self.student_len[idx]
    t = s.shape[-1] - 1
    mask = (np.arange(t) < (n[..., None] - 1)).astype(np.float32)
    return {"ids": s[..., :-1], "labels": np.where(mask > 0, s[..., 1:], -1).astype(np.int32),
            "mask": mask, "teacher_ids": self.teacher_ids[idx],
            "teacher_pos": self.teacher_pos[idx], "student_pos": self.student_pos[idx],
            "pair_mask": self.pair_mask[idx].astype(np.float32)}

  def indices(self, step: int, microbatches: int, batch_size: int, process_index: int = 0,
              process_count: int = 1) -> np.ndarray:
    """Window indices [M, B / P] of this process's rows of global batch ``step``."""
    if batch_size % process_count:
      raise ValueError(f"batch of {batch_size} does not split over {process_count} processes")
    per = batch_size // process_count
    rows = np.arange(process_index * per, (process_index + 1) * per)
    g = step * microbatches * batch_size + np.arange(microbatches)[:, None] * batch_size + rows
    out = np.empty_like(g)
    n = len(self)
    for epoch in np.unique(g // n):
      where = g // n == epoch
      out[where] = np.random.default_rng([self.seed, int(epoch)]).permutation(n)[g[where] % n]
    return out

  def batch(self, step: int, microbatches: int, batch_size: int, process_index: int = 0,
            process_count: int = 1) -> Batch:
    """This process's slice [M, B / P, ...] of global training batch ``step``."""
    return self.rows(self.indices(step, microbatches, batch_size, process_index, process_count))

  def in_order(self, batch_size: int, num_batches: int) -> list[Batch]:
    """Evaluation batches [B, ...]: the first windows, in text order."""
    num_batches = min(num_batches, len(self) // batch_size)
    if num_batches == 0:
      raise ValueError(f"{len(self)} windows, fewer than one batch of {batch_size}; give more "
                       "text or a smaller batch")
    return [self.rows(np.arange(i * batch_size, (i + 1) * batch_size))
            for i in range(num_batches)]


def window_texts(text: str, student_tokenizer, seq_len: int, max_windows: int = 0) -> list[str]:
  """The text cut into pieces of seq_len + 1 student tokens (by the tokens' character offsets)."""
  enc = vocab_bridge.backend_tokenizer(student_tokenizer).encode(text, add_special_tokens=False)
  offsets, n = enc.offsets, seq_len + 1
  count = len(offsets) // n
  if max_windows:
    count = min(count, max_windows)
  return [text[offsets[w * n][0]:offsets[(w + 1) * n - 1][1]] for w in range(count)]


def make_aligned_windows(texts: list[str], teacher_tokenizer, student_tokenizer, seq_len: int,
                         teacher_len: int, seed: int = 0) -> AlignedWindows:
  """Tokenises and aligns every window text (see the module docstring)."""
  if not texts:
    raise ValueError("no text windows: give more training text or a shorter seq_len")
  t_vocab = vocab_bridge.vocab_bytes(teacher_tokenizer)
  s_vocab = vocab_bridge.vocab_bytes(student_tokenizer)
  n, a_max = len(texts), seq_len
  s_ids = np.zeros((n, seq_len + 1), np.int32)
  s_len = np.zeros((n,), np.int32)
  t_ids = np.zeros((n, teacher_len), np.int32)
  t_pos = np.zeros((n, a_max), np.int32)
  s_pos = np.zeros((n, a_max), np.int32)
  pair = np.zeros((n, a_max), bool)
  for w, text in enumerate(texts):
    al = vocab_bridge.align_text(teacher_tokenizer, student_tokenizer, text, t_vocab, s_vocab)
    s = al.student_ids[:seq_len + 1]
    t = al.teacher_ids[:teacher_len]
    s_ids[w, :len(s)], s_len[w], t_ids[w, :len(t)] = s, len(s), t
    keep = (al.student_pos < len(s) - 1) & (al.teacher_pos < len(t))
    tp, sp = al.teacher_pos[keep][:a_max], al.student_pos[keep][:a_max]
    t_pos[w, :len(tp)], s_pos[w, :len(sp)], pair[w, :len(tp)] = tp, sp, True
  return AlignedWindows(s_ids, s_len, t_ids, t_pos, s_pos, pair, seed)


def load_aligned_windows(source: str, teacher_tokenizer, student_tokenizer, seq_len: int,
                         teacher_len: int, seed: int = 0, text_field: str = "text",
                         max_windows: int = 0, max_chars: int = 0) -> AlignedWindows:
  """Aligned windows of the local files ``source`` (paragraphs joined by newlines)."""
  text = "\n".join(read_paragraphs(source, text_field, max_chars))
  texts = window_texts(text, student_tokenizer, seq_len, max_windows)
  log.info("aligning %d windows of %d student tokens from %s", len(texts), seq_len + 1,
           Path(str(source)).name)
  return make_aligned_windows(texts, teacher_tokenizer, student_tokenizer, seq_len, teacher_len,
                              seed)
