r"""Recovery-train one model: plain LM loss, KD from a named teacher, or a mix; resumable.

  python launch/train_target.py --config=configs/recovery.py --config.model=DIR
  python launch/train_target.py --config=configs/recovery.py --config.model=DIR \
      --config.teacher=ANCHOR_DIR --config.loss.kd_weight=1.0 --config.tokens=1000000
  python launch/train_target.py --config=configs/recovery.py:smoke

Every field is overridable (--config.FIELD=VALUE). Re-running the same command resumes at the
last checkpoint. The trained model is exported to --config.out (default <workdir>/model) as a
transformers folder with its tokenizer and cbd_recovery.json.
"""

import logging
import os
import sys
from pathlib import Path

from ml_collections import config_flags

ROOT = Path(__file__).resolve().parent.parent
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file (and :variant), e.g. configs/recovery.py:smoke; fields can be "
    "overridden as --config.model=DIR", lock_config=True)


def main(argv):
  from cbd_jax import cli

  cli.start_logging(argv)
  config = _CONFIG.value
  if config is None:
    sys.exit("error: no --config given; pass one, e.g. --config=configs/recovery.py:smoke")
  from cbd_jax.chain.recovery import check_config, train_target

  check_config(config)  # Before JAX starts: a bad value costs one line.
  import jax

  from cbd_jax.distributed import distributed_args

  args = distributed_args(os.environ)
  if args is not None:
    jax.distributed.initialize(**args)
  import datasets

  datasets.disable_progress_bars()
  try:
    done = train_target(config)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    sys.exit(f"error: {e}")
  ev = done.get("eval") or {}
  logging.info("%s: %s after %d steps (%s tokens), held-out ppl %s -> %s", config.model,
               done["status"], done["steps"], f"{done['tokens']:,}",
               f"{ev['ppl']:.2f}" if "ppl" in ev else "-", done.get("out"))


def _launch(args: list[str]) -> None:
  """Checks the config file, overrides and flags (one-line errors), then runs `main`."""
  from cbd_jax import cli

  main(cli.parse_absl_flags([sys.argv[0], *args]))


if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))
  from cbd_jax import cli

  cli.run(_launch)
