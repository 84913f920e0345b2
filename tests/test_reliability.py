"""Bad input and injected faults: one line on stderr naming the thing and the fix, the right exit
code, no traceback, and nothing half-written. Commands run as subprocesses, as a user runs them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cbd_jax import cli

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
    ([SMOKE, "--config.chain[7].steps=3"],
     "error: --config.chain[7]: index 7 out of range: configs/qwen_chain.py:smoke has 2 entries "
     "in chain (chain[0] .. chain[1])"),
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
    ("configs/qwen_chain.py", ["source.random_init.seed=3"],
     "--config.source.random_init.seed: source.random_init is None, it has no field 'seed'"),
    ("configs/qwen_chain.py", ["chain[0].steps"],
     "--config.chain[0].steps: no value; write --config.chain[0].steps=VALUE"),
])
def test_load_config_errors(spec, overrides, expected):
  with pytest.raises(cli.UsageError) as e:
    cli.load_config(spec, overrides)
  assert str(e.value) == expected


def test_debug_shows_the_traceback():
  rc, err, _ = _command("launch/train_chain.py", "--config=configs/nope.py", "--debug")
  assert rc == 1 and err[0].startswith("Traceback") and "UsageError" in err[-1]


def test_misspelled_top_level_field_of_the_default_config_is_suggested():
  line = _one_line_error("launch/train_chain.py", "--config.workdr=/tmp/x")
  assert line.endswith("did you mean --config.workdir?")


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
