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

from cbd_jax import hf_io
from cbd_jax.config import ModelConfig, num_params

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
  if jax.process_index() != 0:
    return
  path = Path(workdir) / MANIFEST
  tmp = path.with_name(path.name + f".{os.getpid()}.part")
  tmp.write_text(json.dumps(doc, indent=2) + "\n")
  os.replace(tmp, path)


def load(workdir: Path) -> dict[str, Any] | None:
  path = Path(workdir) / MANIFEST
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON ({e}); repair it or use a new workdir") from None


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
