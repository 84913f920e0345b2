"""Vocabulary-projection bridge: KD between a teacher and a student with different tokenizers.

1. ``build_token_map``: every teacher token id gets a student token id. A teacher token whose byte
   string is also a student token maps *exactly*. The others use the fallback "prefix": the
   student token with the longest byte string that is a prefix of the teacher token's bytes (the
   student token that covers the teacher token's leading bytes; byte-level vocabularies hold all
   256 single bytes, so every ordinary token gets one). Special tokens (``<|endoftext|>``...) map
   only to a student token with the same content (special ones first), else stay unmapped (-1). With
   ``fallback="none"`` only exact matches are kept.
2. ``align_tokens`` / ``align_text``: token ends measured in UTF-8 bytes of the same text (the
   cumulative byte lengths of the tokens, so a character split over two byte tokens still has an
   exact end); the aligned positions are the pairs (i, j) where teacher token i and student token j
   end at the same byte. Between consecutive aligned pairs both sides cover the same characters,
   so both predict the continuation of the same prefix there.
3. ``project_logprobs``: p_student[j] = sum_{i: map(i) = j} p_teacher[i] / (1 - unmapped mass),
   i.e. teacher probability is summed into the student tokens it maps to and the mass of unmapped
   teacher tokens is dropped and the rest renormalised. The result is a log-distribution over the
   student vocabulary that ``losses.kd_loss`` takes as teacher logits (temperature T then acts on
   the projected distribution: p_proj^(1/T), renormalised).

Tokenizers: a ``tokenizers.Tokenizer``, a ``tokenizers`` implementation such as
``ByteLevelBPETokenizer``, or a transformers fast tokenizer (``backend_tokenizer``).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from cbd_jax.distill import losses


@functools.lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
  """The GPT-2 byte-level alphabet: printable unicode character -> byte value."""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  chars, extra = list(keep), 0
  for b in range(256):
    if b not in keep:
      keep.append(b)
      chars.append(256 + extra)
      extra += 1
  return {chr(c): b for b, c in zip(keep, chars, strict=True)}


def backend_tokenizer(tokenizer):
  """The underlying ``tokenizers.Tokenizer`` of any supported tokenizer object."""
  import tokenizers

  if isinstance(tokenizer, tokenizers.Tokenizer):
    return tokenizer
  for attr in ("backend_tokenizer", "_tokenizer"):
    inner = getattr(tokenizer, attr, None)
    if isinstance(inner, tokenizers.Tokenizer):
      return inner
  raise TypeError(f"unsupported tokenizer {type(tokenizer).__name__}; pass a tokenizers.Tokenizer,"
                  " a tokenizers implementation or a transformers *fast* tokenizer")


def _decoder_types(backend) -> set[str]:
  dec = json.loads(backend.to_str()).get("decoder") or {}
  found = {dec.get("type")}
  for sub in dec.get("decoders", []) or []:
    found.add(sub.get("type"))
  return found


@dataclasses.dataclass(frozen=True)
class Vocab:
  """Byte strings of a tokenizer's tokens; ``special[i]`` marks added special tokens."""

  pieces: tuple[bytes, ...]
  special: tuple[bool, ...]

  def __len__(self) -> int:
    return len(self.pieces)


def vocab_bytes(tokenizer) -> Vocab:
  """Each token id's byte string (byte-level BPE or SentencePiece-style pieces)."""
  backend = backend_tokenizer(tokenizer)
  vocab = backend.get_vocab(with_added_tokens=True)
  size = max(vocab.values()) + 1
  added = {i: t for i, t in backend.get_added_tokens_decoder().items()}
  byte_level = "ByteLevel" in _decoder_types(backend)
  table = _byte_level_decoder()
  pieces, special = [b""] * size, [False] * size
  for token, i in vocab.items():
    if i in added:
      pieces[i], special[i] = added[i].content.encode(), bool(added[i].special)
    elif byte_level:
      pieces[i] = bytes(table[c] for c in token) if all(c in table for c in token) else \
          token.encode()
    elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
      pieces[i] = bytes([int(token[3:5], 16)])  # SentencePiece byte fallback
    else:
      pieces[i] = token.replace("\u2581", " ").encode()
  return Vocab(tuple(pieces), tuple(special))


@dataclasses.dataclass(frozen=True)
class TokenMap:
  """Teacher id -> student id (-1 unmapped) and whether the match is exact."""

  student_ids: np.ndarray  # int32 [V_teacher]
  exact: np.ndarray  # bool [V_teacher]
  student_vocab_size: int

  @property
  def teacher_vocab_size(self) -> int:
    return len(self.student_ids)

  def coverage(self) -> dict:
    """Counts and fractions of exact, fallback and unmapped teacher tokens."""
    n = self.teacher_vocab_size
    exact = int(self.exact.sum())
    mapped = int((self.student_ids >= 0).sum())
    return {"teacher_vocab": n, "student_vocab": self.student_vocab_size, "exact": exact,
            "fallback": mapped - exact, "unmapped": n - mapped, "exact_fraction": exact / n,
            "mapped_fraction": mapped / n}

  def text_coverage(self, teacher_ids) -> dict:
    """Fractions of the teacher tokens of a text that map exactly / at all."""
    ids = np.asarray(teacher_ids).reshape(-1)
    return {"tokens": int(ids.size), "exact_fraction": float(self.exact[ids].mean()),
            "mapped_fraction": float((self.student_ids[ids] >= 0).mean())}


def build_token_map(teacher_tokenizer, student_tokenizer, fallback: str = "prefix") -> TokenMap:
  """Teacher -> student token map by exact byte string, else the ``fallback`` (module doc)."""
  if fallback not in ("prefix", "none"):
    raise ValueError(f"unknown fallback {fallback!r}; choose 'prefix' or 'none'")
  tv = teacher_tokenizer if isinstance(teacher_tokenizer, Vocab) else vocab_bytes(
      teacher_tokenizer)
  sv = student_tokenizer if isinstance(student_tokenizer, Vocab) else vocab_bytes(
      student_tokenizer)
  ordinary, specials = {}, {}
  for j, (piece, is_special) in enumerate(zip(sv.pieces, sv.special, strict=True)):
    if piece:
      (specials if is_special else ordinary).setdefault(piece, j)
  max_len = max((len(p) for p in ordinary), default=0)
  ids = np.full(len(tv), -1, np.int32)
  exact = np.zeros(len(tv), bool)
  for i, (piece, is_special) in enumerate(zip(tv.pieces, tv.special, strict=True)):
    same, other = (specials, ordinary) if is_special else (ordinary, specials)
    if piece in same or piece in other:
      ids[i], exact[i] = same.get(piece, other.get(piece)), True
    elif fallback == "prefix" and not is_special:
      for n in range(min(len(piece), max_len), 0, -1):
        if piece[:n] in ordinary:
          ids[i] = ordinary[piece[:n]]
          break
  return TokenMap(ids, exact, len(sv))


@dataclasses.dataclass(frozen=True)
class Alignment:
  """Token ids of one text on both sides and the aligned positions (token indices)."""

  teacher_ids: np.ndarray
  student_ids: np.ndarray
  teacher_ends: np.ndarray  # byte offset where each teacher token ends
  student_ends: np.ndarray
  teacher_pos: np.ndarray  # aligned pairs: teacher token index ...
  student_pos: np.ndarray  # ... and student token index ending at the same byte


def token_ends(tokenizer, text: str, vocab: Vocab | None = None):
  """(ids, end byte offset of each token) for ``text`` encoded without special tokens."""
  backend = backend_tokenizer(tokenizer)
  enc = backend.encode(text, add_special_tokens=False)
  ids = np.asarray(enc.ids, np.int64)
  vocab = vocab or vocab_bytes(tokenizer)
  lengths = [len(vocab.pieces[i]) for i in enc.ids]
  if b"".join(vocab.pieces[i] for i in enc.ids) == text.encode():
    return ids, np.cumsum(lengths, dtype=np.int64)
  # Tokens do not spell the text (a normaliser, an added prefix space): use character offsets.
  char_to_byte = np.concatenate([[0], np.cumsum([len(c.encode()) for c in text])])
  return ids, char_to_byte[np.asarray([end for _, end in enc.offsets], np.int64)]


def align_tokens(teacher_ends, student_ends):
  """(teacher_pos, student_pos): token indices of both sides that end at the same offset."""
  t_ends, s_ends = np.asarray(teacher_ends), np.asarray(student_ends)
  # Keep the last token ending at each offset (zero-length tokens end where their neighbour does).
  t_last = len(t_ends) - 1 - np.unique(t_ends[::-1], return_index=True)[1]
  s_last = len(s_ends) - 1 - np.unique(s_ends[::-1], return_index=True)[1]
  _, ti, si = np.intersect1d(t_ends[t_last], s_ends[s_last], assume_unique=True,
                             return_indices=True)
  return t_last[ti].astype(np.int32), s_last[si].astype(np.int32)


def align_text(teacher_tokenizer, student_tokenizer, text: str, teacher_vocab: Vocab | None = None,
               student_vocab: Vocab | None = None) -> Alignment:
  """Tokenises ``text`` on both sides and aligns the tokens by end offsets."""
  t_ids, t_ends = token_ends(teacher_tokenizer, text, teacher_vocab)
  s_ids, s_ends = token_ends(student_tokenizer, text, student_vocab)
  t_pos, s_pos = align_tokens(t_ends, s_ends)
  return Alignment(t_ids, s_ids, t_ends, s_ends, t_pos, s_pos)


def project_logprobs(teacher_logits, token_map: TokenMap, teacher_vocab_limit: int | None = None):
  """log p_s, p_s[j] = sum_{map(i)=j} p_t[i] / sum_{map(i)>=0} p_t[i], over [..., V_student]."""
  logp = losses.log_softmax(teacher_logits, 1.0, teacher_vocab_limit)
  v_t = teacher_logits.shape[-1]
  ids = np.full(v_t, token_map.student_vocab_size, np.int32)  # extra column: unmapped mass
  n = min(v_t, token_map.teacher_vocab_size)
  mapped = token_map.student_ids[:n]
  ids[:n] = np.where(mapped >= 0, mapped, token_map.student_vocab_size)
  p = jnp.exp(logp)
  out = jnp.zeros(p.shape[:-1] + (token_map.student_vocab_size + 1,), jnp.float32)
  out = out.at[..., jnp.asarray(ids)].add(p)[..., :-1]
  out = out / jnp.maximum(jnp.sum(out, axis=-1, keepdims=True), 1e-30)
  return jnp.maximum(jnp.log(out), -1e30)


def gather_positions(x_BxTx, pos_BxA):
  """x[b, pos[b, a]] for a batch of aligned positions (padding positions may hold any index)."""
  return jnp.take_along_axis(x_BxTx, pos_BxA[..., None].astype(jnp.int32), axis=1)


def projected_kd_sum(student_logits_BxAxV, teacher_logits_BxAxW, token_map: TokenMap,
                     pair_mask_BxA=None, kind: str = "fkl", temperature=1.0,
                     vocab_limit: int | None = None, teacher_vocab_limit: int | None = None):
  """(sum, count) of KD between the student and the projected teacher at aligned pairs, both
  given at the pairs (`gather_positions`); the teacher gets no gradient."""
  t = jax.lax.stop_gradient(project_logprobs(teacher_logits_BxAxW, token_map,
                                             teacher_vocab_limit))
  pad = student_logits_BxAxV.shape[-1] - t.shape[-1]
  if pad < 0:
    raise ValueError(f"student head has {student_logits_BxAxV.shape[-1]} rows, fewer than the "
                     f"token map's {t.shape[-1]} student tokens")
  t = jnp.pad(t, [(0, 0)] * (t.ndim - 1) + [(0, pad)], constant_values=-1e30)
  return losses.kd_loss_sum(student_logits_BxAxV, t, kind, temperature, pair_mask_BxA,
                            vocab_limit)
