"""Count baselines: what a language model must beat to have learned more than token frequencies.

Counted on a chain's training tokens, scored on the same held-out rows as the models:

  unigram   p(b)     = (c(b) + k) / (N + k V)
  bigram    p(b | a) = lam * c(a, b) / c(a) + (1 - lam) * p_unigram(b)     (c(a) > 0; else p(b))

``k`` and ``lam`` are chosen on the last 5% of the counted training rows (never on the held-out
text), then the counts are taken over all of them.
"""

from __future__ import annotations

import math

import numpy as np

ADD_K = (0.01, 0.03, 0.1, 0.3, 1.0)
LAMBDAS = tuple(np.round(np.arange(0.1, 1.0, 0.1), 2).tolist())


class Counts:
  """Unigram and bigram counts of token rows [N, T] over a vocabulary of ``vocab`` ids."""

  def __init__(self, rows_NxT: np.ndarray, vocab: int):
    rows = np.asarray(rows_NxT, np.int64)
    self.vocab = vocab
    self.unigram = np.bincount(rows.reshape(-1), minlength=vocab).astype(np.float64)
    pairs = (rows[:, :-1] * vocab + rows[:, 1:]).reshape(-1)
    self.pair_keys, pair_counts = np.unique(pairs, return_counts=True)
    self.pair_counts = pair_counts.astype(np.float64)
    self.first = np.bincount(rows[:, :-1].reshape(-1), minlength=vocab).astype(np.float64)

  def unigram_logp(self, k: float) -> np.ndarray:
    """log p(b) for every id b, add-k smoothed."""
    return np.log((self.unigram + k) / (self.unigram.sum() + k * self.vocab))

  def pair_count(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    keys = np.asarray(prev, np.int64) * self.vocab + np.asarray(nxt, np.int64)
    at = np.minimum(np.searchsorted(self.pair_keys, keys), len(self.pair_keys) - 1)
    return np.where(self.pair_keys[at] == keys, self.pair_counts[at], 0.0)

  def nll(self, rows_NxT: np.ndarray, k: float, lam: float | None) -> np.ndarray:
    """-log p of every token rows[:, 1:] (unigram when ``lam`` is None, else the bigram)."""
    rows = np.asarray(rows_NxT, np.int64)
    prev, nxt = rows[:, :-1], rows[:, 1:]
    p_uni = np.exp(self.unigram_logp(k))[nxt]
    if lam is None:
      return -np.log(p_uni)
    seen = self.first[prev]
    p_bi = np.divide(self.pair_count(prev, nxt), seen, out=np.zeros_like(p_uni), where=seen > 0)
    return -np.log(np.where(seen > 0, lam * p_bi + (1 - lam) * p_uni, p_uni))


def fit(rows_NxT: np.ndarray, vocab: int) -> dict:
  """{"unigram": (counts, k), "bigram": (counts, k, lam)}: smoothing chosen on the last 5% of
  ``rows`` (at least one row), counts then taken over every row."""
  rows = np.asarray(rows_NxT, np.int64)
  if len(rows) < 2:
    raise ValueError(f"{len(rows)} training row(s); count baselines need at least 2")
  split = max(1, len(rows) // 20)
  held, counted = rows[-split:], Counts(rows[:-split], vocab)
  k = min(ADD_K, key=lambda k: counted.nll(held, k, None).mean())
  lam = min(LAMBDAS, key=lambda lam: counted.nll(held, k, lam).mean())
  return {"counts": Counts(rows, vocab), "k": k, "lam": lam}


def evaluate(fitted: dict, rows_NxT: np.ndarray, byte_lengths: np.ndarray) -> dict[str, dict]:
  """{"unigram": ..., "bigram": ...}, each {"loss", "ppl", "bpb", "smoothing"} on ``rows``."""
  rows = np.asarray(rows_NxT, np.int64)
  n_bytes = int(np.asarray(byte_lengths)[rows[:, 1:]].sum())
  out = {}
  for name, lam in (("unigram", None), ("bigram", fitted["lam"])):
    nll = fitted["counts"].nll(rows, fitted["k"], lam)
    loss = float(nll.mean())
    out[name] = {"loss": loss, "ppl": math.exp(loss), "bpb": float(nll.sum()) / (math.log(2)
                                                                                  * n_bytes),
                 "smoothing": f"add-{fitted['k']:g}" + ("" if lam is None else f", lam {lam:g}")}
  return out


def training_rows(data_cfg, tokenizer, seq_len: int, cache_dir, max_tokens: int = 20_000_000
                  ) -> np.ndarray:
  """Rows [N, seq_len + 1] of a chain's training text (``data_cfg``: its ``config.data``), as
  the chain reads them (the held-out tail of local text excluded), at most ``max_tokens``."""
  from cbd_jax import data

  train = data.make_train_data(data_cfg, tokenizer, seq_len, cache_dir)
  want = max(2, max_tokens // (seq_len + 1))
  if isinstance(train, data.PackedTokens):
    return train.sequences[np.arange(min(len(train), want))]
  rows, step = [], 0
  while len(rows) * 64 < want:
    batch = train.batch(step, 1, 64)
    rows.append(np.concatenate([batch["ids"][0], batch["labels"][0][:, -1:]], axis=-1))
    step += 1
  return np.concatenate(rows)[:want]
