"""Safetensors files read by memory map (bf16 included, no torch) and written with an index.

The format: an 8-byte little-endian header length, a JSON header mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the end of the header, then the
raw little-endian bytes. Reading maps the file and hands out zero-copy numpy views, validating
every offset against the file size so a truncated file fails with its name instead of garbage.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


# What to do about a damaged file: where it came from decides how to get a good copy back.
DAMAGED = ("the file is damaged (cut short by a full disk, a killed copy or download?): fetch it "
           "again, or if cbd-jax exported it, delete the folder and rerun the command that wrote "
           "it")


class CheckpointError(ValueError):
  """A checkpoint file that is missing, truncated or inconsistent."""


def _read_header(path: Path, size: int) -> tuple[int, dict]:
  """(header length, {tensor name: info}) of a safetensors file; one-line errors if damaged."""
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, not even the "
                            f"8-byte header length); {DAMAGED}")
    (n,) = struct.unpack("<Q", head)
    if 8 + n > size:
      raise CheckpointError(f"{path}: truncated safetensors header (needs {8 + n} bytes, file has "
                            f"{size}); {DAMAGED}")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path}: corrupt safetensors header ({e}); {DAMAGED}") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, "
                          f"not an object of tensors); {DAMAGED}")
  header.pop("__metadata__", None)
  for name, info in header.items():
    if not _valid_entry(info):
      raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} has no valid "
                            f"dtype, shape and data_offsets ({info!r:.80}); {DAMAGED}")
  return n, header


def _valid_entry(info) -> bool:
  """Whether a header entry is {"dtype": str, "shape": [int...], "data_offsets": [b, e]}."""
  if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
    return False
  shape, offsets = info.get("shape"), info.get("data_offsets")
  return (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
          and isinstance(offsets, list) and len(offsets) == 2
          and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1])


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Maps a .safetensors file: returns {name: read-only numpy view}, validated against its size."""
  path = Path(path)
  size = path.stat().st_size
  n, header = _read_header(path, size)
  data_size = size - 8 - n
  needed = max((info["data_offsets"][1] for info in header.values()), default=0)
  for name, info in header.items():
    begin, end = info["data_offsets"]
    if end > data_size:
      raise CheckpointError(f"{path}: truncated: the file has {size} bytes, its header needs "
                            f"{8 + n + needed}; tensor {name!r} (bytes {begin}..{end} of the "
                            f"data section) is cut off at byte {data_size}; {DAMAGED}")
  if not header:
    return {}
  mm = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(data_size,))
  out = {}
  for name, info in header.items():
    if info["dtype"] not in _DTYPES:
      raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    dtype = np.dtype(_DTYPES[info["dtype"]])
    shape = tuple(info["shape"])
    if (end - begin) != dtype.itemsize * int(np.prod(shape)):
      raise CheckpointError(f"{path}: tensor {name!r} spans {end - begin} bytes, not the "
                            f"{dtype.itemsize * int(np.prod(shape))} its shape {shape} needs")
    out[name] = mm[begin:end].view(dtype).reshape(shape)
  return out


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
  """Writes {name: array} as one .safetensors file (header padded to 8 bytes)."""
  header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
  offset = 0
  arrays = {}
  for name, arr in tensors.items():
    arr = np.ascontiguousarray(arr)
    if arr.dtype not in _NAMES:
      raise CheckpointError(f"cannot write tensor {name!r} of dtype {arr.dtype} to safetensors")
    header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
    arrays[name] = arr
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in arrays.values():
      f.write(arr.reshape(-1).view(np.uint8).data)


def save_sharded(folder: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[str]:
  """Writes model.safetensors, or model-0000i-of-0000n.safetensors + index above the threshold."""
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, arr in tensors.items():
    if shards[-1] and size + arr.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = arr
    size += arr.nbytes
  if len(shards) == 1:
    write_safetensors(folder / "model.safetensors", shards[0])
    return ["model.safetensors"]
  names, weight_map = [], {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    write_safetensors(folder / fname, shard)
    names.append(fname)
    weight_map.update(dict.fromkeys(shard, fname))
  total = sum(a.nbytes for a in tensors.values())
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
  return names
