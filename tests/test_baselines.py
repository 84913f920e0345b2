"""baselines: unigram and bigram counts of the training text, against counts made by hand."""

import math
from collections import Counter

import numpy as np
import pytest

from cbd_jax.evaluation import baselines


def _reference_nll(train, test, vocab, k, lam):
  """-log p of every test[:, 1:] token, from dictionaries of counts (an independent recount)."""
  uni = Counter(int(t) for row in train for t in row)
  pairs = Counter((int(a), int(b)) for row in train for a, b in zip(row[:-1], row[1:]))
  first = Counter(int(a) for row in train for a in row[:-1])
  total = sum(uni.values())
  out = []
  for row in test:
    for a, b in zip(row[:-1], row[1:]):
      p_uni = (uni[int(b)] + k) / (total + k * vocab)
      if lam is None or first[int(a)] == 0:
        out.append(-math.log(p_uni))
      else:
        p_bi = pairs[(int(a), int(b))] / first[int(a)]
        out.append(-math.log(lam * p_bi + (1 - lam) * p_uni))
  return np.array(out)


@pytest.mark.parametrize("lam", [None, 0.3, 0.9])
def test_counts_equal_a_recount_by_hand(lam):
  rng = np.random.default_rng(0)
  train = rng.integers(0, 12, (20, 9))
  test = np.concatenate([rng.integers(0, 15, (3, 9)), train[:2]])  # Unseen ids and seen pairs.
  counts = baselines.Counts(train, 16)
  np.testing.assert_allclose(counts.nll(test, 0.1, lam).reshape(-1),
                             _reference_nll(train, test, 16, 0.1, lam), rtol=1e-12)


def test_smoothing_is_chosen_on_training_rows_and_a_bigram_beats_a_unigram_on_bigram_text():
  rng = np.random.default_rng(1)
  # Text from a Markov chain with few successors per token: a bigram model must win.
  successors = rng.integers(0, 50, (50, 3))
  rows = np.zeros((200, 17), np.int64)
  rows[:, 0] = rng.integers(0, 50, 200)
  for t in range(1, 17):
    rows[:, t] = successors[rows[:, t - 1], rng.integers(0, 3, 200)]
  fitted = baselines.fit(rows[:150], 64)
  assert fitted["k"] in baselines.ADD_K and fitted["lam"] in baselines.LAMBDAS
  heldout = fitted["counts"].nll(rows[150:], fitted["k"], fitted["lam"]).mean()
  result = baselines.evaluate(fitted, rows[150:], np.ones(64, np.int64))
  assert result["bigram"]["loss"] == pytest.approx(heldout)
  assert result["bigram"]["bpb"] == pytest.approx(heldout / math.log(2))  # One byte a token.
  assert result["bigram"]["ppl"] < 5 < result["unigram"]["ppl"]  # ~3 successors vs ~50 tokens.


def test_one_training_row_is_refused():
  with pytest.raises(ValueError, match="at least 2"):
    baselines.fit(np.zeros((1, 5), np.int64), 8)
