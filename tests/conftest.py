"""Test set-up: 8 fake CPU devices (before JAX starts), fp32 everywhere, quiet logs, and one XLA
compilation cache for the session."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Set through the environment, so the launch scripts and workers the tests start compile the
# same programs as this process and share one persistent cache: a program (a smoke link's step)
# is compiled once per session, not once per process. A fresh folder per session: nothing
# carries over between runs.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="cbd-jax-xla-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402

assert jax.config.jax_default_matmul_precision == "highest"

from skip_policy import (  # noqa: E402, F401  (pytest hooks: every skip is checked)
  pytest_collectreport,
  pytest_runtest_logreport,
  pytest_sessionfinish,
  pytest_terminal_summary,
)
