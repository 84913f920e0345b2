"""Standard-task evaluation with lm-evaluation-harness, and the scores it leaves beside a model.

``evaluate_model(DIR, ["hellaswag"])`` runs lm-eval with the ``cbd_jax`` backend
(`evaluation/lm_backend.py`) and writes lm-eval's results JSON to ``DIR/lm_eval/results.json``;
``read_task_scores(DIR)`` reads it back as ``{task: {metric: value}}`` for reports.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax

RESULTS = Path("lm_eval") / "results.json"


def results_path(model: str | os.PathLike) -> Path:
  """Where a model's results go: ``DIR/lm_eval/results.json`` beside a local folder or file,
  ``lm_eval_results/ORG__NAME/results.json`` for a hub id."""
  path = Path(model).expanduser()
  if path.is_dir():
    return path / RESULTS
  if path.is_file():
    return path.parent / "lm_eval" / f"{path.stem}.json"
  return Path("lm_eval_results") / str(model).replace("/", "__") / "results.json"


def parse_tasks(tasks: str | list[str]) -> list[str]:
  """'hellaswag, arc_easy' -> ['hellaswag', 'arc_easy'] (at least one name)."""
  names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)]
  names = [t for t in names if t]
  if not names:
    raise ValueError("no task given; pass e.g. --tasks=hellaswag,arc_easy")
  return names


def check_tasks(names: list[str], include_path: str | None = None):
  """A TaskManager that knows every name: this project's local tasks (`evaluation/lm_tasks`), those
  of ``include_path`` and, only when needed (indexing them takes a while), lm-eval's own."""
  from lm_eval.tasks import TaskManager

  from cbd_jax.evaluation.lm_tasks import TASKS_DIR

  if include_path and not Path(include_path).is_dir():
    raise ValueError(f"--include_path {include_path}: not a folder; pass the folder that holds "
                     "the task YAML files")
  paths = [str(TASKS_DIR)] + ([str(include_path)] if include_path else [])
  manager = TaskManager(include_path=paths, include_defaults=False)
  if not set(names) <= set(manager.all_tasks):
    manager = TaskManager(include_path=paths)
  unknown = [n for n in names if n not in set(manager.all_tasks)]
  if unknown:
    raise ValueError(f"unknown task(s) {', '.join(unknown)}; list them with `lm_eval ls tasks` "
                     "or add their YAML folder with --include_path")
  return manager


def evaluate_model(model_dir: str, tasks: str | list[str], num_fewshot: int | None = None,
                   limit: float | None = None, include_path: str | None = None,
                   batch_size: int = 16, output: str | None = None, log_samples: bool = False,
                   bootstrap_iters: int = 1000, **model_args) -> dict[str, Any]:
  """Runs lm-eval on a model (HF folder, hub id or .gguf) with the JAX backend; writes and
  returns lm-eval's results dict (per-sample responses under "samples" when ``log_samples``)."""
  import lm_eval

  from cbd_jax.evaluation.lm_backend import JaxLM

  names = parse_tasks(tasks)
  manager = check_tasks(names, include_path)
  lm = JaxLM(pretrained=model_dir, batch_size=batch_size, **model_args)
  results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                    task_manager=manager, log_samples=log_samples,
                                    bootstrap_iters=bootstrap_iters)
  results["config"]["model"] = "cbd_jax"
  results["config"]["model_args"] = dict(pretrained=str(model_dir), **model_args)
  out = Path(output) if output else results_path(model_dir)
  if jax.process_index() == 0:
    write_results(results, out)
  return results


_PER_TASK = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
             "higher_is_better", "n-samples")


def write_results(results: dict, path: Path) -> Path:
  """lm-eval's results as JSON (samples left out), written whole or not at all; tasks of an
  earlier file at ``path`` that this run did not evaluate are kept."""
  from lm_eval.utils import handle_non_serializable

  data = {k: v for k, v in results.items() if k != "samples"}
  if path.is_file():
    old = json.loads(path.read_text(encoding="utf-8"))
    for key in _PER_TASK:
      if isinstance(old.get(key), dict) and isinstance(data.get(key, {}), dict):
        data[key] = {**old[key], **data.get(key, {})}
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
  os.replace(tmp, path)
  return path


def read_task_scores(folder: str | os.PathLike) -> dict[str, dict[str, float]]:
  """``{task: {metric: value}}`` from ``folder/lm_eval/results.json`` ({} when absent); standard
  errors and lm-eval's filter suffixes (``acc,none`` -> ``acc``) are dropped."""
  path = results_path(folder)
  if not path.is_file():
    return {}
  scores = {}
  for task, metrics in json.loads(path.read_text(encoding="utf-8")).get("results", {}).items():
    scores[task] = {}
    for key, value in metrics.items():  # Metrics are "name,filter"; others are bookkeeping.
      metric, comma, filt = key.partition(",")
      if comma and isinstance(value, (int, float)) and not metric.endswith("_stderr"):
        scores[task][metric if filt in ("", "none") else key] = float(value)
  return scores


def format_task_scores(scores: dict[str, dict[str, float]]) -> str:
  """'hellaswag acc 0.2890 acc_norm 0.3110; arc_easy acc 0.4400' (empty when no scores)."""
  return "; ".join(f"{task} " + " ".join(f"{m} {v:.4f}" for m, v in sorted(metrics.items()))
                   for task, metrics in sorted(scores.items()))
