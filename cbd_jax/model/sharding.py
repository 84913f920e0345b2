"""Device meshes and name-based sharding rules for param trees, optimizer states and batches.

A mesh has the axes ``data`` (pure data parallel), ``fsdp`` (data parallel with params sharded)
and ``tensor`` (model parallel over heads, FFN neurons and vocabulary). Rules are an ordered list
of ``(regex, PartitionSpec)`` searched against the "/"-joined path of each leaf; the first match
wins. Because ``re.search`` is used, a rule for ``layers/mlp/up/weight$`` also places the Adam
moments stored under ``.../mu/layers/mlp/up/weight``. A mesh axis that does not divide a dimension
is dropped for that leaf (the dimension is replicated), so one rule set serves every model shape.

Across processes: `global_batch` makes global arrays of each process's rows, `host_params` full
host copies of sharded ones, `sync` a barrier.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
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


def num_slices(devices: Sequence[Any]) -> int:
  """Number of TPU slices (ICI islands joined by DCN) the devices span; 1 off multi-slice TPU."""
  return len({getattr(d, "slice_index", 0) or 0 for d in devices})


def make_mesh(shape: dict[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh with the named axes in order; one size may be -1 (it takes the remaining devices).

  On devices spanning several TPU slices, ``shape`` describes one slice (ICI) and the ``data``
  axis is multiplied by the slice count over DCN (a hybrid mesh, as MaxText's dcn_data_parallelism).
  """
  devices = list(devices if devices is not None else jax.devices())
  slices = num_slices(devices)
  if slices > 1:
    return _hybrid_mesh(shape, devices, slices)
  names, sizes = _fill_sizes(shape, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(names)
  return jax.make_mesh(tuple(sizes), names, axis_types=auto, devices=devices)


def _hybrid_mesh(shape: dict[str, int], devices: list, slices: int) -> Mesh:
  """ICI mesh ``shape`` within each slice, ``data`` x slices across them (DCN)."""
  from jax.experimental import mesh_utils

  if len(devices) % slices:
    raise ValueError(f"{len(devices)} devices do not split evenly over {slices} slices")
  names, sizes = _fill_sizes(shape, len(devices) // slices)
  dcn = [slices if n == "data" else 1 for n in names]
  grid = mesh_utils.create_hybrid_device_mesh(sizes, dcn, devices, allow_split_physical_axes=True)
  return Mesh(grid, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def _fill_sizes(shape: dict[str, int], count: int) -> tuple[tuple[str, ...], list[int]]:
  """(axis names, sizes) with -1 filled from ``count`` devices and absent axes set to 1."""
  names, sizes = tuple(shape), [int(s) for s in shape.values()]
  unknown = [n for n in names if n not in MESH_AXES]
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; use names from {MESH_AXES}")
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {shape}: at most one axis may be -1 (fill)")
  known = math.prod(s for s in sizes if s != -1)
  if known <= 0 or count % known:
    raise ValueError(f"mesh {shape} does not fit {count} devices; make the product of the "
                     "fixed sizes divide the device count")
  sizes = [count // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != count:
    used = dict(zip(names, sizes, strict=True))
    raise ValueError(f"mesh {used} uses {math.prod(sizes)} devices but {count} are "
                     "present; set one axis to -1")
  for axis in MESH_AXES:  # Every rule may name every axis, so missing ones get size 1.
    if axis not in names:
      names, sizes = names + (axis,), sizes + [1]
  return names, sizes


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
      fitted = _fit_spec(spec, tuple(shape), mesh)
      if "fsdp" in _axes(spec) and "fsdp" not in _axes(fitted):
        fitted = _refit_fsdp(fitted, tuple(shape), mesh, stacked=path.startswith("layers/"))
      return fitted
  return P()


def _axes(spec: P) -> set[str]:
  """Mesh axes a spec names."""
  out = set()
  for entry in spec:
    out.update((entry,) if isinstance(entry, str) else tuple(entry or ()))
  return out


def _refit_fsdp(spec: P, shape: tuple[int, ...], mesh: Mesh, stacked: bool) -> P:
  """FSDP on the largest dimension ``fsdp`` divides when the rule's own dimension it does not.

  (e.g. Qwen2.5-0.5B's 896 channels over 256 chips: its 4,864 FFN neurons split instead.) The
  layer axis of stacked leaves is never split: the layer scan slices it.
  """
  entries = list(spec) + [None] * (len(shape) - len(spec))
  best = None
  for i in range(1 if stacked else 0, len(shape)):
    kept = (entries[i],) if isinstance(entries[i], str) else tuple(entries[i] or ())
    size = mesh.shape["fsdp"] * math.prod(mesh.shape[a] for a in kept)
    if mesh.shape["fsdp"] > 1 and shape[i] % size == 0 and (best is None or shape[i] > best[1]):
      best = (i, shape[i], kept)
  if best is None:
    return spec
  i, _, kept = best
  entries[i] = (*kept, "fsdp") if kept else "fsdp"
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


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


def constrain_batch(x: jax.Array, batch_dim: int = 0) -> jax.Array:
  """``x`` with axis ``batch_dim`` split over (data, fsdp) of the mesh being traced under.

  MaxText's activation rule: activations stay sharded by example under every mesh, so FSDP
  gathers weights, never the batch. Other axes are left to XLA (e.g. heads over ``tensor``).
  A no-op outside ``jax.set_mesh`` or when the batch axes do not divide the dimension.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  fitted = _fit_spec(batch_spec(batch_dim + 1, batch_dim), x.shape[:batch_dim + 1], mesh)
  if not any(fitted):
    return x
  entries = [P.UNCONSTRAINED] * x.ndim
  entries[batch_dim] = fitted[batch_dim]
  return jax.lax.with_sharding_constraint(x, P(*entries))


def batch_shards(size: int) -> int:
  """How many ways ``constrain_batch`` splits an axis of ``size`` examples under the mesh being
  traced under: the product of the batch axes that divide it (1 outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return 1
  return math.prod(mesh.shape[a] for a in _axes(_fit_spec(batch_spec(1), (size,), mesh)))


def heads_spec(shape: tuple[int, ...], mesh) -> P:
  """[B, T, H, hd] activations: examples over (data, fsdp), heads over ``tensor``, fitted."""
  return _fit_spec(P(BATCH_AXES, None, "tensor", None), tuple(shape), mesh)


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


# --- arrays across processes -------------------------------------------------------------------


def global_batch(mesh, local: dict[str, np.ndarray], leading: int) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over (data, fsdp) on axis ``leading``.

  Each batch shard must live on one process's devices (true when the tensor axis stays within a
  host, as ``jax.make_mesh`` lays meshes out); the rows' order across processes does not matter,
  since losses are token sums.
  """
  pc = jax.process_count()
  sh = batch_sharding(mesh, ndim=local["ids"].ndim, leading=leading)

  def one(x):
    shape = list(x.shape)
    shape[leading] *= pc
    return jax.make_array_from_process_local_data(sh, x, tuple(shape))
  return {k: one(v) for k, v in local.items()}


def padded_rows(rows: int, mesh) -> int:
  """``rows`` rounded up to a multiple of the mesh's batch shards (data x fsdp)."""
  return -(-int(rows) // data_parallel_size(mesh)) * data_parallel_size(mesh)


def pad_rows(mesh, local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's rows [B / P, ...] of a held-out batch, with zero rows added so the global
  batch splits over the mesh's batch shards (`padded_rows`). A zero row's mask (and pair mask)
  is 0, so the batch's token sums do not change."""
  rows = next(iter(local.values())).shape[0]
  extra = (padded_rows(rows * jax.process_count(), mesh) - rows * jax.process_count())
  if not extra:
    return local
  if extra % jax.process_count():
    raise ValueError(f"a held-out batch of {rows * jax.process_count()} rows cannot be padded to "
                     f"the mesh's {data_parallel_size(mesh)} batch shards evenly over "
                     f"{jax.process_count()} processes; make eval.batch_size a multiple of "
                     f"{data_parallel_size(mesh)}")
  per = extra // jax.process_count()
  return {k: np.concatenate([v, np.zeros((per,) + v.shape[1:], v.dtype)]) for k, v in local.items()}


def host_params(params: Any) -> Any:
  """Full numpy copies of (possibly multi-host sharded) arrays on every process."""
  if jax.process_count() == 1:
    return jax.device_get(params)
  return multihost_utils.process_allgather(params, tiled=True)


def sync(name: str) -> None:
  """A barrier of every process (nothing on one host)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
