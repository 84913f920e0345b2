"""Metrics: token-weighted averages over logging windows, JSONL on disk, TensorBoard if present.

Steps report sums and token counts (never per-batch means), so a window's average is
sum(sums) / sum(counts): exact however batches, devices or hosts split the tokens. A link's
`Reporter` turns its step metrics into those rows, the progress bar and log lines, exactly
across resumes.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from cbd_jax.files import read_json, write_json, write_text_atomic

log = logging.getLogger(__name__)


def token_means(sums: dict[str, float]) -> dict[str, float]:
  """{name: name_sum / count} of summed step metrics (nan when no token was counted)."""
  count = sums.get("count", 0.0)
  return {k[:-4]: v / count if count else math.nan for k, v in sums.items() if k.endswith("_sum")}


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


def _progress(total: int, initial: int, name: str, enabled: bool):
  from tqdm.auto import tqdm

  return tqdm(total=total, initial=initial, desc=name, unit="step", dynamic_ncols=True,
              disable=not enabled, mininterval=1.0, smoothing=0.1)


def _kept_on_resume(row: dict[str, Any], start: int, steps: int) -> bool:
  """Rows a link resumed at ``start`` keeps: those written up to its checkpoint, but not the
  final evaluation of a link that is exported again (it is measured again)."""
  if row["step"] != start:
    return row["step"] < start
  return start < steps or not any(key.startswith("eval/") for key in row)


class Reporter:
  """Training metrics per logging window -> JSONL, the progress bar, log lines.

  Exact across resumes: a resumed link drops the rows a killed run wrote after its checkpoint,
  and picks up the open window's sums saved beside the checkpoint (`save_window`), so its rows
  equal an uninterrupted run's (but for time and throughput).
  """

  def __init__(self, run, strategy, steps: int, start: int, lead: bool):
    config = run.config
    self.name, self.strategy, self.steps = run.link.name, strategy, steps
    path = run.workdir / "metrics" / f"{run.link.name}.jsonl"
    self.window_path = path.with_suffix(".window.json")
    if lead:
      truncate_jsonl(path, functools.partial(_kept_on_resume, start=start, steps=steps))
    self.writer = MetricsWriter(
        path, run.workdir / "tensorboard" / run.link.name if config.log.get("tensorboard")
        else None, enabled=lead)
    self.every, self.quiet, self.lead = config.log.every, not config.log.progress, lead
    self.tokens_per_step = run.tokens_per_step
    self.bar = _progress(steps, start, run.link.name, lead and config.log.progress)
    self.sums, self.last = defaultdict(float), {}
    self.windows = (read_json(self.window_path) or {}) if lead else {}
    if str(start) in self.windows:
      self.sums.update(self.windows[str(start)]["sums"])
      self.last = dict(self.windows[str(start)]["last"])
    self.t_window, self.timed, self.rate = time.time(), -1, float("nan")

  def save_window(self, step: int) -> None:
    """Saves the open window's sums with a checkpoint at ``step`` (lead process only); the last
    few are kept, as a checkpoint being written when the run dies is not the one resumed from."""
    if self.lead:
      self.windows[str(step)] = {"sums": dict(self.sums), "last": self.last}
      recent = sorted(self.windows, key=int)[-4:]
      self.windows = {k: self.windows[k] for k in recent}
      write_json(self.window_path, self.windows)

  def add(self, step: int, m: dict[str, Any]) -> None:
    """One step's host metrics; writes the window's means every ``log.every`` steps.

    Throughput leaves out the run's first step (mostly compilation) and evaluation time.
    """
    for key, value in m.items():
      if key.endswith("_sum") or key in ("count", "pairs"):
        self.sums[key] += float(value)
      elif key != "loss":
        self.last[key] = float(value)
    if self.timed < 0:
      self.t_window, self.timed = time.time(), 0
    else:
      self.timed += 1
    if step % self.every and step != self.steps:
      return
    means = dict(self.strategy.summarize(self.sums), **self.last)
    if self.timed:  # Else (a window of one step after a pause) the last rate stands.
      self.rate = self.timed * self.tokens_per_step / (time.time() - self.t_window)
    means["tokens_per_s"] = self.rate
    self.writer.write(step, means, "train/")
    shown = {k: f"{means[k]:.4f}" for k in ("loss", "kd") if k in means}
    self.bar.set_postfix(**shown, tok_s=f"{self.rate:.0f}", refresh=False)
    if self.quiet and self.lead:
      log.info("link %s step %d/%d %s tok/s %.0f", self.name, step, self.steps,
               " ".join(f"{k} {v}" for k, v in shown.items()), self.rate)
    self.sums, self.last = defaultdict(float), {}
    self.t_window, self.timed = time.time(), 0

  def evaluated(self, step: int, evals: dict[str, float]) -> None:
    """Writes held-out metrics; throughput restarts after the time spent evaluating."""
    self.timed = -1
    self.writer.write(step, evals, "eval/")
    shown = " ".join(f"{k} {evals[k]:.4f}" for k in ("kl", "ce", "ppl") if k in evals)
    self.bar.set_postfix_str(f"eval {shown}", refresh=False)

  def close(self) -> None:
    self.bar.close()
    self.writer.close()
