"""Metrics: token-weighted averages over logging windows, JSONL on disk, TensorBoard if present.

Steps report sums and token counts (never per-batch means), so a window's average is
sum(sums) / sum(counts): exact however batches, devices or hosts split the tokens.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from cbd_jax.files import write_text_atomic

log = logging.getLogger(__name__)


class TokenAverager:
  """Accumulates ``<name>_sum`` values and the ``count`` of tokens; means = sums / count."""

  def __init__(self):
    self.sums: dict[str, float] = defaultdict(float)
    self.count = 0.0
    self.steps = 0
    self.last: dict[str, float] = {}

  def add(self, metrics: dict[str, Any]) -> None:
    """Adds one step's (host) metrics; non-sum values are kept as their latest value."""
    self.count += float(metrics["count"])
    self.steps += 1
    for key, value in metrics.items():
      if key.endswith("_sum"):
        self.sums[key[:-4]] += float(value)
      elif key != "count":
        self.last[key] = float(value)

  def means(self) -> dict[str, float]:
    """Token-weighted means of every summed metric, plus the latest non-sum values."""
    out = {k: v / self.count if self.count else math.nan for k, v in self.sums.items()}
    out.update(self.last)
    return out

  def reset(self) -> None:
    self.__init__()


def perplexity(ce: float) -> float:
  """exp(mean cross-entropy), saturating instead of overflowing."""
  return math.exp(min(ce, 50.0))


def _tensorboard_writer(folder: Path):
  for module in ("tensorboardX", "torch.utils.tensorboard"):
    try:
      mod = __import__(module, fromlist=["SummaryWriter"])
      return mod.SummaryWriter(str(folder))
    except Exception:  # Not installed (or its tensorboard dependency is missing).
      continue
  return None


class MetricsWriter:
  """Appends ``{"step", "time", **scalars}`` lines to a JSONL file (and TensorBoard if installed).

  Only the process that ``enabled`` names writes (by default process 0 of a multi-host run).
  """

  def __init__(self, path: str | os.PathLike, tensorboard_dir: str | os.PathLike | None = None,
               enabled: bool = True):
    self.enabled = enabled
    self.path = Path(path)
    self._tb = None
    if enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if tensorboard_dir is not None:
        self._tb = _tensorboard_writer(Path(tensorboard_dir))

  def write(self, step: int, scalars: dict[str, float], prefix: str = "") -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "time": round(time.time(), 3)}
    row.update({f"{prefix}{k}": _finite(v) for k, v in scalars.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(f"{prefix}{key}", value, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _finite(value: float) -> float | None:
  value = float(value)
  return value if math.isfinite(value) else None


def truncate_jsonl(path: str | os.PathLike, keep) -> None:
  """Rewrites a metrics file with only the rows ``keep(row)`` accepts (atomic; nothing if no
  row is dropped or the file does not exist)."""
  rows = read_jsonl(path)
  kept = [row for row in rows if keep(row)]
  if len(kept) < len(rows):
    log.info("%s: dropping %d rows written after the checkpoint resumed from", path,
             len(rows) - len(kept))
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """All rows of a metrics file (empty when it does not exist)."""
  path = Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
