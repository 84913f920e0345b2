"""Orbax checkpoints of a student's train state (step, fp32 params, optimizer state); never the
teacher's params, which are re-read from their anchor folder when a link resumes.

A state is any dataclass of arrays with a ``step`` field (`distill.step_core.TrainState`); it is
saved as the tree of its fields and restored into the dataclass of the abstract state given.

Every process calls save/restore (Orbax coordinates multi-host writes); restored arrays come back
with the shardings of the abstract state passed in, so a checkpoint written on one mesh can be
read on another.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)
State = Any  # A dataclass of arrays with a ``step`` field.


def make_checkpoint_manager(directory: str | os.PathLike, save_every: int,
                            max_to_keep: int = 2) -> ocp.CheckpointManager:
  """A manager that saves every ``save_every`` steps (and when forced), keeping the latest few."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                         save_interval_steps=max(1, int(save_every)),
                                         create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _as_tree(state: State) -> dict[str, Any]:
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def save_state(manager: ocp.CheckpointManager, state: State, force: bool = False) -> bool:
  """Saves ``state`` under its step if the interval says so (or ``force``); True if it saved."""
  step = int(jax.device_get(state.step))
  if force and step in manager.all_steps():
    return False
  saved = manager.save(step, args=ocp.args.StandardSave(_as_tree(state)), force=force)
  if saved:
    log.info("checkpoint saved at step %d", step)
  return saved


class CheckpointUnreadable(OSError):
  """A checkpoint that could not be read for a reason that may pass (disk, permissions, the
  filesystem); it is kept where it is."""


# TensorStore errors (ValueError "CODE: ...") that say a checkpoint's bytes are damaged: data
# that does not decode or is cut short, or a file of the step that is not there. Its other codes
# (PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED, ...) and OS
# errors can pass, and an error of neither kind is not proof of damage either.
_DAMAGE_CODES = ("DATA_LOSS", "FAILED_PRECONDITION", "OUT_OF_RANGE", "NOT_FOUND")
_OK, _DAMAGED, _UNREADABLE = 0, 1, 2


class _NonFinite(ValueError):
  pass


def _causes(error: BaseException) -> list[BaseException]:
  """``error`` and the exceptions it was raised from or while handling."""
  chain = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


def is_damage(error: BaseException) -> bool:
  """Whether ``error`` proves the checkpoint's data damaged (bytes that do not decode, a file of
  the step missing, non-finite values), as opposed to a failure that may pass."""
  chain = _causes(error)
  if any(isinstance(e, OSError) and not isinstance(e, FileNotFoundError) for e in chain):
    return False
  return any(isinstance(e, (_NonFinite, json.JSONDecodeError, FileNotFoundError))
             or (isinstance(e, ValueError) and str(e).split(":", 1)[0] in _DAMAGE_CODES)
             for e in chain)


def _cause(error: BaseException) -> str:
  """The innermost message of an error chain, on one line, at most 240 characters."""
  inner = _causes(error)[-1]
  return " ".join(f"{type(inner).__name__}: {inner}".split())[:240]


def _agree(verdict: int) -> int:
  """The worst verdict of every process (a collective on several processes): every process
  then sets aside, raises or goes on alike."""
  if jax.process_count() == 1:
    return verdict
  from jax.experimental import multihost_utils

  return int(np.max(multihost_utils.process_allgather(np.array([verdict], np.int32))))


def restore_latest(manager: ocp.CheckpointManager, abstract_state: State) -> State | None:
  """The newest intact saved state, placed like ``abstract_state`` (ShapeDtypeStructs with
  shardings); None when there is none.

  A step whose data is proven damaged (bytes that do not decode, a missing file, non-finite
  params or optimizer state) is moved aside to ``<step>.corrupt`` (kept, never deleted) with a
  warning naming it, and the next older step is tried. Any other failure to read (a full disk,
  a permission, an interrupted read) leaves the checkpoint in place and raises
  `CheckpointUnreadable` in one line. The processes agree before acting, so all act alike.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    folder = Path(manager.directory) / str(step)
    tree, error = None, None
    try:
      tree = manager.restore(step, args=ocp.args.StandardRestore(_as_tree(abstract_state)))
    except Exception as e:  # noqa: BLE001  (classified below: damage, or a failure that may pass)
      error = e
    verdict = _agree(_OK if error is None else _DAMAGED if is_damage(error) else _UNREADABLE)
    if verdict == _OK and not _all_finite(tree):  # Reduced over the global arrays: one answer.
      verdict, error = _DAMAGED, _NonFinite("non-finite values in the parameters or optimizer "
                                            "state")
    if verdict == _UNREADABLE:
      cause = _cause(error) if error is not None else "it failed on another process"
      raise CheckpointUnreadable(
          f"checkpoint {folder} could not be read ({cause}); it is kept: fix the cause (disk "
          "space, permissions, the filesystem) and run again") from None
    if verdict == _DAMAGED:
      _set_aside(manager, step, error)
      continue
    log.info("restored checkpoint at step %d", step)
    return dataclasses.replace(abstract_state, **tree)
  return None


def _all_finite(tree: Any) -> bool:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return bool(jax.jit(lambda xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])))(
      leaves)) if leaves else True


def _set_aside(manager: ocp.CheckpointManager, step: int, error: Exception | None) -> None:
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
  cause = _cause(error) if error is not None else "damaged on another process"
  log.warning("checkpoint %s is damaged (%s); moved aside to %s and trying an older step", folder,
              cause, aside.name)


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs that carry shardings (what ``restore_latest`` places arrays by)."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)
