"""Held-out language-model quality: perplexity per token and bits per byte.

    loss = sum_t -log q(y_t | y_<t) / N_tokens            (nats per token; ppl = exp(loss))
    bpb  = sum_t -log q(y_t | y_<t) / (ln 2 * N_bytes)     (N_bytes = UTF-8 bytes of the y_t)

Perplexities of models with different tokenizers are not comparable (a token is not the same
amount of text); bits per byte are, since both models are charged for the same bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cbd_jax.distill.fused_loss import fused_cross_entropy
from cbd_jax.model import decoder
from cbd_jax.model.config import ModelConfig, check_ids


@dataclasses.dataclass(frozen=True)
class HeldoutText:
  """Rows of token ids [N, T + 1] cut from the start of a text, and the tokens' byte lengths."""

  rows: np.ndarray
  byte_lengths: np.ndarray  # [V_tokenizer] UTF-8 bytes of each token id
  path: str

  @property
  def tokens(self) -> int:
    """Predicted tokens (every row's first token is context only)."""
    return int(self.rows[:, 1:].size)

  @property
  def bytes(self) -> int:
    return int(self.byte_lengths[self.rows[:, 1:]].sum())


def token_byte_lengths(tokenizer) -> np.ndarray:
  """UTF-8 byte length of every token id of a (byte-level or SentencePiece) tokenizer."""
  from cbd_jax.distill.vocab_bridge import vocab_bytes

  return np.asarray([len(p) for p in vocab_bytes(tokenizer).pieces], np.int64)


def load_token_rows(tokenizer, text_file: str | Path, max_tokens: int, seq_len: int,
                    skip_tokens: int = 0) -> np.ndarray:
  """Token ids [N, seq_len + 1] from a text file (paragraphs joined by newlines): the first
  ``max_tokens`` tokens after the first ``skip_tokens``."""
  path = Path(text_file)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: text file not found; pass an existing text file")
  if seq_len < 1 or max_tokens < 1 or skip_tokens < 0:
    raise ValueError(f"seq_len {seq_len} and max_tokens {max_tokens} must be positive and "
                     f"skip_tokens {skip_tokens} non-negative")
  ids: list[int] = []
  with path.open(encoding="utf-8") as f:
    for line in f:
      if line.strip():
        ids += tokenizer(line.strip() + "\n", add_special_tokens=False)["input_ids"]
      if len(ids) >= skip_tokens + max_tokens:
        break
  ids = ids[skip_tokens:skip_tokens + max_tokens]
  rows = len(ids) // (seq_len + 1)
  if rows == 0:
    raise ValueError(f"{path}: {len(ids)} tokens after skipping {skip_tokens}, fewer than one "
                     f"row of {seq_len + 1}; give a longer text, more tokens or a smaller seq_len")
  return np.asarray(ids[:rows * (seq_len + 1)], np.int32).reshape(rows, seq_len + 1)


def load_heldout(tokenizer, text_file: str | Path, max_tokens: int, seq_len: int,
                 skip_tokens: int = 0) -> HeldoutText:
  """``max_tokens`` tokens of ``text_file`` (after ``skip_tokens``) as rows of seq_len + 1."""
  rows = load_token_rows(tokenizer, text_file, max_tokens, seq_len, skip_tokens)
  return HeldoutText(rows, token_byte_lengths(tokenizer), str(text_file))


@functools.partial(jax.jit, static_argnums=0)
def nll_sum(config: ModelConfig, params: dict, ids_NxT, row_mask_N) -> jax.Array:
  """sum_n row_mask[n] sum_{t >= 1} -log q(ids[n, t] | ids[n, <t]), chunked over the output head
  (no [N, T, V] logits), over the real vocabulary rows."""
  hidden, _ = decoder.apply_hidden(config, params, ids_NxT[:, :-1])
  mask = jnp.broadcast_to(row_mask_N[:, None], hidden.shape[:2]).astype(jnp.float32)
  total, _ = fused_cross_entropy(hidden, decoder.head_weight(config, params), ids_NxT[:, 1:], mask,
                                 vocab_limit=config.vocab_limit, chunk_size=2048)
  return total


def total_nll(nll_fn, rows_NxT: np.ndarray, batch_size: int = 8) -> float:
  """sum over rows of ``nll_fn(ids_BxT, row_mask_B)``, in batches of one compiled shape (the last
  batch padded with masked copies of its last row)."""
  total = 0.0
  for i in range(0, len(rows_NxT), batch_size):
    rows = rows_NxT[i:i + batch_size]
    real = np.arange(batch_size) < len(rows)
    rows = np.concatenate([rows, np.repeat(rows[-1:], batch_size - len(rows), 0)])
    total += float(nll_fn(jnp.asarray(rows), jnp.asarray(real, jnp.float32)))
  return total


def check_rows(config: ModelConfig, rows_NxT: np.ndarray) -> None:
  """Rows [N, T + 1] the model can score: every id a real token (`config.check_ids` with the
  real vocabulary) and the T inputs within a GPT-2 model's learned positions."""
  check_ids(config, rows_NxT, positions=np.arange(rows_NxT.shape[-1] - 1),
            vocab=config.vocab_limit)


def mean_nll(config: ModelConfig, params: dict, rows_NxT: np.ndarray, batch_size: int = 8
             ) -> float:
  """Mean next-token cross entropy (nats) of ``params`` on ``rows`` [N, T + 1]."""
  check_rows(config, rows_NxT)
  params = jax.tree.map(jnp.asarray, params)
  total = total_nll(functools.partial(nll_sum, config, params), rows_NxT, batch_size)
  return total / rows_NxT[:, 1:].size


def row_nlls(config: ModelConfig, params: dict, rows_NxT: np.ndarray) -> np.ndarray:
  """[N]: the mean next-token cross entropy (nats) of ``params`` on each row of ``rows``."""
  check_rows(config, rows_NxT)
  fn = functools.partial(nll_sum, config, jax.tree.map(jnp.asarray, params))
  return np.array([total_nll(fn, row[None], 1) for row in rows_NxT]) / (rows_NxT.shape[1] - 1)


def evaluate(config: ModelConfig, params: dict, text: HeldoutText, batch_size: int = 8) -> dict:
  """{"loss", "ppl", "bpb", "tokens", "bytes"} of ``params`` on ``text`` (no teacher)."""
  loss = mean_nll(config, params, text.rows, batch_size)
  total = loss * text.tokens
  return {"loss": loss, "ppl": math.exp(min(loss, 50.0)),
          "bpb": total / (math.log(2) * text.bytes), "tokens": text.tokens, "bytes": text.bytes}
