"""`load_hf` / `save_hf`: Hugging Face checkpoints in, Hugging Face folders out.

Sources: a local folder (config.json + model.safetensors, a sharded safetensors index, or
pytorch_model.bin), a ``.gguf`` file (Llama architecture), or a hub id (downloaded through
``huggingface_hub`` into its cache). torch is imported only for ``.bin`` files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from cbd_jax.checkpoints import convert, hf_config
from cbd_jax.checkpoints.gguf_io import read_gguf
from cbd_jax.checkpoints.safetensors_io import (
  DAMAGED,
  CheckpointError,
  read_safetensors,
  save_sharded,
)
from cbd_jax.errors import one_line
from cbd_jax.files import process_alive
from cbd_jax.model.config import DTYPES, ModelConfig, check_dtype, export_refusal

log = logging.getLogger(__name__)
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]
_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16",
                np.dtype(np.float16): "float16"}
_PARTIAL = re.compile(r"^\..+\.partial-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def resolve(path_or_id: str | os.PathLike) -> Path:
  """A local folder or file as is; a hub id ("org/name") is downloaded (or found in the cache)."""
  path = Path(path_or_id).expanduser()
  if path.exists():
    return path
  name = str(path_or_id)
  if name.count("/") != 1 or name.startswith((".", "/", "~")) or name.endswith(".gguf"):
    raise FileNotFoundError(f"{name}: no such file or folder (and not a hub id like 'org/name')")
  import huggingface_hub

  try:
    folder = huggingface_hub.snapshot_download(name, allow_patterns=_HUB_PATTERNS)
  except Exception as e:  # Offline, unknown repo, gated repo...: one line, with the fix.
    raise FileNotFoundError(f"{name}: could not fetch from the Hugging Face hub ("
                            f"{type(e).__name__}); download it and pass the local folder") from None
  files = os.listdir(folder)
  if not any(f.endswith(".safetensors") for f in files):
    log.info("%s has no safetensors; fetching pytorch_model.bin", name)
    folder = huggingface_hub.snapshot_download(name, allow_patterns=[*_HUB_PATTERNS, "*.bin"])
  return Path(folder)


def _tokenizer_size(folder: Path) -> int | None:
  """Number of tokens (added ones included) in the folder's tokenizer.json, if there is one."""
  if not (folder / "tokenizer.json").exists():
    return None
  import tokenizers

  try:
    return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(True)
  except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception on a bad file)
    raise CheckpointError(f"{folder / 'tokenizer.json'}: unreadable tokenizer ({one_line(e)}); "
                          f"{DAMAGED}") from None


def _read_bin(path: Path) -> dict[str, np.ndarray]:
  import torch

  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise CheckpointError(f"{path}: unreadable PyTorch checkpoint ({e}); {DAMAGED}") from None
  out = {}
  for name, t in state.items():
    if t.dtype == torch.bfloat16:
      out[name] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
      out[name] = t.numpy()
  return out


def _weight_map(index: Path) -> dict[str, str]:
  """The {tensor: shard file} map of a sharded checkpoint's index; one-line errors if damaged."""
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
    raise CheckpointError(f"{index}: not a checkpoint index ({type(e).__name__}: {one_line(e)}; "
                          f"expected {{\"weight_map\": {{tensor: file}}}}); {DAMAGED}") from None
  if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
    raise CheckpointError(f"{index}: weight_map is not an object of tensor: file; {DAMAGED}")
  return weight_map


def _read_weights(folder: Path) -> Mapping[str, np.ndarray]:
  """All tensors of a model folder, whichever of the standard layouts it uses."""
  for index_name, reader in (("model.safetensors.index.json", read_safetensors),
                             ("pytorch_model.bin.index.json", _read_bin)):
    index = folder / index_name
    if index.exists():
      weight_map = _weight_map(index)
      tensors: dict[str, np.ndarray] = {}
      for shard in sorted(set(weight_map.values())):
        if not (folder / shard).exists():
          raise CheckpointError(f"{folder / shard}: shard listed in {index_name} is missing; "
                                f"{DAMAGED}")
        tensors.update(reader(folder / shard))
      return tensors
  if (folder / "model.safetensors").exists():
    return read_safetensors(folder / "model.safetensors")
  if (folder / "pytorch_model.bin").exists():
    return _read_bin(folder / "pytorch_model.bin")
  raise CheckpointError(f"{folder}: no model.safetensors, safetensors index or pytorch_model.bin")


def _folder_config(path: Path) -> ModelConfig:
  """The config of an HF model folder (config.json, and the tokenizer's size if it is smaller)."""
  if path.is_file():
    raise CheckpointError(f"{path}: pass the model folder (with config.json) or a .gguf file")
  if not (path / "config.json").exists():
    raise FileNotFoundError(f"{path}: no config.json; pass a Hugging Face model folder")
  try:
    raw_config = json.loads((path / "config.json").read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise hf_config.ConfigError(f"{path / 'config.json'}: not valid JSON ({e}); restore the "
                                "model's own config.json") from None
  config = hf_config.from_hf_config(raw_config, str(path / "config.json"))
  if config.real_vocab_size is None:
    size = _tokenizer_size(path)
    if size is not None and size <= config.vocab_size:
      config = config.replace(real_vocab_size=size)
    elif size is not None:
      log.warning("%s: the tokenizer has %d tokens but the model only %d embedding rows; ids "
                  ">= %d are refused by forward and must not reach training", path, size,
                  config.vocab_size, config.vocab_size)
  return config


def load_model_config(path_or_id: str | os.PathLike) -> ModelConfig:
  """The `ModelConfig` of an HF folder, hub id or .gguf file, without reading the weights of a
  folder."""
  path = resolve(path_or_id)
  if path.is_file() and path.suffix == ".gguf":
    return load_hf_numpy(path)[0]
  return _folder_config(path)


def load_hf_numpy(path_or_id: str | os.PathLike, dtype=None) -> tuple[ModelConfig, dict]:
  """Like `load_hf` but returns numpy params (host memory), e.g. to place them on a mesh."""
  path = resolve(path_or_id)
  if path.is_file() and path.suffix == ".gguf":
    raw_config, tensors = read_gguf(path)
    config = hf_config.from_hf_config(raw_config, str(path))
    where = str(path)
  else:
    config = _folder_config(path)
    tensors = _read_weights(path)
    where = str(path)
  if dtype is not None:
    dtype = _np_dtype(dtype)
  params = convert.from_hf_tensors(config, tensors, where, dtype)
  return config, params


def load_hf(path_or_id: str | os.PathLike, dtype=None,
            sharding: Any | Callable[[dict], Any] | None = None) -> tuple[ModelConfig, dict]:
  """Loads (config, params) from an HF folder, a hub id or a .gguf file; no torch needed.

  ``dtype`` casts the params (default: keep the file's dtype). ``sharding`` is a pytree of
  shardings matching the params, or a function from the numpy params to one.
  """
  config, params = load_hf_numpy(path_or_id, dtype)
  if callable(sharding):
    sharding = sharding(params)
  return config, jax.device_put(params, sharding)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path_or_id: str | os.PathLike):
  """The transformers tokenizer of an HF folder, hub id, or .gguf file."""
  from transformers import AutoTokenizer

  path = resolve(path_or_id)
  if path.is_file() and path.suffix == ".gguf":
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  if path.is_dir() and not any((path / f).exists() for f in _TOKENIZER_FILES):
    raise FileNotFoundError(f"{path}: no tokenizer in this folder (none of "
                            f"{', '.join(_TOKENIZER_FILES)}); pass the model's folder or its "
                            ".gguf file")
  return AutoTokenizer.from_pretrained(str(path))


def save_hf(config: ModelConfig, params: dict, out_dir: str | os.PathLike, tokenizer=None,
            dtype=None, max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False) -> Path:
  """Writes a folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

  The folder appears whole or not at all (written beside it, then renamed; folders and files get
  the umask's modes); an existing non-empty folder is kept unless ``overwrite``. Non-finite or
  non-float weights are refused before anything is written. ``dtype`` casts (default: the params'
  own dtype, which makes save -> load bit-exact). ``tokenizer``: a transformers or `tokenizers`
  tokenizer, or a path. Hidden folders of exports killed earlier beside it are removed.
  """
  out_dir = Path(out_dir)
  refusal = export_refusal(config)
  if refusal:
    raise ValueError(f"cannot export to {out_dir}: {refusal}; choose a shape whose hidden_size "
                     "num_heads divides")
  _check_destination(out_dir, overwrite)
  tensors = convert.to_hf_tensors(config, params)
  if dtype is not None:
    dtype = _np_dtype(dtype)
    with np.errstate(over="ignore"):  # An overflow becomes inf, refused just below by name.
      tensors = {k: v.astype(dtype) for k, v in tensors.items()}
  _check_weights(tensors, out_dir)
  first = next(iter(tensors.values()))
  try:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_exports(out_dir.parent)
    tmp = _new_partial(out_dir)
  except OSError as e:
    raise _os_error(e, out_dir) from None
  try:
    save_sharded(tmp, tensors, max_shard_bytes)
    raw = hf_config.to_hf_config(config, _DTYPE_NAMES.get(first.dtype, "float32"))
    (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    if tokenizer is not None:
      _save_tokenizer(tokenizer, tmp)
    if out_dir.exists():
      shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
  except OSError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    raise _os_error(e, out_dir) from None
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


def _check_destination(out_dir: Path, overwrite: bool) -> None:
  """Refuses a destination that is a file, or a non-empty folder without ``overwrite``."""
  if out_dir.exists() and not out_dir.is_dir():
    raise FileExistsError(f"{out_dir}: is a file, not a folder; pass a folder path for the model "
                          "(it is created)")
  if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
    raise FileExistsError(f"{out_dir}: folder exists and is not empty; choose another path or "
                          "pass overwrite=True")
  for parent in out_dir.parents:
    if parent.exists():
      if not parent.is_dir():
        raise FileExistsError(f"{out_dir}: {parent} is a file, not a folder; choose another path")
      break


def _np_dtype(dtype) -> np.dtype:
  """The numpy dtype of a supported name or dtype (float32, bfloat16, float16)."""
  name = check_dtype(dtype)
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _check_weights(tensors: Mapping[str, np.ndarray], out_dir: Path) -> None:
  """Refuses non-float or non-finite tensors, naming the first bad one (nothing is written)."""
  for name, arr in tensors.items():
    if arr.dtype not in _DTYPE_NAMES:
      raise ValueError(f"{out_dir}: not written: tensor {name!r} has dtype {arr.dtype}; weights "
                       f"must be float ({', '.join(DTYPES)}): cast the params or pass dtype=")
    finite = np.isfinite(arr)
    if not finite.all():
      bad = arr.size - int(finite.sum())
      raise ValueError(f"{out_dir}: not written: tensor {name!r} holds {bad:,} NaN or inf "
                       f"values of {arr.size:,}; the weights diverged (or overflow the export "
                       "dtype): rebuild them from the last finite checkpoint, e.g. with a lower "
                       "learning rate")


def check_finite(params: Any, where: str | os.PathLike) -> None:
  """Refuses a loaded model with NaN or inf weights, naming the folder and the first bad tensor
  (a model that diverged, or a damaged file, must not be measured, mixed or trained from)."""
  for path, arr in jax.tree_util.tree_flatten_with_path(params)[0]:
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.kind != "V":
      continue
    finite = np.isfinite(arr.astype(np.float32))
    if not finite.all():
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      raise ValueError(f"{where}: weight {name} holds {arr.size - int(finite.sum()):,} NaN or inf "
                       f"values of {arr.size:,}; the model diverged or its file is damaged: "
                       "rebuild it, or use another model")


def _new_partial(out_dir: Path) -> Path:
  """A new hidden folder beside ``out_dir``, named after this host and process (umask modes)."""
  name = f".{out_dir.name}.partial-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
  tmp = out_dir.parent / name
  tmp.mkdir()
  return tmp


def _remove_dead_exports(parent: Path) -> None:
  """Removes hidden partial folders in ``parent`` whose writer (this host) no longer runs."""
  host = socket.gethostname()
  for entry in parent.iterdir():
    m = _PARTIAL.match(entry.name)
    if m and m["host"] == host and not process_alive(int(m["pid"])) and entry.is_dir():
      log.warning("removing %s, left by an export that was killed", entry)
      shutil.rmtree(entry, ignore_errors=True)


def _os_error(e: OSError, out_dir: Path) -> OSError:
  """The same OS error, naming the destination and saying that nothing was written."""
  strerror = e.strerror or str(e)
  return type(e)(e.errno, f"{strerror} (nothing was written)", str(out_dir))


def _save_tokenizer(tokenizer, folder: Path) -> None:
  if isinstance(tokenizer, (str, os.PathLike)):
    tokenizer = load_tokenizer(tokenizer)
  if not hasattr(tokenizer, "save_pretrained"):  # A bare `tokenizers.Tokenizer`.
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
  tokenizer.save_pretrained(str(folder))
