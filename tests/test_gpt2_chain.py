"""configs/gpt2_chain.py: the paper's GPT-2 chain (XL -> L -> M -> base from public checkpoints),
and its smoke variant end to end: chain, anchors in transformers, a target between two anchors."""

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


def _config_module():
  spec = importlib.util.spec_from_file_location("gpt2_chain", ROOT / "configs" / "gpt2_chain.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _published(shape: dict) -> ModelConfig:
  """A GPT-2 of a published shape: head_dim 64, FFN 4 x width, vocab 50,257, 1,024 positions."""
  return ModelConfig(family="gpt2", vocab_size=50257, head_dim=64, num_kv_heads=shape["num_heads"],
                     intermediate_size=4 * shape["hidden_size"], max_position_embeddings=1024,
                     tie_embeddings=True, **shape)


def test_chain_is_the_papers_public_checkpoints():
  module = _config_module()
  config = module.get_config("")
  assert config.source.path == "openai-community/gpt2-xl" and not config.source.random_init
  assert [link.init for link in config.chain] == [
      "openai-community/gpt2-large", "openai-community/gpt2-medium", "openai-community/gpt2"]
  assert all(not any(dict(link.shape).values()) for link in config.chain)  # No Shrink start.
  assert config.data.train == "Skylion007/openwebtext" and config.workdir == "runs/gpt2_chain"
  assert all(link.seq_len <= 1024 for link in config.chain)  # GPT-2's position table.
  counts = {name: num_params(_published(s)) for name, s in module.GPT2_SHAPES.items()}
  assert counts == {"gpt2-xl": 1_557_611_200, "gpt2-large": 774_030_080,
                    "gpt2-medium": 354_823_168, "gpt2": 124_439_808}
  small, medium = _published(module.GPT2_SHAPES["gpt2"]), _published(
      module.GPT2_SHAPES["gpt2-medium"])
  target = sizing.resolve_size("138m", small, medium)
  assert (target.num_layers, target.hidden_size) == (14, 768)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """`python launch/train_chain.py --config=configs/gpt2_chain.py:smoke`, as a user runs it."""
  workdir = tmp_path_factory.mktemp("gpt2_smoke") / "run"
  env = user_env(JAX_PLATFORMS="cpu")
  start = time.time()
  result = subprocess.run([sys.executable, "launch/train_chain.py",
                           "--config=configs/gpt2_chain.py:smoke", f"--config.workdir={workdir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  print(f"gpt2 smoke chain: {time.time() - start:.1f} s")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, env


def test_smoke_chain_builds_three_gpt2_anchors_and_a_target(smoke):
  import torch
  from transformers import AutoModelForCausalLM

  workdir, env = smoke
  doc = json.loads((workdir / "chain.json").read_text())
  assert doc["source"]["config"]["family"] == "gpt2"
  assert [a["name"] for a in doc["anchors"]] == ["gpt2-large", "gpt2-medium", "gpt2"]
  assert all(a["status"] == "done" for a in doc["anchors"])
  counts = [doc["source"]["num_params"]] + [a["num_params"] for a in doc["anchors"]]
  assert counts == sorted(counts, reverse=True) and len(set(counts)) == 4
  hf = AutoModelForCausalLM.from_pretrained(workdir / "anchors" / "gpt2", dtype=torch.float32)
  assert type(hf).__name__ == "GPT2LMHeadModel" and hf.config.n_layer == 1
  out = workdir / "targets" / "17k"
  result = subprocess.run([sys.executable, "launch/init_model.py", f"--chain={workdir}",
                           "--size=17k", f"--out={out}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  target = json.loads((out / "config.json").read_text())
  assert (target["n_layer"], target["n_embd"]) == (2, 16)  # Between 1 x 16 and 2 x 32.
  hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  assert abs(sum(p.numel() for p in hf.parameters()) - 17_000) <= 0.03 * 17_000
