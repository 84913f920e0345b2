"""The environment a test gives the launch scripts it starts as a user would run them."""

import os

FORCED_DEVICES = "--xla_force_host_platform_device_count"


def user_env(**extra: str) -> dict[str, str]:
  """This process's environment (offline hub, shared compilation cache) with one CPU device, as on
  a user's machine: the 8 fake devices that conftest.py sets for the in-process sharding tests
  would make a launched chain split every step 8 ways over 2 cores (about 1.8x slower)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(FORCED_DEVICES)]
  env = dict(os.environ, HF_HUB_OFFLINE="1", **extra)
  env["XLA_FLAGS"] = " ".join(flags)
  return env
