"""tests/skip_policy.py: with CBD_FAIL_ON_SKIP=1 (make test, CI) a skip whose reason is not in
the allow-list fails the run; skips are listed with their reasons either way."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _pytest(tmp_path, body: str, fail_on_skip: bool) -> subprocess.CompletedProcess:
  """pytest -rs on one test file whose conftest loads the suite's skip policy."""
  (tmp_path / "test_probe.py").write_text(body)
  (tmp_path / "conftest.py").write_text("from skip_policy import *  # noqa: F403\n")
  env = dict(os.environ, PYTHONPATH=str(HERE), CBD_FAIL_ON_SKIP="1" if fail_on_skip else "0")
  return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                         str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=120)


MISSING_TPU = ("import pytest\n"
               "def test_tpu():\n"
               "  pytest.skip('libtpu is not installed')\n"
               "def test_other():\n"
               "  pass\n")


@pytest.mark.parametrize("fail_on_skip", [True, False])
def test_a_skip_outside_the_allow_list_fails_only_when_asked(tmp_path, fail_on_skip):
  out = _pytest(tmp_path, MISSING_TPU, fail_on_skip)
  assert "SKIPPED [1] test_probe.py:3: libtpu is not installed" in out.stdout, out.stdout
  assert out.returncode == (1 if fail_on_skip else 0), out.stdout
  assert ("test_probe.py::test_tpu: libtpu is not installed" in out.stdout) == fail_on_skip


def test_a_module_skipped_at_import_fails_and_an_allowed_skip_does_not(tmp_path):
  out = _pytest(tmp_path, "import pytest\npytest.importorskip('no_such_module_cbd')\n"
                          "def test_x():\n  pass\n", True)
  assert out.returncode == 1 and "no_such_module_cbd" in out.stdout, out.stdout
  allowed = ("import pytest\ndef test_tmpfs():\n"
             "  pytest.skip('cannot mount a small tmpfs here (unshare -Urm is not permitted)')\n")
  out = _pytest(tmp_path, allowed, True)
  assert out.returncode == 0 and "unshare -Urm is not permitted" in out.stdout, out.stdout
