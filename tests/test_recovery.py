"""Recovery training: launch/train_target.py on a tiny model, the KD mix, resume, bad input."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from launch_env import user_env

from cbd_jax.chain import metrics, recovery
from cbd_jax.checkpoints import assets, hf_io
from cbd_jax.evaluation import heldout
from cbd_jax.model.config import num_params

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import recovery as recovery_config  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """`python launch/train_target.py --config=configs/recovery.py:smoke`, as a user runs it."""
  root = tmp_path_factory.mktemp("recovery")
  model, workdir = root / "model-0", root / "run"
  cmd = [sys.executable, "launch/train_target.py", "--config=configs/recovery.py:smoke",
         f"--config.model={model}", f"--config.workdir={workdir}"]
  start = time.time()
  env = user_env()
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  print(f"recovery smoke: {time.time() - start:.1f} s")
  assert result.returncode == 0, result.stderr[-3000:]
  return model, workdir


def _heldout_loss(folder) -> float:
  """Held-out loss on the news text (the smoke run trains on Wikipedia only)."""
  config, params = hf_io.load_hf_numpy(folder)
  text = heldout.load_heldout(hf_io.load_tokenizer(folder), assets.english_text()["heldout"],
                              2048, 64)
  return heldout.evaluate(config, params, text)["loss"]


def test_recovery_lowers_heldout_loss_and_exports_a_transformers_folder(smoke):
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  model, workdir = smoke
  out = workdir / "model"
  before, after = _heldout_loss(model), _heldout_loss(out)
  print(f"held-out loss {before:.3f} -> {after:.3f}")
  assert after < before - 0.5  # 24 steps of a random 2-layer model: at least unigram statistics.
  tokenizer = AutoTokenizer.from_pretrained(out)
  ids = tokenizer("The river runs past the old mill.", return_tensors="pt")["input_ids"]
  with torch.no_grad():
    logits = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
  assert np.isfinite(logits.numpy()).all()
  summary = json.loads((out / recovery.SUMMARY).read_text())
  config = recovery_config.get_config("smoke")
  assert summary["initialised_from"] == str(model) and summary["teacher"] is None
  assert summary["tokens"] == config.steps * config.batch_size * config.seq_len
  assert summary["teacher_flops"] == 0
  assert summary["num_params"] == num_params(hf_io.load_hf_numpy(model)[0])
  rows = metrics.read_jsonl(workdir / "metrics" / "recovery.jsonl")
  assert [r["step"] for r in rows if "train/loss" in r] == list(range(4, 25, 4))
  assert [r["step"] for r in rows if "eval/ce" in r] == [12, 24]


def _config(model, workdir, **kw):
  config = recovery_config.get_config("smoke")
  config.model, config.workdir, config.steps = str(model), str(workdir), 2
  config.log.every, config.eval.every, config.eval.num_batches = 1, 0, 1
  config.checkpoint.every = 1
  for key, value in kw.items():
    config[key] = value
  return config


def test_kd_mix_from_a_teacher_resumes_and_counts_teacher_flops(smoke, tmp_path):
  model = smoke[0]
  config = _config(model, tmp_path, teacher=str(model), stop_after=1)
  config.loss.update(dict(kd_weight=0.5, ce_weight=1.0))
  part = recovery.train_target(config)
  assert part["status"] == "running" and part["steps"] == 1
  config.stop_after = 0
  done = recovery.train_target(config)
  tokens = 2 * config.batch_size * config.seq_len
  assert done["status"] == "done" and done["tokens"] == tokens
  teacher_params = num_params(hf_io.load_hf_numpy(model)[0])
  assert done["teacher_flops"] == 2 * teacher_params * tokens
  assert done["eval"]["kl"] >= 0 and np.isfinite(done["eval"]["teacher_ppl"])
  assert recovery.train_target(config) == done  # Finished: a rerun does nothing.


def test_bad_recovery_configs_are_refused_with_one_line(smoke, tmp_path):
  model = smoke[0]
  config = _config(model, tmp_path)
  config.loss.kd_weight = 1.0
  with pytest.raises(ValueError, match="needs a teacher"):
    recovery.train_target(config)
  with pytest.raises(ValueError, match="is the model itself"):
    recovery.train_target(_config(model, tmp_path, out=str(model)))
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="overwrite"):
    recovery.train_target(_config(model, tmp_path / "w", out=str(foreign)))
  assert (foreign / "keep.txt").read_text() == "mine"
