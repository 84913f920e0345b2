"""What keeps a long run honest: one run per workdir, no silent config change on resume, and a
clean stop on SIGTERM / SIGINT.

- `WorkdirLock`: ``<workdir>/.lock`` holds the host, pid and command of the run using the folder
  (an exclusive ``flock``, released by the kernel however the process ends). A second run on the
  same folder is refused in one line; the lock of a process that died is taken over with a
  warning.
- `fingerprint` / `check_fingerprint`: the fields that decide what a link trains, recorded in its
  manifest entry when it starts. Resuming a started or finished link with other values is refused,
  naming the changed fields, unless ``allow_changes`` is set; the change is then recorded.
- `StopSignals`: the first SIGTERM or SIGINT asks the step loop to stop after the current step;
  the driver saves a checkpoint there, writes the manifest and raises `Stopped` (exit status
  128 + the signal's number: 143 for SIGTERM, 130 for SIGINT). A second signal stops at once. On
  several hosts SIGTERM is JAX's preemption notice and every host stops at the same step
  (``multihost_utils.reached_preemption_sync_point``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import jax

from cbd_jax.files import json_safe, process_alive

log = logging.getLogger(__name__)
LOCK = ".lock"


class WorkdirBusy(ValueError):
  """Another live run holds the workdir (a fault the user fixes: a one-line error, exit 2)."""


class WorkdirLock:
  """An exclusive lock on a run's folder for the life of a ``with`` block (process 0 only)."""

  def __init__(self, workdir: str | os.PathLike):
    self.path = Path(workdir) / LOCK
    self.fd: int | None = None

  def __enter__(self) -> WorkdirLock:
    if jax.process_index() != 0:
      return self
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      raise WorkdirBusy(self._busy(_read_holder(self.path))) from None
    self.fd = fd
    self._take_over(_read_holder(self.path))
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%F %T"),
              "command": " ".join(sys.argv)[:300]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    return self

  def _busy(self, holder: dict[str, Any]) -> str:
    who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
           if holder else "another process")
    return (f"{self.path.parent} is in use by {who}; wait for that run to finish, stop it, or "
            "use another workdir")

  def _take_over(self, holder: dict[str, Any]) -> None:
    """Checks the record of a previous holder whose flock is gone (it died, or never released)."""
    if not holder:
      return
    same_host = holder.get("host") == socket.gethostname()
    if same_host and process_alive(int(holder.get("pid", 0))) and holder.get("pid") != os.getpid():
      self.__exit__()  # Live but unlocked: a file system without flock. Never share the folder.
      raise WorkdirBusy(self._busy(holder))
    if not same_host:
      self.__exit__()
      raise WorkdirBusy(self._busy(holder) + f" (if that run has ended, delete {self.path})")
    log.warning("%s: taking over the lock of pid %s on %s, which is no longer running",
                self.path, holder.get("pid"), holder.get("host"))

  def __exit__(self, *exc) -> None:
    if self.fd is None:
      return
    with contextlib.suppress(OSError):
      os.ftruncate(self.fd, 0)
    os.close(self.fd)  # Closing releases the flock.
    self.fd = None


def _read_holder(path: Path) -> dict[str, Any]:
  try:
    text = path.read_text().strip()
    return json.loads(text) if text else {}
  except (OSError, ValueError):
    return {}


# --- config fingerprints ------------------------------------------------------------------------

# Fields that do not change what a link computes: where it runs, how it reports and saves, and
# how much of it is in memory at once (remat, the fused loss's chunk of tokens).
_NOT_TRAINING = {"name", "remat", "chunk_size", "cache_dir", "mesh", "sharding_rules",
                 "checkpoint", "eval", "log", "stop_after", "workdir", "out", "overwrite",
                 "allow_changes", "random_init", "data"}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if hasattr(tree, "items"):
    out: dict[str, Any] = {}
    for key, value in tree.items():
      if key not in _NOT_TRAINING:
        out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def fingerprint(link, config) -> dict[str, Any]:
  """{field: value} of what decides the link's result: its own fields, the data, the source's
  tokenizer and the export dtype (mesh, checkpoints, eval and logging may change on resume)."""
  fields = _flatten(link.to_dict())
  fields.update(_flatten(config.data.to_dict(), "data."))  # Less its cache_dir.
  fields["export_dtype"] = config.get("export_dtype")
  if config.get("source") is not None:
    fields["source.tokenizer"] = config.source.get("tokenizer")
  return _jsonable(fields)


def _jsonable(fields: dict[str, Any]) -> dict[str, Any]:
  """As the manifest stores them (tuples -> lists, nan -> "nan"), so both sides compare alike."""
  return json.loads(json.dumps(json_safe(fields)))


def _same(a: Any, b: Any) -> bool:
  """Equal values; a field absent on one side equals an off value (0, "", False, None) on the
  other, so adding a field that defaults to off does not change a link's fingerprint."""
  return a == b or (a is None and not b) or (b is None and not a)


def check_fingerprint(entry: dict[str, Any], current: dict[str, Any], where: str,
                      allow_changes: bool) -> dict[str, Any]:
  """The entry with its fingerprint checked (or recorded); refuses a changed config in one line.

  With ``allow_changes`` a running link goes on with the new values and the change is recorded
  in the entry (``changes``: step and old -> new values); a finished link is kept as it is.
  """
  old = entry.get("fingerprint")
  if old is None and entry.get("status") == "done":
    return entry  # Built before fingerprints were recorded: nothing to compare with.
  if old is None or entry.get("status") == "pending":
    return dict(entry, fingerprint=current)
  changed = {k: [old.get(k), current.get(k)] for k in sorted(set(old) | set(current))
             if not _same(old.get(k), current.get(k))}
  if not changed:
    return entry
  shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:6])
  if len(changed) > 6:
    shown += f" and {len(changed) - 6} more"
  if not allow_changes:
    raise ValueError(f"{where} was {'built' if entry['status'] == 'done' else 'started'} with "
                     f"another config ({shown}); rerun with the original values, use another "
                     "workdir, or pass --config.allow_changes=True to go on with the new values "
                     "(recorded in the manifest)")
  if entry["status"] == "done":
    log.warning("%s is finished; the changed fields (%s) do not apply to it", where, shown)
    return entry
  log.warning("%s: going on with changed fields (%s); recorded in the manifest", where, shown)
  record = {"at_step": entry.get("steps", 0), "fields": changed}
  return dict(entry, fingerprint=current, changes=[*entry.get("changes", []), record])


# --- stop signals -------------------------------------------------------------------------------


class Stopped(Exception):
  """A link stopped on a signal after saving a checkpoint; ``exit_code`` = 128 + signal."""

  def __init__(self, message: str, signum: int, entry: dict[str, Any] | None = None):
    super().__init__(message)
    self.signum, self.entry = signum, entry
    self.exit_code = 128 + signum


class StopSignals:
  """Within its ``with`` block, SIGTERM / SIGINT ask the loop to stop (see `requested`)."""

  def __init__(self):
    self.signum: int | None = None
    self.previous: dict[int, Any] = {}

  def __enter__(self) -> StopSignals:
    if jax.process_count() > 1:
      return self  # SIGTERM is JAX's preemption notice; Ctrl-C keeps its default there.
    for signum in (signal.SIGTERM, signal.SIGINT):
      with contextlib.suppress(ValueError):  # Not the main thread: keep the defaults.
        self.previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum: int, frame) -> None:
    if self.signum is not None:  # The second signal: stop now.
      raise KeyboardInterrupt
    self.signum = signum
    log.warning("%s received: saving a checkpoint after this step, then stopping (send it "
                "again to stop at once)", signal.Signals(signum).name)

  def requested(self, step: int) -> int | None:
    """The signal to stop on after ``step`` (every host agrees on the step), else None."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      if multihost_utils.reached_preemption_sync_point(step):
        return signal.SIGTERM
      return None
    return self.signum

  def __exit__(self, *exc) -> None:
    for signum, handler in self.previous.items():
      signal.signal(signum, handler)
