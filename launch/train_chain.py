r"""Build (or resume) a distillation chain: anchor after anchor, each from its predecessor.

  python launch/train_chain.py --config=configs/qwen_chain.py
  python launch/train_chain.py --config=configs/qwen_chain.py:smoke --config.workdir=/tmp/smoke
  python launch/train_chain.py --config=configs/qwen_chain.py --config.chain[1].steps=2000

Without --config it builds the embedded default chain (configs/default.py). Re-running the same
command resumes: finished links are skipped, the running link continues at its last checkpoint.
On several hosts run the same command on every host (launch/tpu_pod.sh, launch/multihost_gpu.sh):
JAX's distributed runtime is started from the environment, see `_distributed_args`.
"""

import logging
import os
import sys
from pathlib import Path

from ml_collections import config_flags

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "default.py"
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file (and :variant), e.g. configs/qwen_chain.py:smoke; fields can be "
    "overridden as --config.chain[0].steps=100", lock_config=True)


def _distributed_args(env) -> dict | None:
  """Arguments for jax.distributed.initialize, or None (see `cbd_jax.distributed`)."""
  from cbd_jax.distributed import distributed_args

  return distributed_args(env)


def _with_default_config(argv: list[str]) -> list[str]:
  """argv with --config=configs/default.py added when no --config is given and it exists."""
  given = any(a == "--config" or a.startswith("--config=") for a in argv)
  if given or not DEFAULT_CONFIG.exists():
    return argv
  return [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]


def _fmt(x):
  return "-" if x is None else f"{x:.4f}"


def main(argv):
  from cbd_jax import cli

  cli.start_logging(argv)
  config = _CONFIG.value
  if config is None:
    sys.exit(f"error: no --config given and {DEFAULT_CONFIG.relative_to(ROOT)} does not exist "
             "yet; pass one, e.g. --config=configs/qwen_chain.py:smoke")
  from cbd_jax.chain.driver import check_config, run_chain

  check_config(config)  # Every link's fields, before JAX starts: a bad value costs one line.
  import jax

  args = _distributed_args(os.environ)
  if args is not None:
    logging.info("multi-host launch: jax.distributed.initialize(%s)", args or "auto-detect")
    jax.distributed.initialize(**args)
  import datasets

  datasets.disable_progress_bars()
  logging.info("devices: %d (%s), processes: %d", jax.device_count(), jax.default_backend(),
               jax.process_count())
  try:
    doc = run_chain(config)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    sys.exit(f"error: {e}")
  for anchor in doc["anchors"]:
    ev = anchor.get("eval") or {}
    count = "-" if anchor["num_params"] is None else f"{anchor['num_params']:,}"
    logging.info("anchor %-16s %12s params  %-7s  held-out KL %s  ppl %s", anchor["name"], count,
                 anchor["status"], _fmt(ev.get("kl")), _fmt(ev.get("ppl")))
  logging.info("manifest: %s", Path(str(config.workdir)).expanduser() / "chain.json")


def _launch(args: list[str]) -> None:
  """Checks the config file, overrides and flags (one-line errors), then runs `main`."""
  from cbd_jax import cli

  main(cli.parse_absl_flags(_with_default_config([sys.argv[0], *args])))


if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))
  from cbd_jax import cli

  cli.run(_launch)
