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

from cbd_jax import hf_io, model, resize, sizing, target
from cbd_jax.config import ModelConfig, num_params

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
  text = root / "heldout.txt"
  text.write_text("\n".join([TEXT[i:i + 400] for i in range(0, len(TEXT), 400)]))
  calib = root / "calib.txt"
  calib.write_text("\n".join(reversed([TEXT[i:i + 300] for i in range(0, len(TEXT), 300)])))
  return {"root": root, "small": small, "large": large, "other": other, "text": text,
          "calib": calib}


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
                "--calib_text", str(anchors["calib"]))
  assert result.returncode == 0, result.stderr
  for word in ("small anchor", "large anchor", "alpha =", "layers x", "params",
               "perplexity", " s", "large-anchor layers (calibration loss"):
    assert word in result.stdout, (word, result.stdout)
  config, params = hf_io.load_hf(out)
  assert num_params(config) == json.loads((out / "cbd_init.json").read_text())["num_params"]
  assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (
      3, 48, 6, 3)
  assert config == sizing.resolve_size(size, anchors["small"], anchors["large"]).replace(
      real_vocab_size=config.real_vocab_size, bos_token_id=config.bos_token_id,
      eos_token_id=config.eos_token_id)
  ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 12))
  ours = np.asarray(model.forward(config, params, ids))
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


def _manifest(root, entries):
  anchors = [{"name": name, "path": path, "num_params": num_params(cfg), "config": cfg.to_dict(),
              "status": status, "tokens": 0, "eval": {}} for name, path, cfg, status in entries]
  (root / "chain.json").write_text(json.dumps({"source": anchors[0], "anchors": anchors,
                                               "config": {}}))


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
        seq_len=16, eval_tokens=136, calib_tokens=170, dtype="bfloat16", log=lines.append))
    assert any("held-out perplexity on 128 tokens" in line for line in lines), lines
  a, b = (hf_io.load_hf(tmp_path / f"t{i}")[1] for i in range(2))
  jax_equal = [np.array_equal(x, y) for x, y in zip(resize.flatten(a).values(),
                                                      resize.flatten(b).values(), strict=True)]
  assert all(jax_equal)  # The held-out text changed; the target did not.
  first = summaries[0]
  assert first["alpha"] == summaries[1]["alpha"] and first["calibration_tokens"] == 160
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
