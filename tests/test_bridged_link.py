"""Bridged links on the real SmolLM2 (49,152) and GPT-2 (50,257) tokenizers, tiny models:
aligned windows, the vocabulary-bridged KD step, the plain LM step, the seqkd corpus."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_vocab_bridge import identity_map

from cbd_jax.chain import source
from cbd_jax.checkpoints import assets
from cbd_jax.distill import bridge_data, bridge_step, lm_step, losses, seqkd, vocab_bridge
from cbd_jax.distill.train_step import LossSettings, init_train_state, make_optimizer
from cbd_jax.model import decoder
from cbd_jax.model.config import ModelConfig
from cbd_jax.model.sharding import make_mesh

SEQ, TEACHER_LEN = 32, 48


@pytest.fixture(scope="module")
def smollm2():
  from cbd_jax.checkpoints import gguf_cache, hf_io

  return hf_io.load_tokenizer(gguf_cache.hf_folder(assets.smollm2_gguf()))


@pytest.fixture(scope="module")
def gpt2():
  vocab, merges = assets.gpt2_tokenizer_files()
  return bridge_data.load_student_tokenizer(f"{vocab},{merges}")


@pytest.fixture(scope="module")
def paragraphs():
  lines = assets.english_text()["train"].read_text(encoding="utf-8").splitlines()
  return [line for line in lines if line.strip()][:12]


@pytest.fixture(scope="module")
def windows(paragraphs, smollm2, gpt2):
  texts = bridge_data.window_texts("\n".join(paragraphs), gpt2, SEQ, max_windows=8)
  return bridge_data.make_aligned_windows(texts, smollm2, gpt2, SEQ, TEACHER_LEN, seed=3)


def test_gpt2_tokenizer_has_exact_gpt2_ids(gpt2):
  assert len(gpt2) == 50_257 and gpt2.eos_token_id == 50_256
  assert gpt2("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]


def test_aligned_pairs_end_at_the_same_byte(windows, smollm2, gpt2):
  t_vocab, s_vocab = vocab_bridge.vocab_bytes(smollm2), vocab_bridge.vocab_bytes(gpt2)
  assert len(windows) == 8 and windows.student_ids.shape == (8, SEQ + 1)
  for w in range(len(windows)):
    pairs = windows.pair_mask[w].sum()
    assert pairs > SEQ // 2  # English: most student tokens end where a teacher token ends.
    for i, j in zip(windows.teacher_pos[w, :pairs], windows.student_pos[w, :pairs]):
      teacher_prefix = b"".join(t_vocab.pieces[t] for t in windows.teacher_ids[w, :i + 1])
      student_prefix = b"".join(s_vocab.pieces[s] for s in windows.student_ids[w, :j + 1])
      assert teacher_prefix == student_prefix
      assert j < windows.student_len[w] - 1  # The student has a label there.


def test_window_order_depends_only_on_seed_and_step(windows):
  a = windows.batch(5, 2, 4)
  b = windows.batch(5, 2, 4)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  epoch = np.concatenate([windows.indices(s, 1, 4).ravel() for s in range(2)])
  assert sorted(epoch.tolist()) == list(range(8))  # One epoch visits every window once.
  halves = [windows.indices(5, 2, 4, p, 2) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves, 1), windows.indices(5, 2, 4))


def _tiny(family, vocab, real, **kw):
  base = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16,
              intermediate_size=64, tie_embeddings=True)
  base.update(kw)
  return ModelConfig(family=family, vocab_size=vocab, real_vocab_size=real, **base)


TEACHER = _tiny("llama", 49_152, 49_152, num_kv_heads=1)
STUDENT = _tiny("gpt2", 50_304, 50_257, max_position_embeddings=64)


def _naive_kd(student_params, teacher_params, token_map, rows):
  """Mean over pairs of KL(P(p_teacher) || q_student) from full logits, in float64 numpy."""
  total, pairs = 0.0, 0
  for b in range(rows["ids"].shape[0]):
    t = np.asarray(decoder.forward(TEACHER, teacher_params, rows["teacher_ids"][b:b + 1]),
                   np.float64)[0]
    s = np.asarray(decoder.forward(STUDENT, student_params, rows["ids"][b:b + 1]), np.float64)[0]
    for k in range(int(rows["pair_mask"][b].sum())):
      i, j = rows["teacher_pos"][b, k], rows["student_pos"][b, k]
      p_t = np.exp(t[i] - t[i].max())
      p_t /= p_t.sum()
      p = np.zeros(token_map.student_vocab_size + 1)
      np.add.at(p, np.where(token_map.student_ids >= 0, token_map.student_ids,
                            token_map.student_vocab_size), p_t)
      p = p[:-1] / p[:-1].sum()
      z = s[j, :STUDENT.vocab_limit]
      log_q = z - z.max() - np.log(np.exp(z - z.max()).sum())
      keep = p[:STUDENT.vocab_limit] > 0
      total += float(np.sum(p[:STUDENT.vocab_limit][keep] * (np.log(p[:STUDENT.vocab_limit][keep])
                                                             - log_q[keep])))
      pairs += 1
  return total / pairs


def test_bridged_step_equals_naive_kd_plus_ce_over_microbatches(windows, smollm2, gpt2):
  token_map = vocab_bridge.build_token_map(smollm2, gpt2)
  t_params = decoder.init_params(TEACHER, jax.random.key(0))
  s_params = decoder.init_params(STUDENT, jax.random.key(1))
  mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  opt, sched = make_optimizer(1e-2, 10)
  loss = LossSettings(kind="fkl", kd_weight=1.0, ce_weight=0.5, chunk_size=64)
  step = bridge_step.make_bridge_step(STUDENT, TEACHER, opt, loss, token_map, mesh,
                                      schedule=sched)
  rows = windows.rows(np.arange(16) % 8)  # Two microbatches of eight windows.
  batch = {k: v.reshape(2, 8, *v.shape[1:]) for k, v in bridge_step.as_device_batch(rows).items()}
  naive_kd = _naive_kd(s_params, t_params, token_map, rows)
  logits = decoder.forward(STUDENT, s_params, rows["ids"])
  ce_sum, ce_count = losses.cross_entropy_sum(logits, rows["labels"], rows["mask"],
                                              STUDENT.vocab_limit)
  naive_ce = float(ce_sum / ce_count)
  state = init_train_state(jax.tree.map(jnp.array, s_params), opt)
  state, m = step(state, t_params, batch)
  assert float(m["pairs"]) == rows["pair_mask"].sum() and float(m["count"]) == rows["mask"].sum()
  np.testing.assert_allclose(float(m["kd_sum"]) / float(m["pairs"]), naive_kd, rtol=1e-5)
  np.testing.assert_allclose(float(m["ce_sum"]) / float(m["count"]), naive_ce, rtol=1e-5)
  np.testing.assert_allclose(float(m["loss"]), naive_kd + 0.5 * naive_ce, rtol=1e-5)
  assert int(state.step) == 1 and np.isfinite(float(m["grad_norm"]))


def test_bridged_kd_of_a_model_with_itself_is_zero(windows, smollm2):
  token_map = identity_map(49_152)
  params = decoder.init_params(TEACHER, jax.random.key(4))
  rows = windows.rows(np.arange(4))
  ids = rows["teacher_ids"]
  same = dict(rows, ids=ids, labels=np.zeros_like(ids), mask=np.ones(ids.shape, np.float32),
              student_pos=rows["teacher_pos"])
  same = jax.tree.map(jnp.asarray, bridge_step.as_device_batch(same))
  sums = jax.jit(lambda p, b: bridge_step.bridged_sums(TEACHER, TEACHER, LossSettings(),
                                                        token_map, p, p, b))
  kd, _, pairs, _ = sums(params, same)
  assert float(pairs) > 0 and abs(float(kd)) < 1e-5 * float(pairs)


def test_lm_step_lowers_the_loss_and_matches_cross_entropy(windows):
  config = STUDENT.replace(vocab_size=512, real_vocab_size=500)
  mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  opt, _ = make_optimizer(3e-3, 20, grad_clip=0.0)
  step = lm_step.make_lm_step(config, opt, mesh, chunk_size=64)
  rows = windows.rows(np.arange(8).reshape(1, 8))
  batch = {k: rows[k] % 500 for k in ("ids", "labels")}  # GPT-2 ids folded into 500 tokens.
  batch["labels"] = np.where(rows["mask"] > 0, batch["labels"], -1)
  batch["mask"] = rows["mask"]
  params = decoder.init_params(config, jax.random.key(2))
  logits = decoder.forward(config, params, batch["ids"][0])
  total, count = losses.cross_entropy_sum(logits, batch["labels"][0], batch["mask"][0],
                                          config.vocab_limit)
  want = total / count
  state = init_train_state(params, opt)
  first = None
  for _ in range(5):
    state, m = step(state, batch)
    first = float(m["loss"]) if first is None else first
  np.testing.assert_allclose(first, float(want), rtol=1e-5)
  assert float(m["loss"]) < first - 0.2  # Five steps on one batch.


def test_seqkd_corpus_resumes_to_the_same_text_and_counts_teacher_flops(tmp_path, smollm2,
                                                                        paragraphs):
  teacher = TEACHER.replace(eos_token_id=smollm2.eos_token_id)
  params = source.init_host_params(teacher, 5)
  settings = seqkd.SeqKDSettings(num_sequences=6, prompt_tokens=8, new_tokens=6, batch_size=4,
                                 temperature=1.0, top_k=20, seed=1)
  whole = seqkd.build_corpus(teacher, params, smollm2, paragraphs, tmp_path / "a", settings, "t")
  part = seqkd.build_corpus(teacher, params, smollm2, paragraphs, tmp_path / "b", settings, "t",
                            max_batches=1)
  assert part["batches_done"] == 1 and part["sequences"] == 4
  with open(tmp_path / "b" / seqkd.CORPUS, "ab") as f:
    f.write(b'{"text": "half a line')  # What a crash in the middle of a batch leaves.
  resumed = seqkd.build_corpus(teacher, params, smollm2, paragraphs, tmp_path / "b", settings,
                               "t")
  a = (tmp_path / "a" / seqkd.CORPUS).read_text()
  assert a == (tmp_path / "b" / seqkd.CORPUS).read_text()
  lines = [json.loads(x)["text"] for x in a.splitlines()]
  prompts = seqkd.sample_prompts(paragraphs, smollm2, settings)
  assert len(lines) == 6
  for text, prompt in zip(lines, prompts):
    assert text.startswith(smollm2.decode(list(prompt)))
  from cbd_jax.model.config import num_params

  positions = 2 * 4 * (8 + 6)  # Two batches of four rows, prompt + new tokens each.
  assert whole["teacher_flops"] == resumed["teacher_flops"] == 2 * num_params(teacher) * positions
  with pytest.raises(ValueError, match="other settings"):
    seqkd.build_corpus(teacher, params, smollm2, paragraphs, tmp_path / "a",
                       settings.__class__(num_sequences=2, prompt_tokens=8, new_tokens=6,
                                          batch_size=4), "t")


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, smollm2):
  """A 2-layer random Llama with the real SmolLM2 tokenizer, saved as an HF folder."""
  from cbd_jax.checkpoints import hf_io

  folder = tmp_path_factory.mktemp("teacher") / "tiny-smollm2"
  teacher = TEACHER.replace(eos_token_id=smollm2.eos_token_id)
  hf_io.save_hf(teacher, source.init_host_params(teacher, 7), folder, tokenizer=smollm2)
  return folder


def _smoke_config(variant, workdir, teacher_folder):
  import sys
  from pathlib import Path

  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  from configs import smollm2_gpt2

  config = smollm2_gpt2.get_config(variant)
  config.workdir = str(workdir)
  config.source.path = str(teacher_folder)
  return config


@pytest.mark.parametrize("variant", ["smoke", "seqkd_smoke"])
def test_bridged_chain_runs_end_to_end_and_exports_a_gpt2_anchor(tmp_path, tiny_teacher, gpt2,
                                                                 variant):
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  from cbd_jax.chain import driver
  from cbd_jax.model.config import num_params

  config = _smoke_config(variant, tmp_path / "run", tiny_teacher)
  link = config.chain[0]
  doc = driver.run_chain(config)
  entry = doc["anchors"][0]
  assert entry["status"] == "done" and entry["steps"] == 2
  assert entry["tokens"] == 2 * 8 * 1 * 32  # steps * batch * microbatches * seq_len.
  assert all(np.isfinite(v) for v in entry["eval"].values()) and entry["eval"]["bpb"] > 0
  n_teacher = num_params(TEACHER)
  if variant == "smoke":  # The teacher reads teacher_len tokens of each of 2 x 8 windows.
    assert entry["bridge"]["teacher_flops"] == 2 * n_teacher * 2 * 8 * 48
    assert entry["eval"]["kl"] >= 0
  else:  # One batch of 4 prompts: 8 prompt + 8 new tokens each.
    assert entry["bridge"]["teacher_flops"] == 2 * n_teacher * 4 * (8 + 8)
    lines = (tmp_path / "run" / "seqkd" / link.name / seqkd.CORPUS).read_text().splitlines()
    assert len(lines) == link.seqkd.num_sequences
  folder = tmp_path / "run" / entry["path"]
  assert AutoTokenizer.from_pretrained(folder)("Hello world")["input_ids"] == [15496, 995]
  hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  assert hf.config.model_type == "gpt2" and hf.config.n_layer == link.student.num_layers
  rows = [json.loads(x) for x in (tmp_path / "run" / "metrics" / f"{link.name}.jsonl").open()]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]  # log.every = 1, no gaps.
