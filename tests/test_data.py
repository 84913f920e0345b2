"""Packed batches: order from (seed, step) only, per-process slices, held-out kept apart."""

import ml_collections
import numpy as np
import pytest

from cbd_jax import assets, data


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  text = assets.english_text()["heldout"]
  return data.train_bpe_tokenizer([text], 300, tmp_path_factory.mktemp("tok") / "bpe")


def _cfg(**kw):
  return ml_collections.ConfigDict(dict(dict(train=str(assets.english_text()["heldout"]),
                                             heldout="", heldout_fraction=0.05, text_field="text",
                                             seed=3, streaming=False), **kw))


def test_tokens_are_the_documents_joined_with_eos(tokenizer, tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_text('{"text": "the first line"}\n{"text": "and a second"}\n')
  tokens = data.load_tokens(str(path), tokenizer, tmp_path / "cache")
  eos = tokenizer.eos_token_id
  want = (tokenizer("the first line", add_special_tokens=False)["input_ids"] + [eos] +
          tokenizer("and a second", add_special_tokens=False)["input_ids"] + [eos])
  assert tokens.tolist() == want
  assert len(list((tmp_path / "cache").iterdir())) == 1  # Cached; a second load reads the file.
  np.testing.assert_array_equal(data.load_tokens(str(path), tokenizer, tmp_path / "cache"), tokens)


def test_order_depends_only_on_seed_and_step(tokenizer, tmp_path):
  tokens = data.load_tokens(_cfg().train, tokenizer, tmp_path)
  a = data.PackedTokens(tokens, 32, seed=3)
  n = len(a)
  steps = -(-2 * n // 8)  # Two epochs of batches of 2 x 4 sequences.
  seen = np.concatenate([a.indices(s, 2, 4).reshape(-1) for s in range(steps)])
  # Every sequence once per epoch: nothing repeated, nothing skipped.
  assert sorted(seen[:n].tolist()) == list(range(n))
  assert sorted(seen[n:2 * n].tolist()) == list(range(n))
  assert not np.array_equal(seen[:n], seen[n:2 * n])  # A new order each epoch.
  b = data.PackedTokens(tokens, 32, seed=3)  # A fresh process resuming at step 7.
  np.testing.assert_array_equal(a.batch(7, 2, 4)["ids"], b.batch(7, 2, 4)["ids"])
  c = data.PackedTokens(tokens, 32, seed=4)
  assert not np.array_equal(a.indices(7, 2, 4), c.indices(7, 2, 4))
  batch = a.batch(0, 2, 4)
  assert batch["ids"].shape == (2, 4, 32) and batch["ids"].dtype == np.int32
  np.testing.assert_array_equal(batch["ids"][..., 1:], batch["labels"][..., :-1])


def test_process_slices_make_up_the_global_batch(tokenizer, tmp_path):
  packed = data.PackedTokens(data.load_tokens(_cfg().train, tokenizer, tmp_path), 16, seed=0)
  whole = packed.batch(5, 2, 8)["ids"]
  parts = [packed.batch(5, 2, 8, process_index=i, process_count=4)["ids"] for i in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)
  with pytest.raises(ValueError, match="multiple of the process count"):
    packed.batch(0, 1, 6, process_index=0, process_count=4)


def test_heldout_tail_is_never_trained_on(tokenizer, tmp_path):
  cfg = _cfg()
  train = data.make_train_data(cfg, tokenizer, 32, tmp_path)
  evals = data.make_eval_batches(cfg, tokenizer, 32, 2, 100, tmp_path)
  full = data.PackedTokens(data.load_tokens(cfg.train, tokenizer, tmp_path), 32, 0)
  held = data.heldout_size(len(full), 0.05)
  assert len(train) == len(full) - held and len(evals) == min(100, held // 2)
  train_rows = {tuple(r) for r in train.sequences.tolist()}
  eval_rows = {tuple(r) for b in evals for r in np.concatenate(
      [b["ids"], b["labels"][:, -1:]], axis=1).tolist()}
  assert eval_rows and not train_rows & eval_rows
  again = data.make_eval_batches(cfg, tokenizer, 32, 2, 100, tmp_path)
  np.testing.assert_array_equal(again[0]["ids"], evals[0]["ids"])


def test_streamed_source_resumes_at_the_same_step(tokenizer, tmp_path):
  ds = data.load_documents(_cfg().train, streaming=True)
  first = data.StreamedTokens(ds, tokenizer, 32, seed=1, shuffle_buffer=64)
  run = [first.batch(s, 1, 4)["ids"] for s in range(4)]
  resumed = data.StreamedTokens(ds, tokenizer, 32, seed=1, shuffle_buffer=64)
  np.testing.assert_array_equal(resumed.batch(2, 1, 4)["ids"], run[2])
  np.testing.assert_array_equal(resumed.batch(3, 1, 4)["ids"], run[3])
  rows = {tuple(r) for b in run for r in b.reshape(-1, 32).tolist()}
  assert len(rows) == 16  # Distinct sequences: the stream does not repeat itself.


def test_bad_sources_fail_with_one_clear_line(tmp_path):
  with pytest.raises(FileNotFoundError, match="data files not found"):
    data.resolve_files(str(tmp_path / "missing.txt"))
  (tmp_path / "x.csv").write_text("a")
  with pytest.raises(ValueError, match="unknown data file type"):
    data.resolve_files(str(tmp_path / "x.csv"))
  assert data.resolve_files("HuggingFaceFW/fineweb-edu") is None
