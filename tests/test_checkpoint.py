"""Restoring checkpoints: proven damage (bytes cut short, non-finite values) is set aside and an
older step restored; a failure that may pass (a permission, a full disk) keeps the checkpoint and
raises one line."""

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbd_jax.checkpoints import orbax_io
from cbd_jax.distill.step_core import TrainState

ROOT = Path(__file__).resolve().parents[1]


def _state(step: int, fill: float = 0.0) -> TrainState:
  w = np.random.default_rng(step).standard_normal(5000).astype(np.float32) + fill
  return TrainState(jnp.int32(step), {"w": jnp.asarray(w)}, {"mu": jnp.full((64,), step, float)})


def _abstract() -> TrainState:
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      _state(0))


def _saved(folder: Path, *states: TrainState):
  manager = orbax_io.make_checkpoint_manager(folder, 1, max_to_keep=5)
  for state in states:
    assert orbax_io.save_state(manager, state, force=True)
  manager.wait_until_finished()
  return manager


def _data_files(step_folder: Path) -> list[Path]:
  files = [p for p in step_folder.rglob("*") if p.is_file() and p.stat().st_size > 4096]
  assert files, sorted(step_folder.rglob("*"))
  return files


def _assert_state(got: TrainState, want: TrainState):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_a_step_with_bytes_cut_short_is_set_aside_and_the_older_one_restored(tmp_path):
  manager = _saved(tmp_path, _state(1), _state(2))
  files = {p.relative_to(tmp_path / "2"): p.read_bytes() for p in (tmp_path / "2").rglob("*")
           if p.is_file()}
  for path in _data_files(tmp_path / "2"):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
  _assert_state(orbax_io.restore_latest(manager, _abstract()), _state(1))
  assert not (tmp_path / "2").exists() and manager.all_steps() == [1]
  kept = {p.relative_to(tmp_path / "2.corrupt") for p in (tmp_path / "2.corrupt").rglob("*")
          if p.is_file()}
  assert kept == set(files)  # Moved aside whole, not deleted.


def test_a_step_with_non_finite_values_is_set_aside(tmp_path):
  manager = _saved(tmp_path, _state(1), _state(2, fill=np.nan))
  _assert_state(orbax_io.restore_latest(manager, _abstract()), _state(1))
  assert (tmp_path / "2.corrupt").is_dir() and not (tmp_path / "2").exists()


_RESTORE = """
import sys
sys.path.insert(0, {tests!r})
from test_checkpoint import _abstract
from cbd_jax.checkpoints import orbax_io
manager = orbax_io.make_checkpoint_manager({folder!r}, 1)
try:
  state = orbax_io.restore_latest(manager, _abstract())
  print("restored", int(state.step))
except Exception as e:
  print(type(e).__name__, str(e))
"""


def _restore_without_root_reads(folder: Path) -> str:
  """restore_latest in a child process that file permissions apply to (as root, one without
  the capabilities that bypass them); its printed outcome."""
  cmd = [sys.executable, "-c", _RESTORE.format(tests=str(ROOT / "tests"), folder=str(folder))]
  if os.geteuid() == 0:
    setpriv = shutil.which("setpriv")
    assert setpriv, "as root this test needs setpriv (util-linux) to make permissions apply"
    cmd = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--", *cmd]
  env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=str(ROOT))
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout.strip().splitlines()[-1]


def test_a_permission_error_keeps_the_checkpoint_and_raises_one_line(tmp_path):
  _saved(tmp_path, _state(1), _state(2))
  (data,) = _data_files(tmp_path / "2")
  data.chmod(0)
  try:
    line = _restore_without_root_reads(tmp_path)
  finally:
    for path in tmp_path.rglob(data.name):  # Wherever it is now.
      path.chmod(0o644)
  assert line.startswith(f"CheckpointUnreadable checkpoint {tmp_path / '2'} could not be read "
                         "(ValueError: PERMISSION_DENIED: "), line
  assert line.endswith("; it is kept: fix the cause (disk space, permissions, the filesystem) "
                       "and run again"), line
  assert (tmp_path / "2").is_dir() and not list(tmp_path.glob("*.corrupt*"))
  manager = orbax_io.make_checkpoint_manager(tmp_path, 1)
  _assert_state(orbax_io.restore_latest(manager, _abstract()), _state(2))  # Intact.


def _wrapped(inner: Exception) -> Exception:
  """How Orbax reports a TensorStore read error: a bare Exception raised from it."""
  try:
    raise Exception("Encountered error while reading array index") from inner  # noqa: TRY002
  except Exception as e:  # noqa: BLE001
    return e


@pytest.mark.parametrize("error", [
    PermissionError(errno.EACCES, "Permission denied", "/ckpt/2/default/_METADATA"),
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EIO, "Input/output error"),
    _wrapped(ValueError("RESOURCE_EXHAUSTED: Error reading \"params.w/0\"")),
    _wrapped(ValueError("UNAVAILABLE: Error reading \"params.w/0\"")),
    ValueError("Requested shape: (4000,) is not compatible with the stored shape: (5000,)"),
], ids=["permission", "disk-full", "io-error", "resource-exhausted", "unavailable", "shape"])
def test_a_failure_that_is_not_proven_damage_keeps_the_checkpoint(tmp_path, monkeypatch, error):
  manager = _saved(tmp_path, _state(1), _state(2))

  def restore(step, args):
    raise error
  monkeypatch.setattr(manager, "restore", restore)
  with pytest.raises(OSError) as e:
    orbax_io.restore_latest(manager, _abstract())
  assert type(e.value).__name__ == "CheckpointUnreadable"
  assert str(e.value).startswith(f"checkpoint {tmp_path / '2'} could not be read (")
  assert "\n" not in str(e.value)
  assert manager.all_steps() == [1, 2] and not list(tmp_path.glob("*.corrupt*"))


@pytest.mark.parametrize("error", [
    _wrapped(ValueError("DATA_LOSS: Error decoding local file")),
    _wrapped(ValueError("OUT_OF_RANGE: Requested byte range [0, 12799) is not valid")),
    _wrapped(ValueError("FAILED_PRECONDITION: Truncated Zstd-compressed stream")),
    ValueError("NOT_FOUND: Metadata at \"opt_state.m/.zarray\" does not exist"),
], ids=["data-loss", "out-of-range", "truncated", "not-found"])
def test_damage_is_recognised_in_every_form_tensorstore_reports_it(error):
  assert orbax_io.is_damage(error)
  assert not orbax_io.is_damage(ValueError("Requested shape: (4000,) is not compatible"))
