"""A tokenised corpus as on-disk shards: written once in parallel, read through memory maps.

A folder ``tokens-v2-<key>/`` holds ``shard-00000.bin, ...`` (raw uint16 or uint32 token ids,
no header) and ``index.json`` (dtype and each shard's token count). Shard i holds the tokens of
the i-th contiguous block of documents, so the shards read in order are exactly the token
stream of a single-process tokenisation. Worker processes claim blocks as they free up and
append to each block's shard file as they go: memory is bounded by a block's mapped text and a
batch of documents, not by the corpus.

``index.json`` is written last and the folder is renamed into place whole, so its presence is
the completion marker: on a pod, process 0 builds the folder and the others wait for the marker
on the shared filesystem (failing with one line when process 0's ``.building`` heartbeat file is
absent or stale, e.g. a cache folder that is not shared). Reads are ``np.memmap`` views opened
on demand; every shard's size is checked against the index first, so a truncated or missing shard
is a one-line error.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cbd_jax.files import process_alive

FORMAT = 2
INDEX = "index.json"
_BYTES_PER_WORKER = 16 << 20
_MAX_OPEN = 128  # Shards kept mapped at once: bounds open file descriptors on huge corpora.


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when every id fits (half the disk and page cache), else uint32."""
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def damaged(path: Path | str, folder: Path | str, why: str) -> ValueError:
  """The one-line error for a damaged cache: names the file and the fix."""
  return ValueError(f"{path}: {why}; the token cache is damaged: delete {folder} and rerun")


class TokenShards:
  """A flat token stream stored as consecutive parts (memory-mapped files or arrays)."""

  def __init__(self, parts: list, counts: list[int], dtype, folder: Path | None = None):
    self.parts, self.counts, self.dtype, self.folder = parts, counts, np.dtype(dtype), folder
    self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
    self._open: dict[int, np.ndarray] = {}

  @classmethod
  def from_array(cls, tokens: np.ndarray) -> TokenShards:
    tokens = np.asarray(tokens).reshape(-1)
    return cls([tokens], [len(tokens)], tokens.dtype)

  @classmethod
  def open(cls, folder: Path | str) -> TokenShards:
    """The shards of a finished folder; a missing or short shard is a one-line error."""
    folder = Path(folder)
    index = folder / INDEX
    try:
      meta = json.loads(index.read_text())
      files, counts, dtype = meta["files"], [int(c) for c in meta["counts"]], meta["dtype"]
      itemsize = np.dtype(dtype).itemsize
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise damaged(index, folder, f"unreadable index ({type(e).__name__})") from None
    paths = [folder / f for f in files]
    for path, count in zip(paths, counts, strict=True):
      size = path.stat().st_size if path.exists() else -1
      if size != count * itemsize:
        got = "missing" if size < 0 else f"{size} bytes"
        raise damaged(path, folder, f"{got}, expected {count * itemsize}")
    return cls(paths, counts, dtype, folder)

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def _part(self, k: int) -> np.ndarray:
    part = self.parts[k]
    if isinstance(part, np.ndarray):
      return part
    if k not in self._open:
      if len(self._open) >= _MAX_OPEN:
        self._open.clear()
      count = self.counts[k]
      self._open[k] = (np.memmap(part, self.dtype, mode="r", shape=(count,)) if count
                       else np.zeros(0, self.dtype))
    return self._open[k]

  def take(self, starts: np.ndarray, width: int) -> np.ndarray:
    """Rows [n, width]: tokens [s, s + width) for each start s (spanning shard boundaries)."""
    starts = np.asarray(starts, np.int64).reshape(-1)
    if len(starts) and (starts.min() < 0 or starts.max() + width > len(self)):
      raise IndexError(f"token rows outside [0, {len(self)})")
    out = np.empty((len(starts), width), self.dtype)
    first = np.searchsorted(self.offsets[:-1], starts, side="right") - 1
    for i, (start, k) in enumerate(zip(starts.tolist(), first.tolist())):
      filled = 0
      while filled < width:
        local = start + filled - int(self.offsets[k])
        piece = self._part(k)[local: local + width - filled]
        out[i, filled: filled + len(piece)] = piece
        filled, k = filled + len(piece), k + 1
    return out

  def __getitem__(self, key: int | slice) -> np.ndarray:
    if not isinstance(key, slice):
      return self.take(np.array([key % len(self) if key < 0 else key]), 1)[0, 0]
    start, stop, step = key.indices(len(self))
    if step != 1:
      raise IndexError("token shards take contiguous slices only")
    return self.take(np.array([start]), max(stop - start, 0))[0]

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    return np.asarray(self[:], dtype)


def _write_block(ds, num_blocks: int, index: int, encode: Callable, dtype: str,
                 path: str) -> int:
  """Tokens of document block ``index`` of ``num_blocks``, appended to ``path``; their count."""
  block = ds.shard(num_shards=num_blocks, index=index, contiguous=True)
  count = 0
  with open(path, "wb") as f:
    for rows in block.iter(batch_size=1000):
      ids = encode(rows)
      if ids:
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype, sum(map(len, ids)))
        f.write(flat.tobytes())
        count += len(flat)
  return count


def _run_workers(tasks: list[tuple], workers: int, scratch: Path) -> list[int]:
  """``_write_block(*task)`` for every task, in ``workers`` fresh interpreters; the counts.

  Fresh interpreters (``python -m cbd_jax.data.token_shards SCRATCH``), not fork: the parent may run
  JAX threads; not multiprocessing's spawn either: it re-runs a caller's unguarded main script.
  Each worker claims the next unclaimed block, so none idles while blocks remain.
  """
  root = str(Path(__file__).resolve().parents[1])  # Importable even when not installed.
  path = os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH", "")] if p)
  env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONPATH=path)  # One core each.
  (scratch / "tasks.pkl").write_bytes(pickle.dumps([pickle.dumps(t) for t in tasks]))
  procs = []
  try:
    for w in range(workers):
      with open(scratch / f"worker-{w}.log", "wb") as err:
        cmd = [sys.executable, "-m", "cbd_jax.data.token_shards", str(scratch), str(w)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=err, stderr=err))
    counts: dict[int, int] = {}
    for w, proc in enumerate(procs):
      if proc.wait() != 0:
        last = (scratch / f"worker-{w}.log").read_text(errors="replace").strip().splitlines()
        raise RuntimeError(f"tokenising worker {w} failed (exit {proc.returncode}): "
                           f"{last[-1] if last else 'no output'}")
      counts.update({int(i): c for i, c in json.loads(
          (scratch / f"worker-{w}.json").read_text()).items()})
    return [counts[i] for i in range(len(tasks))]
  finally:
    for proc in procs:  # On an error or an interrupt, no worker outlives the call.
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def _worker_main(scratch: Path, worker: int) -> None:
  """Claims blocks (an exclusive ``claim-i`` file each) until none is left; one task unpickled
  at a time, so a block's memory-mapped text is released after it."""
  tasks, counts = pickle.loads((scratch / "tasks.pkl").read_bytes()), {}
  for i, task in enumerate(tasks):
    try:
      os.close(os.open(scratch / f"claim-{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
      continue
    counts[i] = _write_block(*pickle.loads(task))
  (scratch / f"worker-{worker}.json").write_text(json.dumps(counts))


def write_shards(folder: Path, ds, encode: Callable, dtype, workers: int,
                 block_bytes: int) -> dict:
  """Tokenises the ``datasets.Dataset`` ``ds`` into ``folder`` (created); returns the index.

  ``encode(rows)`` (picklable) maps a batch of rows to token id lists; blocks of about
  ``block_bytes`` of text are shared out to ``workers`` processes (0: auto).
  """
  folder.mkdir(parents=True)
  if workers <= 0:  # Auto: one per core, none for a small corpus (a worker costs ~2 s to start).
    workers = min(os.cpu_count() or 1, math.ceil(ds.data.nbytes / _BYTES_PER_WORKER))
  least = 2 * workers if workers > 1 else 1  # Claimed as workers free up: balanced.
  blocks = max(1, min(len(ds), max(least, math.ceil(ds.data.nbytes / block_bytes))))
  names = [f"shard-{i:05d}.bin" for i in range(blocks)]
  args = [(ds, blocks, i, encode, np.dtype(dtype).name, str(folder / n))
          for i, n in enumerate(names)]
  if workers <= 1 or blocks == 1:
    counts = [_write_block(*a) for a in args]
  else:
    scratch = folder / ".jobs"
    scratch.mkdir()
    counts = _run_workers(args, min(workers, blocks), scratch)
    shutil.rmtree(scratch)
  meta = {"format": FORMAT, "dtype": np.dtype(dtype).name, "files": names, "counts": counts}
  (folder / INDEX).write_text(json.dumps(meta))
  return meta


def _wait_for(folder: Path, timeout_s: float, poll_s: float, stale_s: float) -> None:
  """Waits for the writer's index; fails early when no writer has been seen for ``stale_s``."""
  index, marker = folder / INDEX, _marker(folder)
  start = time.monotonic()
  while not index.exists():
    waited = time.monotonic() - start
    if waited > timeout_s:
      raise TimeoutError(f"{index}: not written after {timeout_s:.0f}s; check process 0's log "
                         "(or raise data.tokenize_timeout_s)")
    if waited > stale_s:
      try:
        age = time.time() - marker.stat().st_mtime
      except OSError:
        raise TimeoutError(
            f"{index}: not written and {marker} absent after {stale_s:.0f}s: process 0 is not "
            "tokenising; data.cache_dir must be a folder all hosts share (or set "
            "data.cache_shared=False)") from None
      if age > stale_s:
        raise TimeoutError(f"{marker}: not refreshed for {age:.0f}s, the writer stopped; "
                           f"check process 0's log, delete {marker} and rerun")
    time.sleep(poll_s)


def _marker(folder: Path) -> Path:
  return folder.with_name(f"{folder.name}.building")


def _part_prefix(folder: Path) -> str:
  """The name of this host's hidden build folders of ``folder`` up to the writer's pid."""
  return f".{folder.name}.{socket.gethostname()}."


def _drop_dead_parts(folder: Path) -> None:
  """Removes the hidden build folders that killed writers of this host left beside ``folder``."""
  prefix = _part_prefix(folder)
  for part in folder.parent.glob(f"{prefix}*.part"):
    pid = part.name[len(prefix):-len(".part")]
    if pid.isdigit() and not process_alive(int(pid)):
      shutil.rmtree(part, ignore_errors=True)


def _build_with_heartbeat(folder: Path, build: Callable[[Path], object], beat_s: float) -> None:
  """``build`` into a hidden sibling renamed into place; the marker is refreshed meanwhile."""
  tmp = folder.with_name(f"{_part_prefix(folder)}{os.getpid()}.part")
  _drop_dead_parts(folder)
  marker, done = _marker(folder), threading.Event()
  marker.parent.mkdir(parents=True, exist_ok=True)

  def beat():
    while not done.wait(beat_s):
      marker.touch()

  marker.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
  thread = threading.Thread(target=beat, daemon=True)
  thread.start()
  try:
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    try:
      os.replace(tmp, folder)
    except OSError:  # Another writer finished first: keep theirs.
      shutil.rmtree(tmp, ignore_errors=True)
  finally:
    done.set()
    thread.join()
    marker.unlink(missing_ok=True)


def open_or_build(folder: Path, build: Callable[[Path], object], writer: bool,
                  timeout_s: float = 6 * 3600, poll_s: float = 2.0,
                  stale_s: float = 600.0) -> TokenShards:
  """The shards in ``folder``: built by ``build(tmp)`` when ``writer``, else waited for.

  The writer builds into a hidden sibling and renames it into place, so the folder is whole or
  absent; when two writers race, the first rename wins and the other's copy is dropped. While
  it builds, it refreshes ``<folder>.building`` every ``stale_s / 4``: a reader that sees no
  fresh marker for ``stale_s`` fails with one line instead of waiting ``timeout_s``.
  """
  folder = Path(folder)
  if not (folder / INDEX).exists():
    if writer:
      _build_with_heartbeat(folder, build, stale_s / 4)
    else:
      _wait_for(folder, timeout_s, poll_s, stale_s)
  return TokenShards.open(folder)


if __name__ == "__main__":
  _worker_main(Path(sys.argv[1]), int(sys.argv[2]))
