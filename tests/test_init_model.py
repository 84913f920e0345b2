"""launch/init_model.py end to end on tiny anchors: a folder transformers loads, clear failures."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from launch_env import user_env
from random_params import random_params

from cbd_jax.checkpoints import hf_io
from cbd_jax.evaluation import heldout
from cbd_jax.interpolation import calibrate, sizing, target
from cbd_jax.model import decoder, layout
from cbd_jax.model.config import ModelConfig, num_params

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("The river runs past the old mill and the town. Farmers bring grain to the market on "
        "Saturday, and children play by the water. ") * 40


def _tokenizer():
  tok = tokenizers.ByteLevelBPETokenizer()
  tok.train_from_iterator([TEXT], vocab_size=300, min_frequency=1, show_progress=False)
  return tok


def _anchor(folder, family, layers, width, heads, kv, ffn, seed, vocab, **kw):
  config = ModelConfig(family=family, vocab_size=vocab, hidden_size=width, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv, head_dim=8, intermediate_size=ffn,
                       max_position_embeddings=64, **kw)
  hf_io.save_hf(config, random_params(config, seed, scale=0.1), folder, tokenizer=_tokenizer())
  return config



@pytest.fixture(scope="module")
def anchors(tmp_path_factory):
  root = tmp_path_factory.mktemp("anchors")
  vocab = _tokenizer().get_vocab_size()
  small = _anchor(root / "small", "llama", 2, 32, 4, 2, 64, 0, vocab, tie_embeddings=True)
  large = _anchor(root / "large", "llama", 4, 64, 8, 4, 128, 1, vocab, tie_embeddings=True)
  other = _anchor(root / "gpt2", "gpt2", 2, 32, 4, 4, 128, 2, vocab)
  gpt2_large = _anchor(root / "gpt2_large", "gpt2", 4, 32, 4, 4, 128, 4, vocab)
  text = root / "heldout.txt"
  text.write_text("\n".join([TEXT[i:i + 400] for i in range(0, len(TEXT), 400)]))
  calib = root / "calib.txt"
  calib.write_text("\n".join(reversed([TEXT[i:i + 300] for i in range(0, len(TEXT), 300)])))
  return {"root": root, "small": small, "large": large, "other": other, "gpt2_large": gpt2_large,
          "text": text, "calib": calib}


def _torch_perplexity(folder, text_file, tokens, seq_len):
  """exp of the mean next-token loss of the exported folder in PyTorch transformers, on the first
  ``tokens`` tokens of the text (its non-blank lines, each ending in a newline) in rows of
  seq_len + 1: what init_model reports, computed without cbd_jax."""
  import torch
  import transformers

  tok = transformers.AutoTokenizer.from_pretrained(str(folder))
  ids = []
  for line in Path(text_file).read_text().splitlines():
    if line.strip():
      ids += tok(line.strip() + "\n", add_special_tokens=False)["input_ids"]
  ids = ids[:tokens]
  n = len(ids) // (seq_len + 1)
  rows = torch.tensor(ids[:n * (seq_len + 1)]).reshape(n, seq_len + 1)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
  with torch.no_grad():
    logits = hf(rows[:, :-1]).logits
  loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           rows[:, 1:].reshape(-1))
  return float(torch.exp(loss))


def _run(*args):
  env = user_env(JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(ROOT / "launch" / "init_model.py"), *args],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_end_to_end_folder_loads_in_transformers(anchors):
  import torch
  import transformers

  root = anchors["root"]
  size = num_params(sizing.shape_at(anchors["small"], anchors["large"], 3, 48)[0])
  out = root / "target"
  result = _run(f"--size={size}", "--anchors", f"{root / 'large'},{root / 'small'}",
                "--out", str(out), "--text", str(anchors["text"]), "--seq_len", "32",
                "--calib_text", str(anchors["calib"]), "--shape", "line")
  assert result.returncode == 0, result.stderr
  for word in ("small anchor", "large anchor", "alpha =", "layers x", "params",
               "large-anchor layers (calibration loss"):
    assert word in result.stdout, (word, result.stdout)
  summary = json.loads((out / "cbd_init.json").read_text())
  want = _torch_perplexity(out, anchors["text"], 8192, 32)
  assert summary["perplexity"] == pytest.approx(want, rel=1e-4)
  assert f"target {summary['perplexity']:,.2f}" in result.stdout
  config, params = hf_io.load_hf(out)
  assert num_params(config) == summary["num_params"]
  assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (
      3, 48, 6, 3)
  assert config == sizing.resolve_size(size, anchors["small"], anchors["large"]).replace(
      real_vocab_size=config.real_vocab_size, bos_token_id=config.bos_token_id,
      eos_token_id=config.eos_token_id)
  ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 12))
  ours = np.asarray(decoder.forward(config, params, ids))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
  with torch.no_grad():
    theirs = hf(torch.as_tensor(ids)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  tok = transformers.AutoTokenizer.from_pretrained(str(out))
  assert tok("the river")["input_ids"] == _tokenizer().encode("the river").ids


def test_out_of_range_size_fails_with_range_and_nonzero_exit(anchors):
  root = anchors["root"]
  result = _run("--size=10m", "--anchors", f"{root / 'small'},{root / 'large'}",
                "--out", str(root / "never"))
  assert result.returncode != 0
  assert "outside the anchors' range" in result.stderr and "Traceback" not in result.stderr
  assert not (root / "never").exists()


def test_different_families_are_refused(anchors):
  root = anchors["root"]
  with pytest.raises(ValueError, match="families differ"):
    target.init_target(num_params(anchors["small"]) + 10,
                       anchors=f"{root / 'small'},{root / 'gpt2'}", out=root / "x", log=str)


def test_different_vocabularies_are_refused(anchors, tmp_path):
  small = anchors["small"]
  config = small.replace(vocab_size=small.vocab_size + 7, real_vocab_size=None)
  hf_io.save_hf(config, random_params(config, 3), tmp_path / "v")
  with pytest.raises(ValueError, match="vocabularies differ"):
    target.init_target(num_params(small) + 10, anchors=f"{anchors['root'] / 'large'},"
                       f"{tmp_path / 'v'}", out=tmp_path / "x", log=str)


def test_missing_manifest_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="chain.json not found.*--anchors"):
    target.init_target("1m", chain=tmp_path / "nochain", log=str)


def test_existing_output_is_not_overwritten(anchors, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  root = anchors["root"]
  with pytest.raises(FileExistsError, match="--overwrite"):
    target.init_target(num_params(anchors["small"]), anchors=f"{root / 'small'},{root / 'large'}",
                       out=out, log=str)
  assert (out / "keep.txt").read_text() == "mine"


def _manifest(root, entries, config=None, source=None):
  """A chain.json of ``entries`` (name, path, config, status); the source is the first entry
  unless ``source`` (path, config) is given."""
  anchors = [{"name": name, "path": path, "num_params": num_params(cfg), "config": cfg.to_dict(),
              "status": status, "tokens": 0, "eval": {}} for name, path, cfg, status in entries]
  src = anchors[0] if source is None else {"path": source[0], "num_params": num_params(source[1]),
                                           "config": source[1].to_dict()}
  root.mkdir(parents=True, exist_ok=True)
  (root / "chain.json").write_text(json.dumps({"source": src, "anchors": anchors,
                                               "config": config or {}}))


def test_chain_manifest_picks_adjacent_done_anchors(anchors, tmp_path):
  root, small, large = anchors["root"], anchors["small"], anchors["large"]
  mid = small.replace(num_layers=3, hidden_size=48, num_heads=6, num_kv_heads=3,
                      intermediate_size=96)
  entries = [("anchor1", str(root / "large"), large, "done"),
             ("anchor2", "anchors/mid", mid, "running"),
             ("anchor3", str(root / "small"), small, "done")]
  _manifest(tmp_path, entries)
  size = num_params(small) + (num_params(large) - num_params(small)) // 3
  assert target.pick_anchors(tmp_path, size) == (root / "small", root / "large")
  entries[1] = ("anchor2", "anchors/mid", mid, "done")
  _manifest(tmp_path, entries)
  below_mid = num_params(small) + (num_params(mid) - num_params(small)) // 2
  assert target.pick_anchors(tmp_path, below_mid) == (root / "small", tmp_path / "anchors/mid")
  with pytest.raises(ValueError, match="outside the finished anchors' range"):
    target.pick_anchors(tmp_path, 2 * num_params(large))


def test_calibration_reads_only_the_calibration_text(anchors, tmp_path):
  root = anchors["root"]
  size = num_params(sizing.shape_at(anchors["small"], anchors["large"], 3, 48)[0])
  pair = f"{root / 'small'},{root / 'large'}"
  other = tmp_path / "other.txt"
  other.write_text("A completely different held-out text about ships and the sea.\n" * 30)
  summaries = []
  for i, text in enumerate((anchors["text"], other)):
    lines = []
    summaries.append(target.init_target(
        size, anchors=pair, out=tmp_path / f"t{i}", text=text, calib_text=anchors["calib"],
        seq_len=16, eval_tokens=136, calib_tokens=170, dtype="bfloat16", shape="line",
        log=lines.append))
    assert any("held-out perplexity on 128 tokens" in line for line in lines), lines
  a, b = (hf_io.load_hf(tmp_path / f"t{i}")[1] for i in range(2))
  jax_equal = [np.array_equal(x, y) for x, y in zip(layout.flatten(a).values(),
                                                    layout.flatten(b).values(), strict=True)]
  assert all(jax_equal)  # The held-out text changed; the target did not.
  first = summaries[0]
  # Two calibration rows of 128 tokens: the fewest whole rows that hold 170 tokens.
  assert first["alpha"] == summaries[1]["alpha"] and first["calibration_tokens"] == 256
  assert set(first["anchor_perplexity"]) == {"small anchor", "target", "large anchor"}
  assert first["perplexity"] == first["anchor_perplexity"]["target"]
  config, params = hf_io.load_hf(tmp_path / "t0")
  assert config.num_layers == 3 and params["embed"]["embedding"].dtype == "bfloat16"


def test_an_anchor_of_the_chain_is_never_the_output(anchors, tmp_path):
  root, small, large = anchors["root"], anchors["small"], anchors["large"]
  _manifest(tmp_path, [("a1", str(root / "large"), large, "done"),
                       ("a2", str(root / "small"), small, "done")])
  size = num_params(small) + (num_params(large) - num_params(small)) // 2
  before = sorted(p.name for p in (root / "small").iterdir())
  with pytest.raises(FileExistsError, match="is a model of the chain"):
    target.init_target(size, chain=tmp_path, out=root / "small", overwrite=True, log=str)
  assert sorted(p.name for p in (root / "small").iterdir()) == before
  (tmp_path / "file").write_text("x")
  with pytest.raises(FileExistsError, match="is a file"):
    target.init_target(size, chain=tmp_path, out=tmp_path / "file", log=str)


def test_every_flag_is_documented_in_help():
  result = _run("--help")
  assert result.returncode == 0
  for flag in ("--size", "--chain", "--anchors", "--out", "--overwrite", "--alpha ",
               "--method", "--layers", "--mix", "--calib_text", "--calib_tokens",
               "--text", "--shrink_method", "--grow_method", "--depth", "--no_align_units",
               "--no_align_layers", "--dtype", "--use_source", "--eval_tokens", "--seq_len"):
    assert flag in result.stdout, flag


def _between(anchors, small="small", large="large", shape=(3, 48)):
  """The parameter count of a shape between two anchors of the fixture."""
  return num_params(sizing.shape_at(anchors[small], anchors[large], *shape)[0])


def _spy_rows(monkeypatch):
  """The calibration rows init_target hands to calibrate.make_sized_target."""
  seen = []
  make_sized_target = calibrate.make_sized_target

  def spy(small, large, shapes, recipe=None, rows=None, log=print):
    seen.append(rows)
    return make_sized_target(small, large, shapes, recipe, rows, log)

  monkeypatch.setattr(calibrate, "make_sized_target", spy)
  return seen


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_chain_calibrates_on_its_own_training_data_in_its_format(anchors, tmp_path,
                                                                    monkeypatch, fmt):
  """Rows of the chain's jsonl or parquet training file, packed as training packs them: every
  calibration row is a window of the documents' token stream (never raw JSON or bytes), and
  the held-out last window is never one."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  root = anchors["root"]
  docs = [f"Page {i}. " + TEXT[i * 97 % 4000:][:300] for i in range(40)]
  train = tmp_path / f"train.{fmt}"
  if fmt == "jsonl":
    train.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
  else:
    pq.write_table(pa.table({"id": list(range(40)), "text": docs}), train)
  links = [{"name": "a1", "seq_len": 32, "batch_size": 8, "microbatches": 1},
           {"name": "a2", "seq_len": 16, "batch_size": 2, "microbatches": 1}]
  _manifest(tmp_path / "chain", [("a1", str(root / "large"), anchors["large"], "done"),
                                 ("a2", str(root / "small"), anchors["small"], "done")],
            config={"data": {"train": str(train), "text_field": "text", "seed": 3},
                    "chain": links})
  seen = _spy_rows(monkeypatch)
  summary = target.init_target(_between(anchors), chain=tmp_path / "chain", out=tmp_path / "t",
                               calib_tokens=100, log=str)
  tok = hf_io.load_tokenizer(root / "small")
  stream = []
  for d in docs:
    stream += tok(d, add_special_tokens=False)["input_ids"] + (
        [tok.eos_token_id] if tok.eos_token_id is not None else [])
  windows = [tuple(stream[k * 17:(k + 1) * 17]) for k in range(len(stream) // 17)]
  (rows,) = seen
  assert rows.shape == (7, 17)  # The small anchor's link: rows of 16 + 1, 7 x 16 >= 100 tokens.
  assert all(tuple(r) in windows[:-1] for r in rows.tolist())
  assert len({tuple(r) for r in rows.tolist()}) == 7
  assert summary["calib_text"] == str(train) and summary["calibration_tokens"] == 7 * 16


def test_a_chain_on_an_unreachable_hub_dataset_fails_in_one_line(anchors, tmp_path):
  root = anchors["root"]
  _manifest(tmp_path, [("a1", str(root / "large"), anchors["large"], "done"),
                       ("a2", str(root / "small"), anchors["small"], "done")],
            config={"data": {"train": "someorg/some-text", "streaming": True}})
  with pytest.raises(ValueError) as e:
    target.init_target(_between(anchors), chain=tmp_path, out=tmp_path / "t", log=str)
  assert str(e.value).startswith("calibration text someorg/some-text: cannot be read (")
  assert str(e.value).endswith("; pass --calib_text with a local text, jsonl or parquet file")
  assert "\n" not in str(e.value) and not (tmp_path / "t").exists()


def test_calibration_never_reads_the_heldout_text(anchors, tmp_path):
  root, text = anchors["root"], anchors["text"]
  pair = f"{root / 'small'},{root / 'large'}"
  with pytest.raises(ValueError, match="calibration never reads the held-out text"):
    target.init_target(_between(anchors), anchors=pair, out=tmp_path / "a", text=text,
                       calib_text=text, log=str)
  _manifest(tmp_path / "chain", [("a1", str(root / "large"), anchors["large"], "done"),
                                 ("a2", str(root / "small"), anchors["small"], "done")],
            config={"data": {"train": f"{anchors['calib']},{text}"}})
  with pytest.raises(ValueError, match="calibration never reads the held-out text"):
    target.init_target(_between(anchors), chain=tmp_path / "chain", out=tmp_path / "b",
                       text=text, log=str)
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_use_source_reads_the_source_where_train_chain_read_it(anchors, tmp_path, monkeypatch):
  """The manifest's source path is a hub id or a path from the folder train_chain ran in, never
  one inside the chain folder."""
  root, small, large = anchors["root"], anchors["small"], anchors["large"]
  chain = tmp_path / "chain"
  size = _between(anchors)
  for source in ("org/big-model", "large"):
    _manifest(chain, [("a2", str(root / "small"), small, "done")], source=(source, large))
    assert target.pick_anchors(chain, size, use_source=True) == (root / "small", Path(source))
  monkeypatch.chdir(root)  # "large" is root/large from here.
  summary = target.init_target(size, chain=chain, use_source=True, out=tmp_path / "t",
                               log=str)
  assert summary["large_anchor"] == "large" and summary["num_params"] < num_params(large)


def test_calibration_without_a_tokenizer_fails_in_one_line(anchors, tmp_path):
  small, large = anchors["small"], anchors["large"]
  hf_io.save_hf(small, random_params(small, 0, scale=0.1), tmp_path / "s")
  hf_io.save_hf(large, random_params(large, 1, scale=0.1), tmp_path / "l")
  _manifest(tmp_path, [("a1", str(tmp_path / "l"), large, "done"),
                       ("a2", str(tmp_path / "s"), small, "done")],
            config={"data": {"train": str(anchors["calib"])}})
  with pytest.raises(ValueError) as e:
    target.init_target(_between(anchors), chain=tmp_path, out=tmp_path / "t", log=str)
  assert str(e.value) == (
      f"calibration needs a tokenizer, and neither {tmp_path / 's'} nor {tmp_path / 'l'} has one; "
      "add the tokenizer files to an anchor folder, or pass --method paper and no --text")
  assert not (tmp_path / "t").exists()


def test_gpt2_heldout_rows_stay_within_the_learned_positions(anchors, tmp_path):
  """The anchors have 64 positions: a longer --seq_len is refused before anything is written;
  the default is cut to 64 with a notice, and the perplexity is PyTorch's on those rows."""
  root, text = anchors["root"], anchors["text"]
  pair = f"{root / 'gpt2'},{root / 'gpt2_large'}"
  size = _between(anchors, "other", "gpt2_large", (3, 32))
  with pytest.raises(ValueError) as e:
    target.init_target(size, anchors=pair, out=tmp_path / "a", text=text, seq_len=100, log=str)
  assert str(e.value) == ("--seq_len 100 is longer than the anchors' 64 learned positions (GPT-2 "
                          "max_position_embeddings); pass --seq_len 64 or less")
  assert not (tmp_path / "a").exists()
  lines = []
  summary = target.init_target(size, anchors=pair, out=tmp_path / "b", text=text,
                               eval_tokens=260, log=lines.append)
  assert "held-out rows of 64 tokens, the anchors' learned positions (not 256)" in lines
  assert summary["perplexity"] == pytest.approx(
      _torch_perplexity(tmp_path / "b", text, 260, 64), rel=1e-4)
  config, params = hf_io.load_hf_numpy(tmp_path / "b")
  rows = np.zeros((1, 66), np.int32)  # 65 inputs: one past the table.
  with pytest.raises(ValueError, match="longer than this GPT-2 model's 64 learned positions"):
    heldout.mean_nll(config, params, rows)
