"""The chain driver end to end: the smoke chain, its anchors in transformers, resume, init_model."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from cbd_jax import chain, hf_io, manifest, model, target

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import qwen_chain  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """`python launch/train_chain.py --config=configs/qwen_chain.py:smoke`, as a user runs it."""
  workdir = tmp_path_factory.mktemp("smoke") / "run"
  cmd = [sys.executable, "launch/train_chain.py", "--config=configs/qwen_chain.py:smoke",
         f"--config.workdir={workdir}"]
  start = time.time()
  env = dict(os.environ, HF_HUB_OFFLINE="1")
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  print(f"smoke chain: {time.time() - start:.1f} s")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def test_smoke_chain_writes_manifest_metrics_and_anchors(smoke):
  workdir, result = smoke
  doc = json.loads((workdir / "chain.json").read_text())
  assert [a["name"] for a in doc["anchors"]] == ["anchor1", "anchor2"]
  counts = [doc["source"]["num_params"]] + [a["num_params"] for a in doc["anchors"]]
  assert counts == sorted(counts, reverse=True)  # Large to small.
  for anchor in doc["anchors"]:
    assert anchor["status"] == "done"
    assert anchor["tokens"] == 8 * 8 * 2 * 64  # steps * batch * microbatches * seq_len.
    assert np.isfinite(anchor["eval"]["kl"]) and anchor["eval"]["kl"] >= 0
    assert (workdir / anchor["path"] / "tokenizer.json").exists()
    rows = [json.loads(x) for x in (workdir / "metrics" / f"{anchor['name']}.jsonl").open()]
    assert any("train/loss" in r for r in rows) and any("eval/kl" in r for r in rows)
  assert doc["config"]["chain"][1]["loss"]["ce_weight"] == 0.1
  assert "anchor2 done" in result.stderr


def test_anchors_load_in_transformers_with_our_logits(smoke):
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  folder = smoke[0] / "anchors" / "anchor2"
  tokenizer = AutoTokenizer.from_pretrained(folder)
  ids = tokenizer("The river runs past the old mill.", return_tensors="np")["input_ids"]
  torch_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = torch_model(torch.from_numpy(ids)).logits.numpy()
  config, params = hf_io.load_hf(folder)
  ours = np.asarray(model.forward(config, params, ids))
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_rerun_skips_finished_links(smoke):
  workdir = smoke[0]
  before = (workdir / "anchors" / "anchor2" / "model.safetensors").read_bytes()
  config = qwen_chain.get_config("smoke")
  config.workdir = str(workdir)
  doc = chain.run_chain(config)
  assert [a["status"] for a in doc["anchors"]] == ["done", "done"]
  assert (workdir / "anchors" / "anchor2" / "model.safetensors").read_bytes() == before


def test_init_model_between_the_smoke_anchors(smoke):
  workdir = smoke[0]
  out = workdir.parent / "target"
  summary = target.init_target(64_000, chain=workdir, out=out, log=lambda _: None)
  config, _ = hf_io.load_hf_numpy(out)
  small, large = sorted(a["num_params"] for a in manifest.done_anchors(manifest.read(workdir)))
  assert small < 64_000 < large  # The request lies between the two anchors ...
  assert small < summary["num_params"] < large  # ... and so does the target.
  assert abs(summary["num_params"] - 64_000) <= 0.03 * 64_000
  assert config.vocab_size == 512 and (out / "tokenizer.json").exists()


def _one_link(workdir, stop_after=0):
  config = qwen_chain.get_config("smoke")
  config.workdir = str(workdir)
  config.chain = (config.chain[0],)
  config.chain[0].steps = 6
  config.checkpoint.every = 3
  config.eval.every = 0
  config.eval.num_batches = 1
  config.log.progress = False
  config.stop_after = stop_after
  return chain.run_chain(config)


def test_resume_after_k_steps_equals_uninterrupted(tmp_path):
  whole = _one_link(tmp_path / "whole")
  part = _one_link(tmp_path / "part", stop_after=3)
  assert part["anchors"][0]["status"] == "running" and part["anchors"][0]["steps"] == 3
  assert not (tmp_path / "part" / "anchors" / "anchor1").exists()
  resumed = _one_link(tmp_path / "part")
  assert resumed["anchors"][0]["status"] == whole["anchors"][0]["status"] == "done"
  a = safetensors.numpy.load_file(tmp_path / "whole" / "anchors" / "anchor1" / "model.safetensors")
  b = safetensors.numpy.load_file(tmp_path / "part" / "anchors" / "anchor1" / "model.safetensors")
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert resumed["anchors"][0]["eval"] == whole["anchors"][0]["eval"]


def test_changed_chain_in_an_existing_workdir_is_refused(tmp_path):
  _one_link(tmp_path, stop_after=1)
  config = qwen_chain.get_config("smoke")
  config.workdir = str(tmp_path)
  with pytest.raises(ValueError, match="use another workdir"):
    chain.run_chain(config)


def test_nan_learning_rate_stops_the_link_with_one_line_and_exports_nothing(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "launch/train_chain.py", "--config=configs/qwen_chain.py:smoke",
         f"--config.workdir={workdir}", "--config.chain[0].optimizer.lr=nan",
         "--config.log.progress=False"]
  env = dict(os.environ, HF_HUB_OFFLINE="1")
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: link anchor1: non-finite") and "optimizer.lr" in last
  assert "Traceback" not in result.stderr
  doc = json.loads((workdir / "chain.json").read_text(), parse_constant=pytest.fail)
  assert [a["status"] for a in doc["anchors"]] == ["running", "pending"]
  assert not (workdir / "anchors").exists()


def test_a_link_turning_non_finite_keeps_its_last_finite_checkpoint(tmp_path):
  from cbd_jax import checkpoint, link_driver

  _one_link(tmp_path, stop_after=3)  # A finite checkpoint at step 3.
  config = qwen_chain.get_config("smoke")
  config.workdir = str(tmp_path)
  config.chain = (config.chain[0],)
  config.chain[0].update(dict(steps=6))
  config.chain[0].optimizer.lr = float("nan")
  config.checkpoint.every, config.eval.every, config.log.progress = 1, 0, False
  with pytest.raises(link_driver.NonFiniteError, match="at step 4;.*checkpoint kept: step 3"):
    chain.run_chain(config)
  manager = checkpoint.make_checkpoint_manager(tmp_path / "checkpoints" / "anchor1", 1)
  assert manager.all_steps() == [3]
  entry = manifest.read(tmp_path)["anchors"][0]
  assert entry["status"] == "running" and not (tmp_path / entry["path"]).exists()
