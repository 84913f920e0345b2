"""Files a run writes and reads back: replaced whole, JSON that stays valid, stale writers.

A record (a manifest, a metrics window, an index) is written beside its place and renamed into
it, so a crash never leaves half of one; non-finite floats are written as strings ("nan", "inf"),
so the file stays valid JSON. `process_alive` tells the hidden folders and locks of a writer that
died from those of one still running.
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path
from typing import Any


def json_safe(obj: Any) -> Any:
  """``obj`` with non-finite floats written as strings ("nan", "inf"): valid JSON, still read."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return str(obj)
  if isinstance(obj, dict):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  return obj


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Replaces a file whole (written beside, named after this host and process, then renamed)."""
  path = Path(path)
  tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.part")
  tmp.write_text(text)
  os.replace(tmp, path)


def write_json(path: str | os.PathLike, doc: Any) -> None:
  """``doc`` as indented JSON, replacing ``path`` whole (its folder made if missing)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  write_text_atomic(path, json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
  """A JSON file's content, or None when it is missing or unreadable."""
  try:
    return json.loads(Path(path).read_text())
  except (OSError, ValueError):
    return None


def process_alive(pid: int) -> bool:
  """Whether a process of this host with that pid runs (one we may not signal counts as alive)."""
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
