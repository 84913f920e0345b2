r"""Compile a chain's train and eval steps for a TPU topology here, before launching on it.

  python launch/aot_compile.py --config=configs/qwen_chain.py --topology=v5e:16x16
  python launch/aot_compile.py --config=configs/qwen_chain.py --topology=v5p:2x2x4 \
      --link=qwen2.5-0.5b --batch=16 --microbatches=1 --mesh=data=1,fsdp=-1,tensor=1
  python launch/aot_compile.py --config=configs/qwen_chain.py --topology=v5p-128 --num_slices=2

Runs on any machine with libtpu installed (``pip install -e ".[tpu]"``), no TPU needed. Prints per
link the mesh, per-chip memory (params, optimizer state, teacher, XLA temporaries, total) against
the chip's HBM, TFLOPs per step and whether it fits; exits 1 with a one-line suggestion when a
link does not fit. ``--batch``, ``--microbatches``, ``--seq_len`` and ``--remat`` apply to every
link (``--config.chain[i].FIELD=...`` sets one); ``--batch`` is sequences per microbatch, global
(it replaces a link's ``per_device_batch_size``, which counts every chip of the topology). Held-out
batches are padded with masked rows to the mesh's batch shards. Bad input is one line on stderr
and exit status 2 (`cbd_jax.cli.run`).
"""

import json
import os
import sys
from pathlib import Path

os.environ["JAX_PLATFORMS"] = "cpu"  # Compile for TPU on the host; never try to open a TPU.

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
_CONFIG = config_flags.DEFINE_config_file("config", None, "chain config (and :variant)",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology: v5e-256, v5p-128, v6e:16x16...")
_SLICES = flags.DEFINE_integer("num_slices", 1, "slices joined by DCN (the data axis spans them)")
_LINK = flags.DEFINE_string("link", "", "compile only the link of this name")
_BATCH = flags.DEFINE_integer("batch", None, "sequences per microbatch (global), every link")
_MICRO = flags.DEFINE_integer("microbatches", None, "microbatches per step, every link")
_SEQ = flags.DEFINE_integer("seq_len", None, "tokens per sequence, every link")
_REMAT = flags.DEFINE_boolean("remat", None, "rematerialise each layer's activations")
_MESH = flags.DEFINE_string("mesh", "", "mesh of one slice, e.g. data=1,fsdp=-1,tensor=1")
_EVAL = flags.DEFINE_boolean("eval", True, "also compile the eval step (--noeval: train only)")
_JSON = flags.DEFINE_string("json", "", "also write the reports to this JSON file")


def parse_mesh(text: str) -> dict[str, int]:
  """'data=1,fsdp=-1' -> {'data': 1, 'fsdp': -1}."""
  try:
    return {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(","))}
  except ValueError:
    raise ValueError(f"--mesh={text!r}: write it as data=1,fsdp=-1,tensor=1") from None


def apply_flags(config) -> None:
  """Applies --batch, --microbatches, --seq_len, --remat and --mesh to the config."""
  for link in config.chain:
    for flag, key in ((_BATCH, "batch_size"), (_MICRO, "microbatches"), (_SEQ, "seq_len"),
                      (_REMAT, "remat")):
      if flag.value is not None:
        link[key] = flag.value
    if _BATCH.value is not None and "per_device_batch_size" in link:
      link.per_device_batch_size = 0
  if _MESH.value:
    config.mesh = parse_mesh(_MESH.value)


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  if _CONFIG.value is None or not _TOPOLOGY.value:
    sys.exit("error: give --config=CONFIG and --topology=NAME (e.g. --topology=v5e-256)")
  from cbd_jax.chain import aot

  config = _CONFIG.value
  apply_flags(config)
  reports = aot.compile_chain(config, _TOPOLOGY.value, _SLICES.value, _LINK.value, _EVAL.value)
  slices = f" x {_SLICES.value} slices" if _SLICES.value > 1 else ""
  print(f"{_TOPOLOGY.value}{slices}: per-chip memory in GiB")
  print(aot.format_reports(reports))
  if _JSON.value:
    doc = {"topology": _TOPOLOGY.value, "num_slices": _SLICES.value, "argv": sys.argv[1:],
           "links": [r.to_dict() for r in reports]}
    Path(_JSON.value).write_text(json.dumps(doc, indent=1))
  links = {link.name: link for link in config.chain}
  failed = [r for r in reports if not r.fits or r.eval_fits is False]
  for r in failed:
    print(f"link {r.link} does not fit ({r.error or 'total above HBM'}); try: "
          f"{aot.suggestion(r, links[r.link])}")
  return 1 if failed else 0


def _launch(args: list[str]) -> int:
  """Checks the config file, overrides and flags (one-line errors), then runs `main`."""
  from cbd_jax import cli

  return main(cli.parse_absl_flags([sys.argv[0], *args]))


if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))
  from cbd_jax import cli

  cli.run(_launch)
