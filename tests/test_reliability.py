"""Bad input and injected faults: one line on stderr naming the thing and the fix, the right exit
code, no traceback, and nothing half-written. Commands run as subprocesses, as a user runs them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cbd_jax import cli, errors

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "--config=configs/qwen_chain.py:smoke"


def _command(*args, env=None, timeout=120):
  """Runs a launch script; returns (exit code, stderr lines, stdout)."""
  full_env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
  full_env.pop("CBD_DEBUG", None)
  out = subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True,
                       text=True, timeout=timeout)
  return out.returncode, out.stderr.strip().splitlines(), out.stdout


def _one_line_error(*args, code=2, **kw) -> str:
  """Asserts the command fails with ``code`` and exactly one stderr line; returns that line."""
  rc, err, _ = _command(*args, **kw)
  assert rc == code and len(err) == 1, (rc, err[-20:])
  assert err[0].startswith("error: ") and "Traceback" not in err[0]
  return err[0]


@pytest.mark.parametrize("args, expected", [
    (["--config=configs/nope.py"],
     "error: config file configs/nope.py not found (no such file); pass an existing file, e.g. "
     "--config=configs/qwen_chain.py:smoke"),
    ([SMOKE, "--config.chain[0].stepz=3"],
     "error: --config.chain[0].stepz: unknown field 'stepz' in configs/qwen_chain.py:smoke; did "
     "you mean --config.chain[0].steps?"),
])
def test_train_chain_bad_config_is_one_line(args, expected):
  assert _one_line_error("launch/train_chain.py", *args) == expected


@pytest.mark.parametrize("spec, overrides, expected", [
    ("configs/qwen_chain.py:smok", [],
     "configs/qwen_chain.py:smok: unknown variant 'smok' of configs/qwen_chain.py; use '' or "
     "'smoke'"),
    ("configs/qwen_chain.py:smoke", ["chain[0].steps=abc"],
     "--config.chain[0].steps=abc: chain[0].steps takes a whole number (now 8); give one, e.g. "
     "--config.chain[0].steps=8"),
    ("configs/qwen_chain.py:smoke", ["chain[0].loss=3"],
     "--config.chain[0].loss: is a group of fields; set them one by one, e.g. "
     "--config.chain[0].loss.ce_weight=..."),
    ("configs/qwen_chain.py", ["source.random_init=3"],
     "--config.source.random_init: is None in the config, so its type is unknown and it cannot "
     "be set from the command line; set it in the config file"),
    ("configs/qwen_chain.py", ["source.random_init.seed=3"],
     "--config.source.random_init.seed: source.random_init is None, it has no field 'seed'"),
    ("configs/qwen_chain.py:smoke", ["chain[7].steps=3"],
     "--config.chain[7]: index 7 out of range: configs/qwen_chain.py:smoke has 2 entries in "
     "chain (chain[0] .. chain[1])"),
    ("configs/default.py", ["workdr=/tmp/x"],
     "--config.workdr: unknown field 'workdr' in configs/default.py; did you mean "
     "--config.workdir?"),
    ("configs/qwen_chain.py", ["chain[0].steps"],
     "--config.chain[0].steps: no value; write --config.chain[0].steps=VALUE"),
])
def test_load_config_errors(spec, overrides, expected):
  with pytest.raises(errors.UsageError) as e:
    cli.load_config(spec, overrides)
  assert str(e.value) == expected


@pytest.mark.parametrize("args, expected", [
    (["launch/train_chain.py", SMOKE, "--foo=1"],
     "error: Unknown command line flag 'foo'; see train_chain.py --helpfull"),
    (["launch/init_model.py", "--size=50m", "--dtype=foo"],
     "error: argument --dtype: invalid choice: 'foo' (choose from 'float32', 'bfloat16', "
     "'float16'); see init_model.py --help"),
])
def test_bad_flags_are_one_line(args, expected):
  assert _one_line_error(*args) == expected


def test_damaged_download_archive_names_the_file_and_the_fix(tmp_path):
  from cbd_jax.checkpoints import assets

  wheel = tmp_path / "gensim.whl"
  wheel.write_bytes(b"PK\x03\x04 cut short")
  with pytest.raises(ValueError) as e:
    assets._extract_member(wheel, "test_data/lee_background.cor", tmp_path / "news.txt")
  assert str(e.value) == (f"{wheel}: damaged or unexpected archive (BadZipFile); delete it and "
                          "run launch/fetch_assets.py again")
  assert sorted(os.listdir(tmp_path)) == ["gensim.whl"]  # No .part file left behind.


def test_debug_shows_the_traceback(monkeypatch):
  def main(args):
    raise errors.UsageError("bad")

  with pytest.raises(errors.UsageError, match="bad"):  # Raised as is: Python prints the traceback.
    cli.run(main, ["--debug"])
  monkeypatch.setenv("CBD_DEBUG", "1")
  with pytest.raises(errors.UsageError, match="bad"):
    cli.run(main, [])


def test_load_config_applies_overrides_with_config_flags_types():
  config = cli.load_config("configs/qwen_chain.py:smoke",
                           ["chain[1].steps=3", "chain[0].loss.kind=rkl",
                            "chain[1].optimizer.lr=0.5", "mesh.fsdp=-1", "log.progress=false"])
  assert config.chain[1].steps == 3 and config.chain[0].loss.kind == "rkl"
  assert config.chain[1].optimizer.lr == 0.5 and config.mesh.fsdp == -1
  assert config.log.progress is False and config.chain[0].steps == 8
  with pytest.raises(AttributeError):  # Locked, as config_flags' lock_config=True.
    config.new_field = 1


def test_run_maps_faults_to_exit_codes(capsys):
  def fails(exc):
    def main(args):
      raise exc
    return main

  cases = [(fails(ValueError("bad\nthing")), 2, "error: bad thing"),
           (fails(OSError(28, "No space left on device", "/x/y")), 2,
            "error: /x/y: no space left on device; free some space or choose a folder on another "
            "disk"),
           (fails(KeyboardInterrupt()), 130, "interrupted (Ctrl-C)"),
           (fails(SystemExit("error: from sys.exit")), 2, "error: from sys.exit"),
           (fails(RuntimeError("boom")), 1,
            "error: RuntimeError: boom (rerun with --debug for the traceback)")]
  for main, code, line in cases:
    with pytest.raises(SystemExit) as e:
      cli.run(main, [])
    assert e.value.code == code
    assert capsys.readouterr().err.strip().splitlines() == [line]
  with pytest.raises(SystemExit) as e:
    cli.run(lambda args: 0 if args == ["a"] else 3, ["a", "--debug"])
  assert e.value.code == 0  # --debug is taken out of the arguments.


# --- Exports: killed, disk full, permission denied; damaged checkpoints on the command line. ----

CHILD = """
import os, sys, time
import jax
from cbd_jax import cli
from cbd_jax.checkpoints import hf_io
from cbd_jax.model import decoder
from cbd_jax.model.config import ModelConfig

CONFIG = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, intermediate_size=128)


def main(args):
  mode, path = args
  if mode == "load":
    hf_io.load_hf(path)
    return 0
  if mode == "hang":  # Fault injection: stop inside the export, after the weights are written.
    real = hf_io.save_sharded
    def written_then_wait(*a):
      names = real(*a)
      print("written", flush=True)
      time.sleep(120)
      return names
    hf_io.save_sharded = written_then_wait
  hf_io.save_hf(CONFIG, decoder.init_params(CONFIG, jax.random.key(0)), path)
  return 0


cli.run(main)
"""


@pytest.fixture(scope="module")
def child(tmp_path_factory):
  """A script that exports (or loads) a tiny model through cli.run, as a launch script does."""
  path = tmp_path_factory.mktemp("child") / "child.py"
  path.write_text(CHILD)
  return str(path)


def _works(*prefix) -> bool:
  """Whether a command prefix (unshare ...) runs here."""
  try:
    return subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    return False


def _export_until_written(child: str, out: Path) -> subprocess.Popen:
  """Starts an export that stops after writing the weights; returns once they are written."""
  import signal

  # Ctrl-C as at a terminal, even when the suite itself runs in the background (where SIGINT is
  # ignored and a child would inherit that).
  proc = subprocess.Popen([sys.executable, child, "hang", str(out)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=ROOT,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  assert proc.stdout.readline().strip() == "written"
  return proc


def test_ctrl_c_during_export_is_one_line_and_leaves_nothing(tmp_path, child):
  import signal

  proc = _export_until_written(child, tmp_path / "anchor")
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 130 and err.strip().splitlines() == ["interrupted (Ctrl-C)"]
  assert os.listdir(tmp_path) == []


def test_kill_9_during_export_leaves_nothing_and_the_next_export_cleans_up(tmp_path, child):
  import signal

  import jax

  from cbd_jax.checkpoints import hf_io
  from cbd_jax.model import decoder
  from cbd_jax.model.config import ModelConfig

  out = tmp_path / "anchor"
  proc = _export_until_written(child, out)
  os.kill(proc.pid, signal.SIGKILL)
  proc.communicate(timeout=60)
  partial = [p.name for p in tmp_path.iterdir()]
  assert not out.exists() and len(partial) == 1 and partial[0].startswith(".anchor.partial-")
  assert (tmp_path / partial[0] / "model.safetensors").exists()  # Killed after the weights.
  tiny = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                     head_dim=16, intermediate_size=64)
  hf_io.save_hf(tiny, decoder.init_params(tiny, jax.random.key(1)), tmp_path / "next")
  assert [p.name for p in tmp_path.iterdir()] == ["next"]
  assert hf_io.load_hf(tmp_path / "next")[0] == tiny


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, child):
  prefix = ["unshare", "-Urm"]
  if not _works(*prefix):
    pytest.skip("cannot mount a small tmpfs here (unshare -Urm is not permitted)")
  disk = tmp_path / "disk"
  disk.mkdir()
  script = (f'mount -t tmpfs -o size=64k tmpfs {disk} && "{sys.executable}" {child} export '
            f'{disk}/out; code=$?; echo "left: $(ls -A {disk})"; exit $code')
  env = dict(os.environ, HF_HUB_OFFLINE="1")
  env.pop("CBD_DEBUG", None)
  out = subprocess.run([*prefix, "sh", "-c", script], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines() == [
      f"error: {disk}/out: no space left on device (nothing was written); free some space or "
      "choose a folder on another disk"]
  assert out.stdout.strip() == "left:"


def test_permission_denied_is_one_line(tmp_path, child):
  prefix = []
  if os.geteuid() == 0:  # Root writes anywhere; in a user namespace it is an ordinary owner.
    prefix = ["unshare", "-U"]
    if not _works(*prefix):
      pytest.skip("running as root and unshare -U is not permitted: no way to be denied")
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o555)
  env = dict(os.environ, HF_HUB_OFFLINE="1")
  env.pop("CBD_DEBUG", None)
  out = subprocess.run([*prefix, sys.executable, child, "export", str(locked / "m")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
  locked.chmod(0o755)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines() == [
      f"error: {locked}/m: permission denied (nothing was written); check the permissions or "
      "choose a folder you can write to"]
  assert os.listdir(locked) == []


def _damaged_model(folder: Path, kind: str) -> Path:
  """A saved tiny model with its config.json or weights damaged in one way."""
  import jax

  from cbd_jax.checkpoints import hf_io
  from cbd_jax.model import decoder
  from cbd_jax.model.config import ModelConfig

  tiny = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                     head_dim=16, intermediate_size=64)
  hf_io.save_hf(tiny, decoder.init_params(tiny, jax.random.key(0)), folder)
  weights = folder / "model.safetensors"
  if kind == "config_list":
    (folder / "config.json").write_text('["llama"]')
  elif kind == "header_list":
    weights.write_bytes((2).to_bytes(8, "little") + b"[]")
  else:
    weights.write_bytes(weights.read_bytes()[:-100])
  return folder


@pytest.mark.parametrize("kind, start", [
    ("config_list", "config.json: holds a JSON list, not an object of model fields"),
    ("truncated", "model.safetensors: truncated: the file has "),
])
def test_damaged_checkpoint_is_one_line(tmp_path, child, kind, start):
  folder = _damaged_model(tmp_path / "m", kind)
  line = _one_line_error(child, "load", str(folder))
  assert line.startswith(f"error: {folder}/{start}"), line


# --- Out-of-range input to the model. ------------------------------------------------------------

def test_forward_checks_ids_and_gpt2_length_on_the_host():
  import jax
  import jax.numpy as jnp
  import numpy as np

  import cbd_jax
  from cbd_jax.model.config import ModelConfig, check_ids

  config = ModelConfig(family="gpt2", vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                       num_kv_heads=2, head_dim=16, intermediate_size=128, tie_embeddings=True,
                       max_position_embeddings=8)
  params = cbd_jax.init_params(config, jax.random.key(0))
  assert bool(jnp.isfinite(cbd_jax.forward(config, params, np.full((2, 8), 63))).all())
  cases = [(np.array([[1, 64]]), "token id 64 at index [0, 1] is outside the model's vocabulary "
                                 "[0, 64)"),
           (jnp.array([[-1, 2]]), "token id -1 at index [0, 0] is outside the model's "
                                  "vocabulary [0, 64)"),
           (np.zeros((1, 9), np.int32), "a sequence of 9 tokens is longer than this GPT-2 "
                                        "model's 8 learned positions (max_position_embeddings); "
                                        "cut it to at most 8 tokens")]
  for ids, start in cases:
    with pytest.raises(ValueError) as e:
      cbd_jax.forward(config, params, ids)
    assert str(e.value).startswith(start) and "\n" not in str(e.value)
  with pytest.raises(ValueError, match="a sequence of 10 tokens"):  # Positions count, not width.
    cbd_jax.forward(config, params, np.zeros((1, 2), np.int32), positions=np.array([[0, 9]]))
  check_ids(config.replace(family="llama"), np.zeros((1, 9)))  # RoPE: no position table.
  traced = jax.eval_shape(lambda ids: cbd_jax.forward(config, params, ids),  # Not checked.
                          jnp.array([[3, 64]]))
  assert traced.shape == (1, 2, 64)


@pytest.mark.parametrize("content", ["{}", "[]", "[1]", "not json"])
def test_report_on_a_damaged_manifest_is_one_line(tmp_path, content):
  (tmp_path / "chain.json").write_text(content)
  line = _one_line_error("launch/report.py", f"--chain={tmp_path}")
  assert line.startswith(f"error: {tmp_path / 'chain.json'}: ") and (
      "rebuild the chain in a new workdir" in line or "use a new workdir" in line), line


@pytest.mark.parametrize("args, expected", [
    (["launch/report.py", "--seq_len", "0"],
     "error: --seq_len=0 must be >= 1; see report.py --help"),
    (["launch/init_model.py", "--size=50m", "--eval_tokens=0"],
     "error: --eval_tokens=0 must be >= 1; see init_model.py --help"),
])
def test_non_positive_lengths_are_one_line_naming_the_flag(args, expected):
  assert _one_line_error(*args) == expected
