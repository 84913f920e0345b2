"""The embedded default: its config (both variants), the no-flag entry point, and the smoke chain
on the real SmolLM2 teacher end to end (train_chain -> init_model -> report)."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_env import user_env

from cbd_jax.interpolation import sizing
from cbd_jax.model.config import ModelConfig, num_params

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ModelConfig(family="llama", vocab_size=49_152, hidden_size=576, num_layers=30,
                      num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536,
                      tie_embeddings=True)


def _default():
  spec = importlib.util.spec_from_file_location("default", ROOT / "configs" / "default.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("variant", ["", "smoke"])
def test_default_config_is_a_smollm2_chain_of_80m_and_33m_anchors(variant):
  config = _default().get_config(variant)
  assert config.source.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
  assert Path(config.data.train).name == "wiki_train.txt"
  assert Path(config.data.heldout).name == "news_heldout.txt"
  counts = [num_params(SMOLLM2.replace(**dict(link.shape))) for link in config.chain]
  if not variant:
    # Within 15% of the chain's first anchors (70.8M and 30.1M), whatever shapes measure best.
    assert 60.2e6 < counts[0] < 81.4e6 and 25.6e6 < counts[1] < 34.6e6
  assert counts[0] > counts[1]
  assert [link.bridge for link in config.chain] == ["none", "none"]
  assert config.workdir == ("runs/smollm2_chain" if not variant else "runs/smollm2_chain_smoke")
  # The report's target size lies between the anchors, so init_model finds them.
  small, large = (SMOLLM2.replace(**dict(link.shape)) for link in reversed(config.chain))
  target = sizing.resolve_size(config.report.target_size, small, large)
  assert counts[1] < num_params(target) < counts[0]


def test_unknown_variant_names_the_valid_ones():
  with pytest.raises(ValueError, match="smoke"):
    _default().get_config("tiny")


def test_train_chain_without_config_runs_the_default():
  code = ("import sys, runpy; sys.argv = ['train_chain.py', '--config.chain[1].tokens=7']; "
          "m = runpy.run_path('launch/train_chain.py', run_name='probe'); "
          "argv = m['_with_default_config'](sys.argv); "
          "from absl import flags; flags.FLAGS(argv); c = flags.FLAGS.config; "
          "print(c.workdir, c.source.path, c.chain[0].name, c.chain[1].tokens)")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  workdir, source, first, tokens = out.stdout.split()
  assert workdir == "runs/smollm2_chain" and source.endswith(".gguf")
  assert first == "smollm2-80m" and tokens == "7"  # Overrides apply on top of the default.


def _byte_of_char() -> dict[str, int]:
  """The byte each character of a byte-level BPE piece stands for (GPT-2's table)."""
  bs = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1)]
  cs, extra = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + extra)
      extra += 1
  return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _torch_quality(folder, text_file, tokens, seq_len) -> tuple[float, float]:
  """(perplexity, bits per byte) of a Hugging Face folder in PyTorch transformers on the first
  ``tokens`` tokens of the text (non-blank lines, each ending in a newline), in rows of
  seq_len + 1; the bytes are those of the predicted tokens' byte-level pieces."""
  import math

  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  tok = AutoTokenizer.from_pretrained(str(folder))
  ids = []
  for line in Path(text_file).read_text().split("\n"):
    if line.strip():
      ids += tok(line.strip() + "\n", add_special_tokens=False)["input_ids"]
    if len(ids) >= tokens:
      break
  n = min(tokens, len(ids)) // (seq_len + 1)
  rows = torch.tensor(ids[:n * (seq_len + 1)]).reshape(n, seq_len + 1)
  hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
  with torch.no_grad():
    logits = hf(rows[:, :-1]).logits.double()
  nll = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                rows[:, 1:].reshape(-1), reduction="sum"))
  byte_of = _byte_of_char()
  pieces = tok.convert_ids_to_tokens(rows[:, 1:].reshape(-1).tolist())
  num_bytes = sum(len(bytes(byte_of[c] for c in p)) for p in pieces)
  return math.exp(nll / rows[:, 1:].numel()), nll / (math.log(2) * num_bytes)


def _run(*args, timeout=600):
  start = time.time()
  env = user_env()
  out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
  print(f"{' '.join(args[:2])}: {time.time() - start:.1f} s")
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def test_smoke_chain_then_init_model_then_report(tmp_path):
  workdir = tmp_path / "chain"
  size = _default().get_config("smoke").report.target_size
  _run("launch/train_chain.py", "--config=configs/default.py:smoke", f"--config.workdir={workdir}")
  doc = json.loads((workdir / "chain.json").read_text())
  assert [a["status"] for a in doc["anchors"]] == ["done", "done"]
  assert doc["source"]["num_params"] == num_params(SMOLLM2) == 134_515_008
  # A quarter of the default calibration text: the same stages, a quarter of the head's work.
  _run("launch/init_model.py", f"--size={size}", f"--chain={workdir}", "--calib_tokens=512")
  summary = json.loads((workdir / "targets" / size / "cbd_init.json").read_text())
  assert abs(summary["num_params"] - sizing.parse_size(size)) / sizing.parse_size(size) < 0.03
  out = _run("launch/report.py", f"--chain={workdir}", "--eval_tokens=256", "--seq_len=32")
  report = json.loads((workdir / "report.json").read_text())
  roles = [m["role"] for m in report["models"]]
  assert roles == ["source", "anchor", "anchor", "target", "counts", "counts"]
  counts = {m["name"]: m for m in report["models"] if m["role"] == "counts"}
  assert counts.keys() == {"unigram counts", "bigram counts"}  # Checked in test_baselines.
  assert all(1 < m["ppl"] < 49_152 for m in counts.values())  # Finite, below a uniform guess.
  report["models"] = [m for m in report["models"] if m["role"] != "counts"]
  for m in report["models"]:  # Each figure recomputed in PyTorch transformers from its folder.
    ppl, bpb = _torch_quality(m["path"], report["heldout"]["file"], 256, 32)
    assert m["ppl"] == pytest.approx(ppl, rel=1e-4), m["name"]
    assert m["bpb"] == pytest.approx(bpb, rel=1e-4), m["name"]
  source, target = report["models"][0], report["models"][-1]
  assert source["ppl"] < 200  # The real teacher on real news text (about 45 at full length).
  assert target["tokens"] == 0 and target["teacher_flops"] == 0
  anchor1 = report["models"][1]
  assert anchor1["teacher_flops"] == 2 * 134_515_008 * anchor1["tokens"]
  assert "teacher calls spent on it: 0" in out.stdout and str(workdir / "targets") in out.stdout


def test_a_link_transformers_could_not_load_is_refused_before_anything_is_written(tmp_path):
  """Link 1 of 1 x 160 with 3 heads (Llama): transformers' LlamaConfig refuses such a shape, so
  the anchor could never be loaded; the run must stop before link 0 trains, in one line."""
  import transformers

  with pytest.raises(Exception, match="not a multiple of the number of attention heads"):
    transformers.LlamaConfig(hidden_size=160, num_attention_heads=3, num_key_value_heads=1,
                             head_dim=64)
  workdir = tmp_path / "run"
  out = subprocess.run([sys.executable, "launch/train_chain.py",
                        "--config=configs/default.py:smoke", f"--config.workdir={workdir}",
                        "--config.chain[1].shape.hidden_size=160"],
                       cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1] == (
      "error: config.chain[1] (smollm2-34m): the student's hidden_size 160 is not a multiple of "
      "num_heads 3, which transformers' LlamaConfig refuses (its anchor could not be loaded); "
      "pick a hidden_size that num_heads divides")
  assert not workdir.exists()
