"""launch/init_model.py end to end on tiny anchors: a folder transformers loads, clear failures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers

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
  hf_io.save_hf(config, random_params(config, seed), folder, tokenizer=_tokenizer())
  return config


def random_params(config, seed):
  """Random params of every leaf's shape (no compile: the shapes come from `param_shapes`)."""
  rng = np.random.default_rng(seed)
  return resize.unflatten({path: (0.1 * rng.standard_normal(shape)).astype(np.float32)
                           for path, shape in resize.param_shapes(config).items()})


@pytest.fixture(scope="module")
def anchors(tmp_path_factory):
  root = tmp_path_factory.mktemp("anchors")
  vocab = _tokenizer().get_vocab_size()
  small = _anchor(root / "small", "llama", 2, 32, 4, 2, 64, 0, vocab, tie_embeddings=True)
  large = _anchor(root / "large", "llama", 4, 64, 8, 4, 128, 1, vocab, tie_embeddings=True)
  other = _anchor(root / "gpt2", "gpt2", 2, 32, 4, 4, 128, 2, vocab)
  text = root / "heldout.txt"
  text.write_text("\n".join([TEXT[i:i + 400] for i in range(0, len(TEXT), 400)]))
  return {"root": root, "small": small, "large": large, "other": other, "text": text}


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
  return subprocess.run([sys.executable, str(ROOT / "launch" / "init_model.py"), *args],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_end_to_end_folder_loads_in_transformers(anchors):
  import torch
  import transformers

  root = anchors["root"]
  size = num_params(sizing.shape_at(anchors["small"], anchors["large"], 3, 48)[0])
  out = root / "target"
  result = _run(f"--size={size}", "--anchors", f"{root / 'large'},{root / 'small'}",
                "--out", str(out), "--text", str(anchors["text"]), "--seq_len", "32")
  assert result.returncode == 0, result.stderr
  for word in ("small anchor", "large anchor", "alpha =", "layers x", "params",
               "perplexity", " s"):
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


def test_alpha_sweep_picks_an_alpha_on_half_the_text_and_reports_on_the_other(anchors, tmp_path):
  root = anchors["root"]
  size = num_params(sizing.shape_at(anchors["small"], anchors["large"], 3, 48)[0])
  lines = []
  summary = target.init_target(size, anchors=f"{root / 'small'},{root / 'large'}",
                               out=tmp_path / "t", text=anchors["text"], alpha_sweep=True,
                               seq_len=16, eval_tokens=136, dtype="bfloat16",
                               log=lines.append)
  assert set(summary["alpha_sweep"]) == {round(a / 10, 1) for a in range(11)}
  assert summary["alpha"] == min(summary["alpha_sweep"], key=summary["alpha_sweep"].get)
  assert any("alpha sweep" in line for line in lines)
  assert "(64 tokens of" in lines[-2]  # 8 rows of 17: 4 rows for the sweep, 4 (64 tokens) scored.
  config, params = hf_io.load_hf(tmp_path / "t")
  assert config.num_layers == 3 and params["embed"]["embedding"].dtype == "bfloat16"
  with pytest.raises(ValueError, match="--alpha and --alpha_sweep"):
    target.init_target(size, anchors=f"{root / 'small'},{root / 'large'}", alpha=0.5,
                       alpha_sweep=True, text=anchors["text"], out=tmp_path / "u", log=str)
  with pytest.raises(ValueError, match="pass --text"):
    target.init_target(size, anchors=f"{root / 'small'},{root / 'large'}", alpha_sweep=True,
                       out=tmp_path / "u", log=str)


def test_every_flag_is_documented_in_help():
  result = _run("--help")
  assert result.returncode == 0
  for flag in ("--size", "--chain", "--anchors", "--out", "--overwrite", "--alpha ",
               "--alpha_sweep", "--text", "--shrink_method", "--grow_method", "--depth",
               "--renormalize", "--no_align_layers", "--dtype", "--use_source", "--eval_tokens",
               "--seq_len"):
    assert flag in result.stdout, flag
