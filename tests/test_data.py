"""Packed batches: order from (seed, step) only, per-process slices, held-out kept apart; token
shards built once in parallel and shared; streamed sources resumed from saved positions."""

import json
import os
import socket
import subprocess
import sys
import threading

import ml_collections
import numpy as np
import pytest

from cbd_jax import data
from cbd_jax.checkpoints import assets
from cbd_jax.data import documents, token_shards


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  text = assets.english_text()["heldout"]
  return data.train_bpe_tokenizer([text], 300, tmp_path_factory.mktemp("tok") / "bpe")


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
  """About 40 kB of real paragraphs: enough for several shards, fast to tokenise."""
  lines = assets.english_text()["heldout"].read_text().splitlines()[:300]
  path = tmp_path_factory.mktemp("text") / "small.txt"
  path.write_text("\n".join(lines)[:40_000])
  return str(path)


def _cfg(**kw):
  return ml_collections.ConfigDict(dict(dict(train=str(assets.english_text()["heldout"]),
                                             heldout="", heldout_fraction=0.05, text_field="text",
                                             seed=3, streaming=False), **kw))


def _one_process_tokens(source, tokenizer):
  """The old way: every document in one process, concatenated in memory."""
  ds = data.load_documents(source)
  ids = [x for texts in documents.iter_documents(ds, "text")
         for x in documents.encode(tokenizer, texts)]
  return np.array([t for x in ids for t in x], np.int64)


def test_tokens_are_the_documents_joined_with_eos(tokenizer, tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_text('{"text": "the first line"}\n{"text": "and a second"}\n')
  tokens = data.load_tokens(str(path), tokenizer, tmp_path / "cache")
  eos = tokenizer.eos_token_id
  want = (tokenizer("the first line", add_special_tokens=False)["input_ids"] + [eos] +
          tokenizer("and a second", add_special_tokens=False)["input_ids"] + [eos])
  assert np.asarray(tokens).tolist() == want and tokens.dtype == np.uint16
  assert len(list((tmp_path / "cache").iterdir())) == 1  # Cached; a second load reads the file.
  np.testing.assert_array_equal(data.load_tokens(str(path), tokenizer, tmp_path / "cache"), tokens)


def test_parallel_shards_equal_one_process_tokenisation(tokenizer, small_text, tmp_path):
  shards = data.load_tokens(small_text, tokenizer, tmp_path, workers=2, block_bytes=4_000)
  assert len(shards.counts) > 2  # Several blocks of documents over two worker processes.
  whole = _one_process_tokens(small_text, tokenizer)
  np.testing.assert_array_equal(np.asarray(shards), whole)
  np.testing.assert_array_equal(shards[100:5_000], whole[100:5_000])  # Across shard boundaries.
  inline = data.load_tokens(small_text, tokenizer, tmp_path / "one", workers=1)
  assert len(inline.counts) == 1
  np.testing.assert_array_equal(np.asarray(inline), whole)


def test_processes_share_one_cache(tokenizer, small_text, tmp_path):
  with pytest.raises(TimeoutError, match=r"index\.json: not written after") as err:
    data.load_tokens(small_text, tokenizer, tmp_path, process_index=1, timeout_s=0.1)
  assert "\n" not in str(err.value)
  got = {}
  reader = threading.Thread(target=lambda: got.update(r=data.load_tokens(
      small_text, tokenizer, tmp_path, process_index=1, timeout_s=120)))
  reader.start()  # Process 1 waits for the marker ...
  written = data.load_tokens(small_text, tokenizer, tmp_path, process_index=0, workers=1)
  reader.join()  # ... that process 0 writes; both read the same folder.
  assert got["r"].folder == written.folder and len(list(tmp_path.iterdir())) == 1
  np.testing.assert_array_equal(np.asarray(got["r"]), np.asarray(written))
  stamp = (written.folder / "index.json").stat().st_mtime_ns
  data.load_tokens(small_text, tokenizer, tmp_path, process_index=0)  # Done once, not rebuilt.
  assert (written.folder / "index.json").stat().st_mtime_ns == stamp


def test_a_reader_without_a_writer_fails_early(tmp_path):
  folder = tmp_path / "tokens-v2-x"
  wait = dict(writer=False, timeout_s=60, poll_s=0.02, stale_s=0.2)
  with pytest.raises(TimeoutError, match="building absent .* a folder all hosts share"):
    token_shards.open_or_build(folder, None, **wait)
  marker = tmp_path / "tokens-v2-x.building"
  marker.write_text("{}")
  os.utime(marker, (1, 1))  # A writer that stopped long ago.
  with pytest.raises(TimeoutError, match="building: not refreshed .* delete"):
    token_shards.open_or_build(folder, None, **wait)


def test_a_killed_writers_partial_folder_is_removed_by_the_next_writer(tmp_path):
  folder = tmp_path / "tokens-v2-x"
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  host = socket.gethostname()
  left = tmp_path / f".{folder.name}.{host}.{dead.pid}.part"      # A writer killed mid-build.
  live = tmp_path / f".{folder.name}.{host}.{os.getppid()}.part"  # One still building.
  for part in (left, live):
    (part / "shard").mkdir(parents=True)

  def build(tmp):  # One shard of five tokens, as write_shards lays it out.
    tmp.mkdir()
    np.arange(5, dtype=np.uint16).tofile(tmp / "shard-00000.bin")
    (tmp / token_shards.INDEX).write_text(json.dumps(
        {"format": token_shards.FORMAT, "dtype": "uint16", "files": ["shard-00000.bin"],
         "counts": [5]}))

  shards = token_shards.open_or_build(folder, build, writer=True)
  assert not left.exists() and live.exists()
  np.testing.assert_array_equal(np.asarray(shards), np.arange(5))


def _old_batch(tokens, seq_len, seed, step, microbatches, batch_size, rows=None):
  """Batch ``step`` as the in-memory implementation computed it."""
  total = len(tokens) // (seq_len + 1)
  seqs = tokens[: total * (seq_len + 1)].reshape(total, seq_len + 1)
  seqs = seqs[rows] if rows is not None else seqs
  g = step * microbatches * batch_size + np.arange(microbatches * batch_size)
  idx = np.array([np.random.default_rng([seed, e]).permutation(len(seqs))[i]
                  for e, i in zip(g // len(seqs), g % len(seqs))])
  return seqs[idx].reshape(microbatches, batch_size, -1)[..., :-1].astype(np.int32)


def test_batches_from_shards_equal_the_in_memory_order(tokenizer, small_text, tmp_path):
  shards = data.load_tokens(small_text, tokenizer, tmp_path, workers=2, block_bytes=4_000)
  flat = np.asarray(shards)
  for rows in (None, slice(0, 40)):
    packed = data.PackedTokens(shards, 24, seed=5, rows=rows)
    for step in (0, 3, 11, 40):  # Steps past one epoch too.
      want = _old_batch(flat, 24, 5, step, 2, 4, rows)
      np.testing.assert_array_equal(packed.batch(step, 2, 4)["ids"], want)
  evals = data.PackedTokens(shards, 24, 0, slice(50, 60)).in_order(2, 3)
  np.testing.assert_array_equal(evals[1]["ids"], flat[52 * 25: 54 * 25].reshape(2, 25)[:, :-1])


def test_damaged_cache_is_one_line_naming_the_file(tokenizer, small_text, tmp_path):
  (tmp_path / "tokens-0123456789abcdef0123.npy").write_bytes(b"an old cache format")
  shards = data.load_tokens(small_text, tokenizer, tmp_path, workers=2, block_bytes=4_000)
  shard = shards.folder / "shard-00001.bin"
  shard.write_bytes(shard.read_bytes()[:-10])
  with pytest.raises(ValueError, match="shard-00001.bin: .* delete .* and rerun") as err:
    data.load_tokens(small_text, tokenizer, tmp_path)
  assert "\n" not in str(err.value) and str(shards.folder) in str(err.value)
  (shards.folder / "index.json").write_text("{not json")
  with pytest.raises(ValueError, match="index.json: unreadable index"):
    token_shards.TokenShards.open(shards.folder)


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
  train_rows = {tuple(r) for r in train.sequences[:].tolist()}
  eval_rows = {tuple(r) for b in evals for r in np.concatenate(
      [b["ids"], b["labels"][:, -1:]], axis=1).tolist()}
  assert eval_rows and not train_rows & eval_rows
  again = data.make_eval_batches(cfg, tokenizer, 32, 2, 100, tmp_path)
  np.testing.assert_array_equal(again[0]["ids"], evals[0]["ids"])


@pytest.fixture(scope="module")
def docs_jsonl(small_text, tmp_path_factory):
  path = tmp_path_factory.mktemp("stream") / "docs.jsonl"
  text = open(small_text).read()[:4_000]  # Sentences: many documents, several windows.
  lines = [x for x in text.replace("\n", " ").split(". ") if x.strip()]
  path.write_text("".join(json.dumps({"text": x}) + "\n" for x in lines))
  return str(path)


def _stream(docs_jsonl, tokenizer, state_dir, process_index=0, process_count=1):
  ds = data.load_documents(docs_jsonl, streaming=True)
  return data.StreamedTokens(ds, tokenizer, 32, seed=1, shuffle_buffer=16,
                             process_index=process_index, process_count=process_count,
                             state_dir=state_dir, source_id=docs_jsonl, snapshot_every=3)


@pytest.mark.parametrize("process_index,process_count", [(0, 1), (1, 2)])
def test_streamed_source_resumes_from_a_saved_position(tokenizer, docs_jsonl, tmp_path,
                                                       process_index, process_count):
  split = dict(process_index=process_index, process_count=process_count)
  first = _stream(docs_jsonl, tokenizer, tmp_path, **split)
  run = [first.batch(s, 2, 2 * process_count, **split)["ids"] for s in range(40)]  # Wraps epochs.
  rows = {tuple(r) for b in run[:6] for r in b.reshape(-1, 32).tolist()}
  assert len(rows) == 24 and first._last.epoch >= 1  # Distinct within an epoch; then wraps.
  saved = sorted(int(p.stem[4:]) for p in first.state_dir.glob("seq_*.json"))
  assert saved == [4 * s for s in range(3, 40, 3)]
  for step in (2, 7, 9, 31, 38):
    resumed = _stream(docs_jsonl, tokenizer, tmp_path, **split)
    reads = []
    resumed._next = lambda f=resumed._next, reads=reads: reads.append(1) or f()
    np.testing.assert_array_equal(resumed.batch(step, 2, 2 * process_count, **split)["ids"],
                                  run[step])
    assert len(reads) == 4 * (step % 3 + 1)  # From the newest saved position, not from step 0.
    np.testing.assert_array_equal(resumed.batch(step + 1, 2, 2 * process_count, **split)["ids"],
                                  run[step + 1])
  np.testing.assert_array_equal(resumed.batch(1, 2, 2 * process_count, **split)["ids"], run[1])


def test_streamed_source_without_state_dir_replays(tokenizer, docs_jsonl):
  run = _stream(docs_jsonl, tokenizer, None)
  want = [run.batch(s, 1, 4)["ids"] for s in range(6)]
  np.testing.assert_array_equal(_stream(docs_jsonl, tokenizer, None).batch(5, 1, 4)["ids"],
                                want[5])


def test_a_stream_too_short_for_one_sequence_is_an_error(tokenizer, tmp_path):
  path = tmp_path / "short.jsonl"
  path.write_text('{"text": "one"}\n{"text": "two"}\n')
  short = data.StreamedTokens(data.load_documents(str(path), streaming=True), tokenizer, 32, 0)
  with pytest.raises(ValueError, match="no complete sequence of 33 tokens"):
    short.batch(0, 1, 1)


def test_bad_sources_fail_with_one_clear_line(tmp_path):
  with pytest.raises(FileNotFoundError, match="data files not found"):
    data.resolve_files(str(tmp_path / "missing.txt"))
  (tmp_path / "x.csv").write_text("a")
  with pytest.raises(ValueError, match="unknown data file type"):
    data.resolve_files(str(tmp_path / "x.csv"))
  assert data.resolve_files("HuggingFaceFW/fineweb-edu") is None
