r"""Build (or resume) a distillation chain: anchor after anchor, each from its predecessor.

  python launch/train_chain.py --config=configs/qwen_chain.py
  python launch/train_chain.py --config=configs/qwen_chain.py:smoke --config.workdir=/tmp/smoke
  python launch/train_chain.py --config=configs/qwen_chain.py --config.chain[1].steps=2000

Without --config it builds the embedded default chain (configs/default.py). Re-running the same
command resumes: finished links are skipped, the running link continues at its last checkpoint.
On several hosts (TPU pod, multi-node GPU) run the same command on every host: JAX's distributed
runtime is initialised from the environment (see launch/tpu_pod.sh, launch/multihost_gpu.sh).
"""

import logging
import os
import sys
from pathlib import Path

from absl import app
from ml_collections import config_flags

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "default.py"
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file (and :variant), e.g. configs/qwen_chain.py:smoke; fields can be "
    "overridden as --config.chain[0].steps=100", lock_config=True)
_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
                  "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _maybe_initialize_distributed(jax) -> None:
  """jax.distributed.initialize() when the environment describes a multi-host launch."""
  found = [k for k in _MULTIHOST_ENV if os.environ.get(k)]
  if os.environ.get("SLURM_NTASKS") == "1" or os.environ.get("OMPI_COMM_WORLD_SIZE") == "1":
    found = [k for k in found if k not in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")]
  if found:
    logging.info("multi-host launch (%s): initialising jax.distributed", ", ".join(found))
    jax.distributed.initialize()


def _with_default_config(argv: list[str]) -> list[str]:
  """argv with --config=configs/default.py added when no --config is given and it exists."""
  if any(a == "--config" or a.startswith("--config=") for a in argv) or not DEFAULT_CONFIG.exists():
    return argv
  return [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}; fields are set as --config.FIELD=VALUE")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S", force=True)
  for noisy in ("absl", "orbax", "jax._src", "datasets", "httpx", "huggingface_hub"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  config = _CONFIG.value
  if config is None:
    sys.exit(f"error: no --config given and {DEFAULT_CONFIG.relative_to(ROOT)} does not exist "
             "yet; pass one, e.g. --config=configs/qwen_chain.py:smoke")
  import jax

  _maybe_initialize_distributed(jax)
  import datasets

  datasets.disable_progress_bars()
  from cbd_jax.chain import run_chain

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


def _fmt(x):
  return "-" if x is None else f"{x:.4f}"


if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))
  sys.argv = _with_default_config(sys.argv)
  app.run(main)
