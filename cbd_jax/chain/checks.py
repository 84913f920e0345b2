"""A run's config checked before anything is read, built or trained.

Every fault is one ValueError line naming the field and the fix. `check_run` covers the fields
every driver shares (mesh, checkpoint, eval, log, ``stop_after``, export dtype); `check_link`
one link's training fields (budget, batch, dtypes, loss, optimizer). The chain driver adds what
needs the models' configs (shapes, tokenizer size, positions, batch divisibility) in
`chain.driver.preflight`, so a fault in link 3 stops the run before link 0 trains.

A link's batch is given globally (``batch_size``: sequences per microbatch, all hosts) or per
device (``per_device_batch_size``, as MaxText counts it: sequences per device per microbatch,
so a pod needs no arithmetic); `resolve_batches` turns the second into the first once the
number of devices is known.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

from cbd_jax.distill import losses
from cbd_jax.model.config import check_dtype
from cbd_jax.model.sharding import MESH_AXES, data_parallel_size


def _at_least(value: Any, low: float, field: str, fix: str = "") -> None:
  """``field`` must be a finite number >= ``low``."""
  number = float(value)
  if not math.isfinite(number) or number < low:
    raise ValueError(f"{field}={value} must be a number >= {low:g}{fix}")


def _dtype(value: Any, field: str, empty_ok: bool) -> None:
  if empty_ok and value in ("", None):
    return
  check_dtype(value, field)


def check_run(config) -> None:
  """The run-level fields shared by every driver."""
  unknown = set(dict(config.mesh)) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; use {MESH_AXES}")
  _at_least(config.checkpoint.every, 1, "config.checkpoint.every")
  _at_least(config.checkpoint.get("keep", 1), 1, "config.checkpoint.keep")
  _at_least(config.eval.batch_size, 1, "config.eval.batch_size")
  _at_least(config.eval.num_batches, 1, "config.eval.num_batches")
  _at_least(config.eval.every, 0, "config.eval.every", " (0 = only at the end of a link)")
  _at_least(config.log.every, 1, "config.log.every")
  _at_least(config.get("stop_after") or 0, 0, "config.stop_after",
            " (steps per invocation; 0 = to the end)")
  _dtype(config.get("export_dtype"), "config.export_dtype", empty_ok=True)
  for key in ("train", "heldout"):
    check_data_file(config.data.get(key), f"config.data.{key}")


def check_data_file(source: str | None, field: str) -> None:
  """Local data files named by ``source`` exist, are readable and not empty (hub names pass)."""
  if not source:
    return
  from cbd_jax import data

  files = data.resolve_files(str(source))
  for name in files or ():
    if not os.access(name, os.R_OK):
      raise ValueError(f"{field}: {name} is not readable; check its permissions")
    if os.path.getsize(name) == 0:
      raise ValueError(f"{field}: {name} is empty; give a file with text in it")


def link_steps(link) -> int:
  """Optimizer steps of a link: ``steps``, or ceil(tokens / tokens_per_step) when tokens > 0."""
  per_step = link.batch_size * link.microbatches * link.seq_len
  if (link.get("tokens") or 0) < 0:
    raise ValueError(f"link {link.name}: tokens={link.tokens} must be >= 0 (0 = use steps)")
  if link.get("tokens", 0):
    return max(1, math.ceil(link.tokens / per_step))
  if link.steps <= 0:
    raise ValueError(f"link {link.name}: set steps > 0 or a token budget (tokens > 0)")
  return int(link.steps)


def check_link(link, where: str) -> None:
  """One link's training fields: budget, batch, dtypes, loss and optimizer settings."""
  per_device = link.get("per_device_batch_size") or 0
  _at_least(per_device, 0, f"{where}: per_device_batch_size", " (0 = batch_size is global)")
  if per_device and link.batch_size:
    raise ValueError(f"{where}: batch_size={link.batch_size} and per_device_batch_size="
                     f"{per_device} both set; give one (set the other to 0)")
  for key in ("microbatches", "seq_len") + (() if per_device else ("batch_size",)):
    _at_least(link[key], 1, f"{where}: {key}")
  _at_least(link.get("tokens") or 0, 0, f"{where}: tokens", " (0 = use steps)")
  _at_least(link.get("steps") or 0, 0, f"{where}: steps")
  if not per_device:  # Else the steps follow the devices (`resolve_batches`).
    link_steps(link)
  elif not (link.get("tokens") or link.get("steps")):
    raise ValueError(f"link {link.name}: set steps > 0 or a token budget (tokens > 0)")
  _dtype(link.get("dtype"), f"{where}: dtype", empty_ok=False)
  _dtype(link.get("teacher_dtype"), f"{where}: teacher_dtype", empty_ok=True)
  loss = link.loss
  losses.check_kind(loss.kind, loss.get("skew", 0.1), loss.get("beta", 0.5))
  _at_least(loss.temperature, 1e-6, f"{where}: loss.temperature")
  for key in ("kd_weight", "ce_weight", "hidden_weight"):
    _at_least(loss.get(key) or 0, 0, f"{where}: loss.{key}")
  if not (loss.get("kd_weight") or loss.get("ce_weight") or loss.get("hidden_weight")):
    raise ValueError(f"{where}: every loss weight is 0; set loss.kd_weight or loss.ce_weight > 0")
  _at_least(loss.get("chunk_size") or 1, 1, f"{where}: loss.chunk_size")
  opt = link.optimizer
  _at_least(opt.lr, 1e-12, f"{where}: optimizer.lr", " (a learning rate such as 3e-4)")
  if float(opt.lr) > 1.0:
    raise ValueError(f"{where}: optimizer.lr={opt.lr} is far too high (the step would diverge); "
                     "use a learning rate such as 3e-4")
  for key in ("warmup_steps", "weight_decay", "grad_clip", "min_lr_ratio"):
    _at_least(opt.get(key) or 0, 0, f"{where}: optimizer.{key}")


def check_batch(batch_size: int, mesh, where: str) -> None:
  """A training batch must split evenly over the mesh's batch shards (held-out batches are
  padded to them with masked rows: `model.sharding.pad_rows`)."""
  shards = data_parallel_size(mesh)
  if int(batch_size) % shards:
    raise ValueError(f"{where}: batch_size={batch_size} must be a multiple of the mesh's data x "
                     f"fsdp = {shards} batch shards; or give per_device_batch_size instead")


def resolve_batches(config, devices: int):
  """``config`` with every link's batch global: a ``per_device_batch_size`` (when > 0) becomes
  ``batch_size`` = per_device_batch_size x ``devices`` (and 0), as what ran is recorded; the
  config itself when no link gives one. A product that is not whole is a one-line ValueError."""
  def links(c):  # A chain's links, or a recovery config (its own one link).
    return list(c.chain) if "chain" in c else [c]

  if not any(link.get("per_device_batch_size") for link in links(config)):
    return config
  config = copy.deepcopy(config)
  for link in links(config):
    per_device = float(link.get("per_device_batch_size") or 0)
    if not per_device:
      continue
    rows = per_device * devices
    if rows != int(rows) or rows < 1:
      raise ValueError(f"link {link.name}: per_device_batch_size={per_device:g} x {devices} "
                       f"devices = {rows:g} sequences, not a whole number; give a per-device "
                       "batch that makes one")
    link.batch_size, link.per_device_batch_size = int(rows), 0
  return config
