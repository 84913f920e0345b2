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
from launch_env import user_env

from cbd_jax.chain import driver
from cbd_jax.checkpoints import hf_io, manifest
from cbd_jax.interpolation import target
from cbd_jax.model import decoder

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
  env = user_env()
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  print(f"smoke chain: {time.time() - start:.1f} s")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def _heldout_kl(teacher, student, text_file, rows, seq_len) -> float:
  """KL(teacher || student) at T = 1 over the real vocabulary, mean over the held-out positions
  of the first ``rows`` rows (documents are lines, each followed by EOS, packed in order), from
  PyTorch transformers' logits, in float64 numpy."""
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  tok = AutoTokenizer.from_pretrained(str(student))
  ids = []
  for line in Path(text_file).read_text().split("\n"):
    if line.strip():
      ids += tok(line, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    if len(ids) >= rows * (seq_len + 1):
      break
  x = torch.tensor(ids[:rows * (seq_len + 1)]).reshape(rows, seq_len + 1)[:, :-1]
  logp = []
  for folder in (teacher, student):
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
      z = hf(x).logits.double().numpy()[..., :len(tok)]
    z = z - z.max(-1, keepdims=True)
    logp.append(z - np.log(np.exp(z).sum(-1, keepdims=True)))
  lp, lq = logp
  return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def test_smoke_chain_writes_manifest_metrics_and_anchors(smoke):
  workdir, result = smoke
  doc = json.loads((workdir / "chain.json").read_text())
  assert [a["name"] for a in doc["anchors"]] == ["anchor1", "anchor2"]
  counts = [doc["source"]["num_params"]] + [a["num_params"] for a in doc["anchors"]]
  assert counts == sorted(counts, reverse=True)  # Large to small.
  teacher = Path(doc["source"]["path"])
  for anchor in doc["anchors"]:
    assert anchor["status"] == "done"
    assert anchor["tokens"] == 8 * 8 * 2 * 64  # steps * batch * microbatches * seq_len.
    # The final held-out KL to its teacher (2 batches of 8 rows of 64), recomputed from PyTorch's
    # logits of the two exported folders.
    kl = _heldout_kl(teacher, workdir / anchor["path"], doc["config"]["data"]["heldout"], 16, 64)
    assert anchor["eval"]["kl"] == pytest.approx(kl, rel=1e-4), anchor["name"]
    teacher = workdir / anchor["path"]
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
  ours = np.asarray(decoder.forward(config, params, ids))
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_rerun_skips_finished_links(smoke):
  workdir = smoke[0]
  before = (workdir / "anchors" / "anchor2" / "model.safetensors").read_bytes()
  config = qwen_chain.get_config("smoke")
  config.workdir = str(workdir)
  doc = driver.run_chain(config)
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
  return driver.run_chain(config)


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
    driver.run_chain(config)


def test_nan_learning_rate_is_refused_before_anything_is_written(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "launch/train_chain.py", "--config=configs/qwen_chain.py:smoke",
         f"--config.workdir={workdir}", "--config.chain[1].optimizer.lr=nan",
         "--config.log.progress=False"]
  env = dict(os.environ, HF_HUB_OFFLINE="1")
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: config.chain[1] (anchor2): optimizer.lr=nan must be a number >= 1e-12 (a learning "
      "rate such as 3e-4)"]
  assert not workdir.exists()


def test_a_link_turning_non_finite_stops_in_one_line_and_keeps_its_last_finite_checkpoint(
    tmp_path):
  """The guard behind validation: a step whose loss turns non-finite (here a NaN learning rate
  given to the driver directly, as a damaged input would) stops the link."""
  from cbd_jax.chain import link, source
  from cbd_jax.checkpoints import orbax_io

  _one_link(tmp_path, stop_after=3)  # A finite checkpoint at step 3.
  config = qwen_chain.get_config("smoke")
  config.workdir = str(tmp_path)
  config.chain = (config.chain[0],)
  config.chain[0].update(dict(steps=6))
  config.chain[0].optimizer.lr = float("nan")
  config.checkpoint.every, config.eval.every, config.log.progress = 1, 0, False
  source_path, tokenizer_path = source.prepare_source(config)
  entry = manifest.read(tmp_path)["anchors"][0]
  strategy = driver.make_strategy(config, 0, tmp_path, entry, source_path, tokenizer_path)
  with pytest.raises(link.NonFiniteError) as e:
    link.train_link(strategy, entry, lambda _: entry)
  assert str(e.value) == (
      "link anchor1: non-finite param_norm at step 4; likely causes: a learning rate too high "
      "(optimizer.lr), a damaged teacher, checkpoint or token cache, token ids outside the "
      "model's vocabulary; last finite checkpoint kept: step 3; nothing was exported")
  manager = orbax_io.make_checkpoint_manager(tmp_path / "checkpoints" / "anchor1", 1)
  assert manager.all_steps() == [3]
  assert not (tmp_path / entry["path"]).exists()


def _copy_chain(smoke, tmp_path) -> Path:
  import shutil

  workdir = tmp_path / "chain"
  shutil.copytree(smoke[0], workdir, ignore=shutil.ignore_patterns("checkpoints"))
  return workdir


def test_init_model_and_report_refuse_an_anchor_that_is_not_the_recorded_one(smoke, tmp_path):
  from cbd_jax.chain import report

  workdir = _copy_chain(smoke, tmp_path)
  one, two = workdir / "anchors" / "anchor1", workdir / "anchors" / "anchor2"
  one.rename(tmp_path / "swap")
  two.rename(one)
  (tmp_path / "swap").rename(two)
  with pytest.raises(ValueError) as e:  # The small anchor's folder is read first.
    target.init_target(64_000, chain=workdir, out=tmp_path / "t", log=lambda _: None)
  assert str(e.value) == (
      f"{two}: not the model chain.json records (hidden_size 32 recorded, 48 in the folder; "
      "num_layers 2 recorded, 3 in the folder; num_heads 2 recorded, 4 in the folder; "
      "num_kv_heads 1 recorded, 2 in the folder; intermediate_size 64 recorded, 96 in the "
      "folder); the folder was replaced or the manifest edited: restore the folder or rebuild "
      "the chain")
  with pytest.raises(ValueError, match="not the model chain.json records"):
    report.chain_report(workdir, ROOT / "README.md", 256, 32)
  assert not (tmp_path / "t").exists()


def test_init_model_and_report_refuse_an_anchor_with_nan_weights(smoke, tmp_path):
  from cbd_jax.chain import report

  workdir = _copy_chain(smoke, tmp_path)
  weights = workdir / "anchors" / "anchor2" / "model.safetensors"
  tensors = safetensors.numpy.load_file(weights)
  name = sorted(tensors)[0]
  tensors[name] = tensors[name].copy()
  tensors[name].flat[0] = np.nan
  safetensors.numpy.save_file(tensors, weights, metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"anchor2: weight .+ holds 1 NaN or inf values of "
                                       r"[\d,]+; the model diverged or its file is damaged"):
    target.init_target(64_000, chain=workdir, out=tmp_path / "t", log=lambda _: None)
  with pytest.raises(ValueError, match="anchor2: weight .+ holds 1 NaN or inf values"):
    report.chain_report(workdir, ROOT / "README.md", 256, 32)
  assert not (tmp_path / "t").exists()
