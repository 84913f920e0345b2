"""Faults injected into the chain driver, each with its exact outcome: SIGTERM and kill -9 mid-link
resume bit for bit (metrics too), a damaged latest checkpoint falls back to an intact one, a busy
workdir and a changed config are refused in one line, and bad values stop the run before any
link trains."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from cbd_jax import cli, errors
from cbd_jax.chain import guards, metrics
from cbd_jax.checkpoints import manifest, orbax_io

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60
CONFIG = f'''
import sys
sys.path.insert(0, {str(ROOT)!r})
from configs import qwen_chain


def get_config(arg=None):
  """The smoke chain's first link, {STEPS} steps, checkpoints every 5, a row every 2 steps."""
  c = qwen_chain.get_config("smoke")
  c.workdir = arg
  c.chain = (c.chain[0],)
  c.chain[0].steps = {STEPS}
  c.checkpoint.every = 5
  c.eval.every = 0
  c.log.update(dict(every=2, progress=False))
  return c
'''


def _config_file(tmp_path: Path) -> Path:
  path = tmp_path / "long_link.py"
  path.write_text(CONFIG)
  return path


def _run(config_file: Path, workdir: Path, *overrides: str) -> dict:
  """The chain run in this process, as `launch/train_chain.py --config=FILE:WORKDIR` runs it."""
  from cbd_jax.chain import driver

  return driver.run_chain(cli.load_config(f"{config_file}:{workdir}", overrides))


def _anchor(workdir: Path) -> dict[str, np.ndarray]:
  return safetensors.numpy.load_file(workdir / "anchors" / "anchor1" / "model.safetensors")


def _rows(workdir: Path) -> list[dict]:
  """Metric rows without wall-clock fields (time, throughput)."""
  rows = metrics.read_jsonl(workdir / "metrics" / "anchor1.jsonl")
  return [{k: v for k, v in r.items() if k not in ("time", "train/tokens_per_s")} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run: its anchor, metric rows and manifest."""
  tmp = tmp_path_factory.mktemp("reference")
  workdir = tmp / "run"
  doc = _run(_config_file(tmp), workdir)
  return _anchor(workdir), _rows(workdir), doc


def _assert_same_run(workdir: Path, reference) -> None:
  anchor, rows, doc = reference
  ours = _anchor(workdir)
  assert ours.keys() == anchor.keys()
  for key in anchor:
    np.testing.assert_array_equal(ours[key], anchor[key], err_msg=key)
  assert _rows(workdir) == rows
  entry = manifest.read(workdir)["anchors"][0]
  assert entry["status"] == "done" and entry["eval"] == doc["anchors"][0]["eval"]


def _start_and_signal(config_file: Path, workdir: Path, signum: int, after_step: int):
  """Starts the chain as a user does, sends ``signum`` once a metric row at ``after_step`` or
  later is written, and returns (exit code, stderr lines)."""
  env = dict(os.environ, HF_HUB_OFFLINE="1")
  env.pop("CBD_DEBUG", None)
  proc = subprocess.Popen([sys.executable, "launch/train_chain.py",
                           f"--config={config_file}:{workdir}"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  rows = workdir / "metrics" / "anchor1.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if any(r["step"] >= after_step for r in metrics.read_jsonl(rows) if rows.exists()):
      proc.send_signal(signum)
      break
    time.sleep(0.02)
  _, err = proc.communicate(timeout=300)
  return proc.returncode, err.strip().splitlines()


def test_sigterm_mid_link_saves_its_step_and_the_rerun_equals_an_uninterrupted_run(
    tmp_path, reference):
  workdir = tmp_path / "run"
  config_file = _config_file(tmp_path)
  code, err = _start_and_signal(config_file, workdir, signal.SIGTERM, after_step=12)
  assert code == 143, err[-5:]
  found = re.fullmatch(r"stopped: link anchor1 stopped by SIGTERM at step (\d+) of 60; "
                       r"checkpoint saved; run the same command again to resume", err[-1])
  assert found, err[-5:]
  step = int(found.group(1))
  assert 12 <= step < STEPS
  assert "Traceback" not in "\n".join(err)
  entry = manifest.read(workdir)["anchors"][0]
  assert (entry["status"], entry["steps"]) == ("running", step)
  manager = orbax_io.make_checkpoint_manager(workdir / "checkpoints" / "anchor1", 5)
  assert manager.latest_step() == step
  assert not (workdir / "anchors").exists()
  _run(config_file, workdir)
  _assert_same_run(workdir, reference)


def test_kill_9_mid_link_resumes_to_the_uninterrupted_run(tmp_path, reference):
  workdir = tmp_path / "run"
  config_file = _config_file(tmp_path)
  code, _ = _start_and_signal(config_file, workdir, signal.SIGKILL, after_step=12)
  assert code == -signal.SIGKILL
  assert manifest.read(workdir)["anchors"][0]["status"] == "running"
  _run(config_file, workdir)  # Takes over the dead run's lock, drops its later metric rows.
  _assert_same_run(workdir, reference)


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, caplog):
  workdir = tmp_path / "run"
  config_file = _config_file(tmp_path)
  _run(config_file, workdir, "stop_after=12")  # Checkpoints at 10 and 12 (keep=2).
  folder = workdir / "checkpoints" / "anchor1"
  assert orbax_io.make_checkpoint_manager(folder, 5).all_steps() == [10, 12]
  data_files = [p for p in (folder / "12").rglob("*") if p.is_file() and p.stat().st_size > 4096]
  assert data_files
  for path in data_files:  # A truncated copy, as a disk or a killed copy leaves it.
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
  with caplog.at_level(logging.WARNING, logger="cbd_jax.checkpoints.orbax_io"):
    _run(config_file, workdir)
  assert re.search(rf"checkpoint {re.escape(str(folder / '12'))} is damaged \(.+\); moved aside to "
                   r"12\.corrupt and trying an older step", caplog.text)
  assert (folder / "12.corrupt").is_dir()  # Kept, not deleted.
  _assert_same_run(workdir, reference)


def test_a_second_run_on_a_busy_workdir_is_refused_and_a_dead_runs_lock_is_taken_over(
    tmp_path, caplog):
  workdir = tmp_path / "run"
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from cbd_jax.chain import guards\n"
       f"with guards.WorkdirLock({str(workdir)!r}):\n  print('held', flush=True); time.sleep(600)"],
      cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(guards.WorkdirBusy) as e:
      _run(_config_file(tmp_path), workdir)
    assert re.fullmatch(
        rf"{re.escape(str(workdir))} is in use by pid {holder.pid} on \S+ since [\d: -]+; wait "
        "for that run to finish, stop it, or use another workdir", str(e.value)), str(e.value)
  finally:
    holder.kill()
    holder.wait()
  with caplog.at_level(logging.WARNING, logger="cbd_jax.chain.guards"), guards.WorkdirLock(workdir):
    held = json.loads((workdir / guards.LOCK).read_text())
  assert held["pid"] == os.getpid()
  assert f"taking over the lock of pid {holder.pid}" in caplog.text
  assert (workdir / guards.LOCK).read_text() == ""  # Released on exit.


def test_resuming_with_a_changed_config_is_refused_unless_allowed_and_then_recorded(tmp_path):
  workdir = tmp_path / "run"
  config_file = _config_file(tmp_path)
  _run(config_file, workdir, "stop_after=5")
  changed = ("chain[0].optimizer.lr=0.001", "chain[0].shape.num_layers=2",
             "chain[0].loss.chunk_size=64")  # The loss chunk is speed and memory only.
  with pytest.raises(ValueError) as e:
    _run(config_file, workdir, *changed)
  assert str(e.value) == (
      "link anchor1 was started with another config (optimizer.lr 0.003 -> 0.001, "
      "shape.num_layers 3 -> 2); rerun with the original values, use another workdir, or pass "
      "--config.allow_changes=True to go on with the new values (recorded in the manifest)")
  _run(config_file, workdir, "chain[0].optimizer.lr=0.001", "allow_changes=True",
       "stop_after=5")
  entry = manifest.read(workdir)["anchors"][0]
  assert entry["changes"] == [{"at_step": 5, "fields": {"optimizer.lr": [0.003, 0.001]}}]
  assert entry["fingerprint"]["optimizer.lr"] == 0.001 and entry["steps"] == 10


def _smoke_error(tmp_path: Path, *overrides: str, spec="configs/qwen_chain.py:smoke") -> str:
  """The one-line error of a smoke chain with ``overrides`` (run in this process, as the launch
  script runs it), after checking nothing was written in the workdir."""
  from cbd_jax.chain import driver

  config = cli.load_config(spec, [*overrides, f"workdir={tmp_path / 'run'}"])
  with pytest.raises((ValueError, OSError)) as e:
    driver.run_chain(config)
  assert not (tmp_path / "run").exists()
  return errors.one_line(e.value)


@pytest.mark.parametrize("overrides, expected", [
    (["chain[0].tokens=-100"],
     "config.chain[0] (anchor1): tokens=-100 must be a number >= 0 (0 = use steps)"),
    (["stop_after=-1"],
     "config.stop_after=-1 must be a number >= 0 (steps per invocation; 0 = to the end)"),
    (["eval.batch_size=0"], "config.eval.batch_size=0 must be a number >= 1"),
    (["chain[1].dtype=foo"],
     "config.chain[1] (anchor2): dtype='foo' is not a valid dtype; use one of the valid dtypes: "
     "float32, bfloat16, float16"),
    (["chain[0].loss.temperature=0"],
     "config.chain[0] (anchor1): loss.temperature=0.0 must be a number >= 1e-06"),
    (["chain[0].optimizer.lr=1e6"],
     "config.chain[0] (anchor1): optimizer.lr=1000000.0 is far too high (the step would "
     "diverge); use a learning rate such as 3e-4"),
    # Found before link 0 trains, though it is link 1's.
    (["chain[1].batch_size=3"],
     "config.chain[1] (anchor2): batch_size=3 must be a multiple of the mesh's data x fsdp = 8 "
     "batch shards; or give per_device_batch_size instead"),
])
def test_bad_values_stop_the_run_before_any_link_trains(tmp_path, overrides, expected):
  assert _smoke_error(tmp_path, *overrides) == expected


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_before_any_link_trains(tmp_path):
  from cbd_jax.checkpoints import assets
  from cbd_jax.distill import bridge_data

  gpt2 = tmp_path / "gpt2-tokenizer"
  vocab, merges = assets.gpt2_tokenizer_files()
  bridge_data.load_student_tokenizer(f"{vocab},{merges}").save_pretrained(gpt2)
  assert _smoke_error(tmp_path, f"source.tokenizer={gpt2}") == (
      "config.chain[0] (anchor1): the teacher has 512 embedding rows but the tokenizer 50257 "
      "tokens (ids >= 512 would be out of range); use the model's own tokenizer "
      "(source.tokenizer)")


def test_seq_len_beyond_learned_positions_and_an_empty_data_file_are_refused(tmp_path):
  assert _smoke_error(tmp_path, "chain[2].seq_len=200", spec="configs/gpt2_chain.py:smoke") == (
      "config.chain[2] (gpt2): the teacher has 128 positions, fewer than seq_len=200; lower "
      "seq_len")
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  assert _smoke_error(tmp_path, f"data.heldout={empty}") == (
      f"config.data.heldout: {empty} is empty; give a file with text in it")


def test_sigterm_to_one_host_of_two_stops_both_at_the_same_step(tmp_path, reference):
  """Two processes x 4 CPU devices (jax.distributed over gloo) run the link; SIGTERM reaches only
  process 1, as a preemption notice reaches one host; JAX's preemption sync point makes both
  save the same step and stop."""
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  workdir = tmp_path / "run"
  config_file = _config_file(tmp_path)
  procs = []
  for i in range(2):
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))
    env.pop("CBD_DEBUG", None)
    procs.append(subprocess.Popen([sys.executable, "launch/train_chain.py",
                                   f"--config={config_file}:{workdir}"], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  rows = workdir / "metrics" / "anchor1.jsonl"
  deadline = time.time() + 400
  while time.time() < deadline and procs[1].poll() is None:
    if any(r["step"] >= 12 for r in metrics.read_jsonl(rows) if rows.exists()):
      procs[1].send_signal(signal.SIGTERM)
      break
    time.sleep(0.02)
  errs = [p.communicate(timeout=400)[1].strip().splitlines() for p in procs]
  assert [p.returncode for p in procs] == [143, 143], [e[-5:] for e in errs]
  steps = {re.fullmatch(r"stopped: link anchor1 stopped by SIGTERM at step (\d+) of 60; "
                        r"checkpoint saved; run the same command again to resume",
                        e[-1]).group(1) for e in errs}
  assert len(steps) == 1
  step = int(steps.pop())
  assert manifest.read(workdir)["anchors"][0]["steps"] == step
  manager = orbax_io.make_checkpoint_manager(workdir / "checkpoints" / "anchor1", 5)
  assert manager.latest_step() == step
  _run(config_file, workdir)  # One process, 8 devices: another process layout.
  # Two processes sum gradients over gloo in another order than one process does: the same run
  # up to float rounding, not bit for bit. Compared by what the model computes (held-out KL and
  # CE), since Adam turns rounding noise in parameters without gradient (the key bias, to which
  # softmax is invariant) into visible but harmless differences.
  entry = manifest.read(workdir)["anchors"][0]
  assert (entry["status"], entry["steps"]) == ("done", STEPS)
  want = reference[2]["anchors"][0]["eval"]
  for key in ("kl", "ce", "teacher_ce"):
    np.testing.assert_allclose(entry["eval"][key], want[key], rtol=1e-4, err_msg=key)


def test_the_first_ctrl_c_asks_for_a_stop_and_the_second_stops_at_once():
  previous = signal.getsignal(signal.SIGINT)
  with guards.StopSignals() as signals:
    assert signals.requested(1) is None
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)  # The handler runs between bytecodes of this thread.
    assert signals.requested(2) == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
  assert signal.getsignal(signal.SIGINT) is previous  # Restored after the loop.
  stop = guards.Stopped("stopped: ...", signal.SIGINT)
  assert stop.exit_code == 130 and guards.Stopped("", signal.SIGTERM).exit_code == 143
