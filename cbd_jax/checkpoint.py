"""Orbax checkpoints of a student's TrainState (step, fp32 params, optimizer state); never the
teacher's params, which are re-read from their anchor folder when a link resumes.

Every process calls save/restore (Orbax coordinates multi-host writes); restored arrays come back
with the shardings of the abstract state passed in, so a checkpoint written on one mesh can be
read on another.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from cbd_jax.train_step import TrainState

log = logging.getLogger(__name__)


def make_checkpoint_manager(directory: str | os.PathLike, save_every: int,
                            max_to_keep: int = 2) -> ocp.CheckpointManager:
  """A manager that saves every ``save_every`` steps (and when forced), keeping the latest few."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                         save_interval_steps=max(1, int(save_every)),
                                         create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _as_tree(state: TrainState) -> dict[str, Any]:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def save_state(manager: ocp.CheckpointManager, state: TrainState, force: bool = False) -> bool:
  """Saves ``state`` under its step if the interval says so (or ``force``); True if it saved."""
  step = int(jax.device_get(state.step))
  if force and step in manager.all_steps():
    return False
  saved = manager.save(step, args=ocp.args.StandardSave(_as_tree(state)), force=force)
  if saved:
    log.info("checkpoint saved at step %d", step)
  return saved


def restore_latest(manager: ocp.CheckpointManager, abstract_state: TrainState) -> TrainState | None:
  """The newest intact saved state, placed like ``abstract_state`` (ShapeDtypeStructs with
  shardings); None when there is none.

  A step that cannot be read, or whose params or optimizer state are not finite (a damaged
  file), is moved aside to ``<step>.corrupt`` (kept, never deleted) with a warning naming it, and
  the next older step is tried.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      tree = manager.restore(step, args=ocp.args.StandardRestore(_as_tree(abstract_state)))
      if not _all_finite(tree):
        raise ValueError("non-finite values in the parameters or optimizer state")
    except Exception as e:  # noqa: BLE001  (any damage: fall back to an older step)
      _set_aside(manager, step, e)
      continue
    log.info("restored checkpoint at step %d", step)
    return TrainState(tree["step"], tree["params"], tree["opt_state"])
  return None


def _all_finite(tree: Any) -> bool:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return bool(jax.jit(lambda xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])))(
      leaves)) if leaves else True


def _set_aside(manager: ocp.CheckpointManager, step: int, error: Exception) -> None:
  """Renames a damaged step folder to ``<step>.corrupt[.N]`` so that newer saves can reuse the
  step number; every process waits until it is done."""
  folder = Path(manager.directory) / str(step)
  aside = folder.with_name(f"{step}.corrupt")
  n = 1
  while aside.exists():
    aside, n = folder.with_name(f"{step}.corrupt.{n}"), n + 1
  if jax.process_index() == 0 and folder.exists():
    os.rename(folder, aside)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"checkpoint-aside-{step}")
  manager.reload()
  cause = " ".join(f"{type(error).__name__}: {error}".split())[:240]
  log.warning("checkpoint %s is damaged (%s); moved aside to %s and trying an older step", folder,
              cause, aside.name)


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs that carry shardings (what ``restore_latest`` places arrays by)."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)
