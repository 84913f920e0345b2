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

from cbd_jax import model
from cbd_jax.config import ModelConfig
from cbd_jax.fused_loss import fused_cross_entropy


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
  from cbd_jax.vocab_bridge import vocab_bytes

  return np.asarray([len(p) for p in vocab_bytes(tokenizer).pieces], np.int64)


def load_heldout(tokenizer, text_file: str | Path, max_tokens: int, seq_len: int) -> HeldoutText:
  """The first ``max_tokens`` tokens of ``text_file`` as rows of ``seq_len + 1`` tokens."""
  from cbd_jax.target import load_token_rows

  rows = load_token_rows(tokenizer, text_file, max_tokens, seq_len)
  return HeldoutText(rows, token_byte_lengths(tokenizer), str(text_file))


@functools.partial(jax.jit, static_argnums=0)
def nll_sum(config: ModelConfig, params: dict, ids_NxT, row_mask_N) -> jax.Array:
  """sum_n row_mask[n] sum_{t >= 1} -log q(ids[n, t] | ids[n, <t]), chunked over the output head
  (no [N, T, V] logits), over the real vocabulary rows."""
  hidden, _ = model.apply_hidden(config, params, ids_NxT[:, :-1])
  mask = jnp.broadcast_to(row_mask_N[:, None], hidden.shape[:2]).astype(jnp.float32)
  total, _ = fused_cross_entropy(hidden, model.head_weight(config, params), ids_NxT[:, 1:], mask,
                                 vocab_limit=config.vocab_limit, chunk_size=2048)
  return total


def evaluate(config: ModelConfig, params: dict, text: HeldoutText, batch_size: int = 8) -> dict:
  """{"loss", "ppl", "bpb", "tokens", "bytes"} of ``params`` on ``text`` (no teacher)."""
  if int(text.rows.max()) >= config.vocab_limit:
    raise ValueError(f"held-out token id {int(text.rows.max())} is outside the model's vocabulary "
                     f"({config.vocab_limit}); evaluate with the model's own tokenizer")
  params = jax.tree.map(jnp.asarray, params)
  total = 0.0
  for i in range(0, len(text.rows), batch_size):
    rows = text.rows[i:i + batch_size]
    real = np.arange(batch_size) < len(rows)  # One compiled shape: pad, count real rows only.
    rows = np.concatenate([rows, np.repeat(rows[-1:], batch_size - len(rows), 0)])
    total += float(nll_sum(config, params, jnp.asarray(rows), jnp.asarray(real, jnp.float32)))
  loss = total / text.tokens
  return {"loss": loss, "ppl": math.exp(min(loss, 50.0)),
          "bpb": total / (math.log(2) * text.bytes), "tokens": text.tokens, "bytes": text.bytes}
