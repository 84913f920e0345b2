"""``<workdir>/chain.json``: the chain's anchors, shapes, parameter counts, tokens, evaluations.

    {"source": {"path", "num_params", "config"},
     "anchors": [{"name", "path" (HF folder relative to the workdir), "num_params", "config",
                  "status": "pending" | "running" | "done", "tokens", "steps", "eval"}, ...],
     "config": the run's ml_collections config as a dict}

Anchors are listed large to small (chain order). Only process 0 writes; each write replaces the
file whole (write beside, then rename), so a crash never leaves half a manifest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax

from cbd_jax.checkpoints import hf_io
from cbd_jax.files import write_json
from cbd_jax.model.config import ModelConfig, num_params

MANIFEST = "chain.json"


def _clean(config: ModelConfig) -> dict[str, Any]:
  """The architecture as saved (compute dtype and remat are run settings, not the model's)."""
  return config.replace(dtype="float32", remat=False).to_dict()


def pending_entry(link) -> dict[str, Any]:
  return {"name": link.name, "path": f"anchors/{link.name}", "num_params": None, "config": None,
          "status": "pending", "tokens": 0, "steps": 0, "eval": {}}


def running_entry(entry: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
  """The entry of a link whose student now exists (its shape is fixed from here on)."""
  return dict(entry, status="running", config=_clean(config), num_params=num_params(config))


def save(workdir: Path, doc: dict[str, Any]) -> None:
  """Replaces the manifest whole (process 0 only); never bare NaN or Infinity in the file."""
  if jax.process_index() == 0:
    write_json(Path(workdir) / MANIFEST, doc)


def _invalid(path: Path, what: str) -> ValueError:
  return ValueError(f"{path}: {what}; it is not a chain manifest written by launch/train_chain.py "
                    "(repair it, or rebuild the chain in a new workdir)")


def _check_entry(path: Path, entry: Any, where: str) -> None:
  """An anchor or source entry has its fields; a finished one also its config and size."""
  if not isinstance(entry, dict):
    raise _invalid(path, f"{where} is a {type(entry).__name__}, not an object")
  needed = ["path", "config", "num_params"] if where == "source" else ["name", "path", "status"]
  if where == "source" or entry.get("status") == "done":
    needed += ["config", "num_params"]
  missing = sorted({k for k in needed if entry.get(k) is None})
  if missing:
    raise _invalid(path, f"{where} lacks {', '.join(missing)}")
  if entry.get("config") is not None and not isinstance(entry["config"], dict):
    raise _invalid(path, f"{where}.config is not an object")


def validate(doc: Any, path: Path) -> dict[str, Any]:
  """``doc`` if it has the manifest's shape (module docstring), else a one-line ValueError."""
  if not isinstance(doc, dict) or not doc:
    raise _invalid(path, f"the top level is {json.dumps(doc)[:20]}, not the manifest's object")
  for key in ("source", "anchors"):
    if key not in doc:
      raise _invalid(path, f"no '{key}' field")
  _check_entry(path, doc["source"], "source")
  if not isinstance(doc["anchors"], list):
    raise _invalid(path, "'anchors' is not a list")
  for i, entry in enumerate(doc["anchors"]):
    _check_entry(path, entry, f"anchors[{i}]")
  return doc


def load(workdir: Path) -> dict[str, Any] | None:
  """The validated manifest of ``workdir``, or None when there is none yet."""
  path = Path(workdir) / MANIFEST
  if not path.exists():
    return None
  try:
    doc = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON ({e}); repair it or use a new workdir") from None
  return validate(doc, path)


def read(workdir: Path) -> dict[str, Any]:
  """The validated manifest of a chain folder; a missing one is an error naming the fix."""
  doc = load(workdir)
  if doc is None:
    raise FileNotFoundError(f"{Path(workdir) / MANIFEST} not found; build the chain first "
                            "(python launch/train_chain.py) or pass the chain's folder")
  return doc


def done_anchors(doc: dict[str, Any]) -> list[dict[str, Any]]:
  """The finished anchors of a manifest, in chain order (large to small)."""
  return [a for a in doc["anchors"] if a["status"] == "done"]


RECORDED_FIELDS = ("family", "vocab_size", "hidden_size", "num_layers", "num_heads",
                   "num_kv_heads", "head_dim", "intermediate_size")


def check_recorded(folder: str | os.PathLike, config: ModelConfig, recorded: dict | None) -> None:
  """A model folder of a chain must still be the model its manifest entry records."""
  if not recorded:
    return
  diff = [f"{k} {recorded[k]} recorded, {getattr(config, k)} in the folder"
          for k in RECORDED_FIELDS if k in recorded and recorded[k] != getattr(config, k)]
  if diff:
    raise ValueError(f"{folder}: not the model {MANIFEST} records ({'; '.join(diff)}); the folder "
                     "was replaced or the manifest edited: restore the folder or rebuild the "
                     "chain")


def recorded_configs(workdir: Path, doc: dict[str, Any]) -> dict[Path, dict]:
  """{resolved folder: recorded config} of a manifest's source and finished anchors."""
  out = {Path(doc["source"]["path"]).resolve(): doc["source"]["config"]}
  for a in done_anchors(doc):
    out[(Path(workdir) / a["path"]).resolve()] = a["config"]
  return out


def load_or_create(workdir: Path, config, source_path: str) -> dict[str, Any]:
  """The workdir's manifest (checked against the config's links), or a new one."""
  names = [link.name for link in config.chain]
  if len(set(names)) != len(names):
    raise ValueError(f"link names {names} repeat; give every link its own name")
  doc = load(workdir)
  if doc is not None:
    old = [a["name"] for a in doc["anchors"]]
    if old != names:
      raise ValueError(f"{Path(workdir) / MANIFEST} was written for links {old}, the config has "
                       f"{names}; use another workdir to build a different chain")
    if doc["source"]["path"] != source_path:
      raise ValueError(f"{Path(workdir) / MANIFEST} was built from {doc['source']['path']}, the "
                       f"config names {source_path}; use another workdir")
  else:
    s_config, _ = hf_io.load_hf_numpy(source_path)
    doc = {"source": {"path": source_path, "num_params": num_params(s_config),
                      "config": _clean(s_config)},
           "anchors": [pending_entry(link) for link in config.chain]}
  doc["config"] = json.loads(config.to_json_best_effort())
  save(workdir, doc)
  return doc
