"""Device meshes and name-based sharding rules for param trees, optimizer states and batches.

A mesh has the axes ``data`` (pure data parallel), ``fsdp`` (data parallel with params sharded)
and ``tensor`` (model parallel over heads, FFN neurons and vocabulary). Rules are an ordered list
of ``(regex, PartitionSpec)`` searched against the "/"-joined path of each leaf; the first match
wins. Because ``re.search`` is used, a rule for ``layers/mlp/up/weight$`` also places the Adam
moments stored under ``.../mu/layers/mlp/up/weight``. A mesh axis that does not divide a dimension
is dropped for that leaf (the dimension is replicated), so one rule set serves every model shape.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Weights keep the PyTorch [out, in] order, heads split out and layers stacked first.
DEFAULT_RULES: tuple[tuple[str, P], ...] = (
    (r"(embed|lm_head)/(embedding|weight)$", P("tensor", "fsdp")),   # [V, D]
    (r"pos_embed/embedding$", P(None, "fsdp")),                       # [P, D]
    (r"attn/[qkv]/weight$", P(None, "tensor", None, "fsdp")),         # [L, H|K, hd, D]
    (r"attn/[qkv]/bias$", P(None, "tensor", None)),                   # [L, H|K, hd]
    (r"attn/o/weight$", P(None, "fsdp", "tensor", None)),             # [L, D, H, hd]
    (r"mlp/(gate|up)/weight$", P(None, "tensor", "fsdp")),            # [L, F, D]
    (r"mlp/up/bias$", P(None, "tensor")),                             # [L, F]
    (r"mlp/down/weight$", P(None, "fsdp", "tensor")),                 # [L, D, F]
    (r".*", P()),                                                     # norms, biases, scalars
)


def make_mesh(shape: dict[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh with the named axes in order; one size may be -1 (it takes the remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  names, sizes = tuple(shape), [int(s) for s in shape.values()]
  unknown = [n for n in names if n not in MESH_AXES]
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; use names from {MESH_AXES}")
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {shape}: at most one axis may be -1 (fill)")
  known = math.prod(s for s in sizes if s != -1)
  if known <= 0 or len(devices) % known:
    raise ValueError(f"mesh {shape} does not fit {len(devices)} devices; make the product of the "
                     "fixed sizes divide the device count")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    used = dict(zip(names, sizes, strict=True))
    raise ValueError(f"mesh {used} uses {math.prod(sizes)} devices but {len(devices)} are "
                     "present; set one axis to -1")
  for axis in MESH_AXES:  # Every rule may name every axis, so missing ones get size 1.
    if axis not in names:
      names, sizes = names + (axis,), sizes + [1]
  auto = (jax.sharding.AxisType.Auto,) * len(names)
  return jax.make_mesh(tuple(sizes), names, axis_types=auto, devices=devices)


def path_str(path) -> str:
  """'/'-joined names of a tree path (dict keys, attribute names, sequence indices)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes that do not divide their dimension; pads or trims the spec to the rank."""
  entries = list(spec)[: len(shape)] + [None] * max(0, len(shape) - len(spec))
  fitted = []
  for dim, entry in zip(shape, entries, strict=True):
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    kept = []
    for axis in axes:
      size = mesh.shape[axis] * math.prod(mesh.shape[a] for a in kept)
      if mesh.shape[axis] > 1 and dim % size == 0:
        kept.append(axis)
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  while fitted and fitted[-1] is None:
    fitted.pop()
  return P(*fitted)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh,
             rules: Sequence[tuple[str, P]] = DEFAULT_RULES) -> P:
  """The first rule whose regex is found in ``path``, fitted to ``shape``; replicated if none."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      return _fit_spec(spec, tuple(shape), mesh)
  return P()


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = DEFAULT_RULES) -> Any:
  """A NamedSharding for every leaf of a tree of arrays or ``ShapeDtypeStruct``s."""
  def one(path, leaf):
    shape = np.shape(leaf) if not hasattr(leaf, "shape") else leaf.shape
    return NamedSharding(mesh, spec_for(path_str(path), shape, mesh, rules))
  return jax.tree_util.tree_map_with_path(one, tree)


param_shardings = tree_shardings


def batch_spec(ndim: int, leading: int = 0) -> P:
  """[..., B, T...]: batch axis ``leading`` split over (data, fsdp), the rest replicated."""
  return P(*([None] * leading), BATCH_AXES, *([None] * (ndim - leading - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 2, leading: int = 0) -> NamedSharding:
  """Sharding of a batch array whose axis ``leading`` is the example axis."""
  return NamedSharding(mesh, batch_spec(ndim, leading))


def data_parallel_size(mesh: Mesh) -> int:
  """Number of batch shards: |data| * |fsdp|."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def parse_rules(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, P], ...]:
  """Rules from a config: ``[(regex, (axis_or_None_or_tuple, ...)), ...]`` -> PartitionSpecs."""
  if not rules:
    return DEFAULT_RULES
  out = []
  for item in rules:
    pattern, axes = item
    entries = [tuple(a) if isinstance(a, (list, tuple)) else a for a in axes]
    out.append((str(pattern), P(*entries)))
  return tuple(out) + ((r".*", P()),)
