"""Vocabulary bridge on the real SmolLM2 (49,152) and GPT-2 (50,257) tokenizers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbd_jax.checkpoints import assets
from cbd_jax.distill import losses, vocab_bridge

NUM_PARAGRAPHS = 30


def identity_map(vocab_size: int) -> vocab_bridge.TokenMap:
  """The map of a tokenizer onto itself."""
  return vocab_bridge.TokenMap(np.arange(vocab_size, dtype=np.int32), np.ones(vocab_size, bool),
                               vocab_size)


def _pairs(alignments):
  """(teacher_pos, student_pos, mask) [B, A], right-padded, from per-text alignments."""
  a = max(len(x.teacher_pos) for x in alignments)
  t_pos, s_pos = (np.zeros((len(alignments), a), np.int32) for _ in range(2))
  mask = np.zeros((len(alignments), a), bool)
  for b, x in enumerate(alignments):
    n = len(x.teacher_pos)
    t_pos[b, :n], s_pos[b, :n], mask[b, :n] = x.teacher_pos, x.student_pos, True
  return t_pos, s_pos, mask


@pytest.fixture(scope="module")
def gpt2():
  from tokenizers import ByteLevelBPETokenizer

  vocab, merges = assets.gpt2_tokenizer_files()
  return ByteLevelBPETokenizer(str(vocab), str(merges))


@pytest.fixture(scope="module")
def smollm2():
  from transformers import AutoTokenizer

  gguf = assets.smollm2_gguf()
  return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def vocabs(smollm2, gpt2):
  return vocab_bridge.vocab_bytes(smollm2), vocab_bridge.vocab_bytes(gpt2)


@pytest.fixture(scope="module")
def token_map(vocabs):
  return vocab_bridge.build_token_map(*vocabs)


@pytest.fixture(scope="module")
def paragraphs():
  lines = assets.english_text()["heldout"].read_text().splitlines()
  return [line for line in lines if line.strip()][:NUM_PARAGRAPHS]


def test_vocab_bytes_spell_the_text(vocabs, smollm2, gpt2, paragraphs):
  smol_vocab, gpt2_vocab = vocabs
  assert len(smol_vocab) == 49_152 and len(gpt2_vocab) == 50_257
  assert gpt2_vocab.pieces[220] == b" " and gpt2_vocab.pieces[198] == b"\n"
  text = paragraphs[0] + " naïve café 中文"
  for tok, vocab in ((smollm2, smol_vocab), (gpt2, gpt2_vocab)):
    ids = vocab_bridge.backend_tokenizer(tok).encode(text, add_special_tokens=False).ids
    assert b"".join(vocab.pieces[i] for i in ids) == text.encode()


def test_identical_tokenizers_give_the_identity_map(gpt2):
  raw = vocab_bridge.backend_tokenizer(gpt2)  # a plain tokenizers.Tokenizer
  token_map = vocab_bridge.build_token_map(gpt2, raw)
  np.testing.assert_array_equal(token_map.student_ids, np.arange(50_257))
  assert token_map.exact.all()
  assert token_map.coverage()["exact_fraction"] == 1.0


def test_smollm2_to_gpt2_map_exact_and_prefix_fallback(token_map, vocabs, smollm2, paragraphs):
  smol_vocab, gpt2_vocab = vocabs
  report = token_map.coverage()
  print("SmolLM2 -> GPT-2 vocabulary coverage:", report)
  assert report["exact"] + report["fallback"] + report["unmapped"] == 49_152
  assert 0.5 < report["exact_fraction"] < 1.0
  exact = np.flatnonzero(token_map.exact)
  for i in exact[:: max(1, len(exact) // 500)]:
    assert smol_vocab.pieces[i] == gpt2_vocab.pieces[token_map.student_ids[i]]
  gpt2_pieces = set(gpt2_vocab.pieces)
  for i in np.flatnonzero(~token_map.exact & (token_map.student_ids >= 0))[::25]:
    piece, target = smol_vocab.pieces[i], gpt2_vocab.pieces[token_map.student_ids[i]]
    assert piece.startswith(target) and len(target) < len(piece)
    assert not any(piece[:n] in gpt2_pieces for n in range(len(target) + 1, len(piece) + 1))
  unmapped = np.flatnonzero(token_map.student_ids < 0)
  assert all(smol_vocab.special[i] for i in unmapped)  # only specials GPT-2 lacks
  assert token_map.student_ids[0] == 50_256  # <|endoftext|> on both sides
  ids = np.concatenate([vocab_bridge.token_ends(smollm2, p, smol_vocab)[0] for p in paragraphs])
  text_report = token_map.text_coverage(ids)
  print("SmolLM2 -> GPT-2 coverage on English text:", text_report)
  assert text_report["exact_fraction"] > 0.95 and text_report["mapped_fraction"] == 1.0


def test_fallback_none_keeps_only_exact_matches(vocabs):
  token_map = vocab_bridge.build_token_map(*vocabs, fallback="none")
  assert ((token_map.student_ids >= 0) == token_map.exact).all()


def test_aligned_pairs_cover_the_same_characters(smollm2, gpt2, vocabs, paragraphs):
  smol_vocab, gpt2_vocab = vocabs
  aligned = total = 0
  for text in paragraphs + ["naïve café 中文 — “quoted”\n\n  end"]:
    a = vocab_bridge.align_text(smollm2, gpt2, text, smol_vocab, gpt2_vocab)
    raw = text.encode()
    assert len(a.teacher_pos) and a.teacher_pos[-1] == len(a.teacher_ids) - 1
    assert a.student_pos[-1] == len(a.student_ids) - 1
    prev_t = prev_s = 0
    for i, j in zip(a.teacher_pos + 1, a.student_pos + 1, strict=True):
      t_bytes = b"".join(smol_vocab.pieces[k] for k in a.teacher_ids[prev_t:i])
      s_bytes = b"".join(gpt2_vocab.pieces[k] for k in a.student_ids[prev_s:j])
      assert t_bytes == s_bytes == raw[a.teacher_ends[i - 1] - len(t_bytes):a.teacher_ends[i - 1]]
      prev_t, prev_s = i, j
    aligned, total = aligned + len(a.student_pos), total + len(a.student_ids)
  print(f"aligned {aligned} of {total} GPT-2 positions ({aligned / total:.3f})")
  assert aligned / total > 0.9


def test_align_tokens_on_hand_made_offsets():
  t_pos, s_pos = vocab_bridge.align_tokens([2, 5, 6, 9], [1, 2, 6, 7, 9])
  np.testing.assert_array_equal(t_pos, [0, 2, 3])
  np.testing.assert_array_equal(s_pos, [1, 2, 4])


def test_projection_sums_mass_and_drops_unmapped():
  token_map = vocab_bridge.TokenMap(np.array([2, 0, 2, -1, 1], np.int32),
                                    np.array([True, True, False, False, True]), 3)
  logits = jax.random.normal(jax.random.PRNGKey(0), (4, 5))
  p = np.exp(np.asarray(losses.log_softmax(logits), np.float64))
  want = np.stack([p[:, 1], p[:, 4], p[:, 0] + p[:, 2]], -1)
  want /= want.sum(-1, keepdims=True)
  got = vocab_bridge.project_logprobs(logits, token_map)
  np.testing.assert_allclose(np.exp(got), want, rtol=1e-5)


def test_identity_projection_is_a_no_op_for_kd():
  s = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 11))
  t = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 11))
  pos = np.array([[0, 2, 5], [1, 3, 4]], np.int32)
  mask = np.array([[True, True, True], [True, True, False]])
  gather = lambda x: jnp.take_along_axis(x, pos[..., None], axis=1)
  got = vocab_bridge.projected_kd_sum(gather(s), gather(t), identity_map(11), mask, "rkl", 2.0)
  want = losses.kd_loss_sum(gather(s), gather(t), "rkl", 2.0, mask)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  assert float(got[1]) == 5


def test_projected_kd_between_real_tokenizers(smollm2, gpt2, vocabs, token_map, paragraphs):
  smol_vocab, gpt2_vocab = vocabs
  alignments = [vocab_bridge.align_text(smollm2, gpt2, p[:300], smol_vocab, gpt2_vocab)
                for p in paragraphs[:2]]
  t_pos, s_pos, mask = _pairs(alignments)
  tt = max(len(a.teacher_ids) for a in alignments)
  ts = max(len(a.student_ids) for a in alignments)
  t_logits = jax.random.normal(jax.random.PRNGKey(3), (2, tt, 49_152))
  s_logits = jax.random.normal(jax.random.PRNGKey(4), (2, ts, 50_257))

  def loss(s):
    return vocab_bridge.projected_kd_sum(vocab_bridge.gather_positions(s, s_pos),
                                         vocab_bridge.gather_positions(t_logits, t_pos),
                                         token_map, mask)[0]

  value, grad = jax.value_and_grad(loss)(s_logits)
  assert np.isfinite(float(value)) and float(value) > 0
  touched = np.zeros((2, ts), bool)
  for b in range(2):
    touched[b, s_pos[b][mask[b]]] = True
  grad_norm = np.asarray(jnp.abs(grad).sum(-1))
  assert (grad_norm[touched] > 0).all() and (grad_norm[~touched] == 0).all()


def test_unsupported_tokenizer_raises_a_clear_error():
  with pytest.raises(TypeError, match="unsupported tokenizer"):
    vocab_bridge.vocab_bytes(object())
  with pytest.raises(ValueError, match="unknown fallback"):
    vocab_bridge.build_token_map(vocab_bridge.Vocab((b"a",), (False,)),
                                 vocab_bridge.Vocab((b"a",), (False,)), fallback="nearest")
