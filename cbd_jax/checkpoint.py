"""Orbax checkpoints of a student's TrainState (step, fp32 params, optimizer state); never the
teacher's params, which are re-read from their anchor folder when a link resumes.

Every process calls save/restore (Orbax coordinates multi-host writes); restored arrays come back
with the shardings of the abstract state passed in, so a checkpoint written on one mesh can be
read on another.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
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
  """The newest saved state, placed like ``abstract_state`` (ShapeDtypeStructs with shardings)."""
  step = manager.latest_step()
  if step is None:
    return None
  tree = manager.restore(step, args=ocp.args.StandardRestore(_as_tree(abstract_state)))
  log.info("restored checkpoint at step %d", step)
  return TrainState(tree["step"], tree["params"], tree["opt_state"])


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs that carry shardings (what ``restore_latest`` places arrays by)."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)
