"""Data at pod scale: parallel sharded tokenisation and O(1) resume of a streamed source.

Builds a corpus of ``--corpus_mb`` MB under ``--dir`` by repeating the offline training and
held-out text (``cbd_jax.checkpoints.assets``), then measures, with the SmolLM2 tokenizer:
  tokenise: ``data.load_tokens`` (worker processes into memory-mapped shards): wall time, tokens/s
    per core, peak RSS of the process tree (sampled every 0.2 s); the old in-memory tokeniser
    (one process, a list of arrays concatenated) on a ``--old_mb`` MB prefix as the baseline,
    with the new one on the same prefix;
  resume: a streamed jsonl source (``streaming=True``, the hub code path) asked for batch
    ``--stream_step`` by a fresh object: from the newest saved position (new) against re-reading
    and dropping every earlier batch (old; timed at step 0 and at ``--old_resume_steps`` and
    extrapolated linearly, since the re-read is proportional to the step).
Prints a table and writes benchmarks/results/data_scale.json (after every phase).

  python benchmarks/bench_data.py [--corpus_mb 1024] [--old_mb 64] [--stream_step 100000]
"""

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "results" / "data_scale.json"


def _tree_memory() -> tuple[int, int]:
  """(RSS, anonymous RSS) in bytes of this process and all its descendants, from /proc."""
  parent = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        stat = Path(f"/proc/{entry}/stat").read_text()
      except OSError:
        continue
      parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
  tree, frontier = {os.getpid()}, [os.getpid()]
  while frontier:
    kids = [p for p, pp in parent.items() if pp in frontier]
    tree.update(kids)
    frontier = kids
  total = anon = 0
  for pid in tree:
    try:
      fields = dict(line.split(":", 1) for line in
                    Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    except OSError:
      continue
    total += int(fields.get("VmRSS", "0 kB").split()[0]) << 10
    anon += int(fields.get("RssAnon", "0 kB").split()[0]) << 10
  return total, anon


class PeakRSS:
  """Peak resident memory of this process and its children, sampled in a thread."""

  def __init__(self, period_s: float = 0.2):
    self.period_s, self.peak, self.peak_anon = period_s, 0, 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _sample(self) -> None:
    total, anon = _tree_memory()
    self.peak, self.peak_anon = max(self.peak, total), max(self.peak_anon, anon)

  def _run(self) -> None:
    while not self._stop.is_set():
      self._sample()
      time.sleep(self.period_s)

  def __enter__(self):
    self._sample()
    self.start = self.peak
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def build_corpus(folder: Path, mb: int) -> Path:
  """A text file of at least ``mb`` MB: the offline text repeated (one document per line)."""
  from cbd_jax.checkpoints import assets

  path = folder / f"corpus_{mb}mb.txt"
  if path.exists() and path.stat().st_size >= mb << 20:
    return path
  text = assets.english_text()
  unit = (text["train"].read_text() + "\n" + text["heldout"].read_text()).encode()
  with open(path.with_suffix(".part"), "wb") as f:
    for _ in range(-(-(mb << 20) // len(unit))):
      f.write(unit + b"\n")
  os.replace(path.with_suffix(".part"), path)
  return path


def prefix_file(path: Path, mb: int, suffix: str = ".txt") -> Path:
  """The first ``mb`` MB of ``path`` (whole lines), as its own file."""
  out = path.with_name(f"{path.stem}_prefix{mb}mb{suffix}")
  if not out.exists():
    with open(path, "rb") as f:
      head = f.read(mb << 20)
    out.write_bytes(head[: head.rfind(b"\n") + 1])
  return out


def old_load_tokens(source: str, tokenizer) -> np.ndarray:
  """The previous in-memory tokeniser: every batch's ids kept, then concatenated."""
  from cbd_jax import data
  from cbd_jax.data import documents

  ds = data.load_documents(source)
  chunks = []
  for texts in documents.iter_documents(ds, "text"):
    ids = documents.encode(tokenizer, texts)
    if ids:
      chunks.append(np.fromiter((t for x in ids for t in x), np.uint32))
  return np.concatenate(chunks)


def loadavg() -> dict:
  return {"loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def tokenise_phase(args, tokenizer, corpus: Path, results: dict) -> None:
  """Old and new tokenisation of the prefix, then new tokenisation of the whole corpus."""
  from cbd_jax import data

  prefix = prefix_file(corpus, args.old_mb)
  runs = [("old, one process, in memory", prefix, lambda p: old_load_tokens(str(p), tokenizer)),
          ("new, shards", prefix, None), ("new, shards", corpus, None)]
  for name, path, fn in runs:
    data.load_documents(str(path))  # Arrow cache of the text built outside the timing.
    cache = Path(args.dir) / f"cache-{path.stem}"
    if fn is None:
      fn = lambda p, c=cache: data.load_tokens(str(p), tokenizer, c, workers=args.workers)  # noqa: E731
    row = {"phase": "tokenise", "method": name, "text_mb": round(path.stat().st_size / 2**20, 1)}
    row.update(loadavg())
    with PeakRSS() as rss:
      t0 = time.perf_counter()
      tokens = fn(path)
      seconds = time.perf_counter() - t0
    auto = min(os.cpu_count(), -(-path.stat().st_size // (16 << 20)))  # As write_shards.
    cores = 1 if name.startswith("old") else (args.workers or auto)
    row.update(tokens=len(tokens), seconds=round(seconds, 1),
               tokens_per_s=round(len(tokens) / seconds), cores=cores,
               tokens_per_s_per_core=round(len(tokens) / seconds / cores),
               peak_rss_mb=round(rss.peak / 2**20), peak_rss_anon_mb=round(rss.peak_anon / 2**20),
               rss_before_mb=round(rss.start / 2**20), loadavg_end=list(os.getloadavg()))
    del tokens
    results["rows"].append(row)
    save(results)
    print(row, flush=True)


def stream_source(args, corpus: Path) -> str:
  """A jsonl of the corpus's lines, long enough for ``stream_step`` batches (plus 20%)."""
  need_mb = args.stream_step * args.stream_batch * (args.stream_seq + 1) * 4.5 * 1.2 / 2**20
  out = Path(args.dir) / f"stream_{int(need_mb)}mb.jsonl"
  if not out.exists():
    with open(corpus) as f, open(out.with_suffix(".part"), "w") as g:
      for line in f:
        if line.strip():
          g.write(json.dumps({"text": line.rstrip("\n")}) + "\n")
        if g.tell() > need_mb * 2**20:
          break
    os.replace(out.with_suffix(".part"), out)
  return str(out)


class OldStreamed:
  """The previous StreamedTokens: a datasets shuffle buffer; step s re-reads s batches."""

  def __init__(self, ds, tokenizer, seq_len, seed, shuffle_buffer):
    self.ds, self.tokenizer, self.seq_len = ds, tokenizer, seq_len
    self.seed, self.shuffle_buffer = seed, shuffle_buffer

  def batch(self, step, microbatches, batch_size):
    from cbd_jax import data

    ds = self.ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
    ds.set_epoch(0)
    it = data.pack_stream(ds, self.tokenizer, self.seq_len)
    for _ in range(step * microbatches * batch_size):
      next(it)
    return np.stack([next(it) for _ in range(microbatches * batch_size)])


def resume_phase(args, tokenizer, corpus: Path, results: dict) -> None:
  """Time for a fresh object to give batch ``stream_step``: old (extrapolated) and new."""
  from cbd_jax import data

  source = stream_source(args, corpus)
  ds = lambda: data.load_documents(source, streaming=True)  # noqa: E731
  shape = (1, args.stream_batch)
  base = {"phase": "resume", "step": args.stream_step, "batch": args.stream_batch,
          "seq_len": args.stream_seq}
  timed = []
  for step in (0, 0, args.old_resume_steps):  # Warm-up; a fixed cost; plus a cost per step.
    t0 = time.perf_counter()
    OldStreamed(ds(), tokenizer, args.stream_seq, 0, 10_000).batch(step, *shape)
    timed.append(time.perf_counter() - t0)
  timed = timed[1:]
  per_step = max(timed[1] - timed[0], 0.0) / args.old_resume_steps
  results["rows"].append(dict(base, method="old: re-read and drop", **loadavg(),
                              timed_steps=args.old_resume_steps, timed_seconds=round(timed[1], 2),
                              step0_seconds=round(timed[0], 2),
                              seconds=round(timed[0] + per_step * args.stream_step, 1),
                              extrapolated=True))
  save(results)
  state = Path(args.dir) / "stream_state"
  shutil.rmtree(state, ignore_errors=True)  # Saved positions come from this run only.
  make = lambda: data.StreamedTokens(ds(), tokenizer, args.stream_seq, 0, state_dir=state,  # noqa: E731
                                     source_id=source, snapshot_every=args.snapshot_every)
  first = make()
  t0 = time.perf_counter()
  for step in range(args.stream_step):
    first.batch(step, *shape)
  want = first.batch(args.stream_step, *shape)["ids"]
  run_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  got = make().batch(args.stream_step, *shape)["ids"]
  new_s = time.perf_counter() - t0
  results["rows"].append(dict(base, method="new: from the newest saved position", **loadavg(),
                              seconds=round(new_s, 2), equal_to_uninterrupted=bool(
                                  np.array_equal(got, want)),
                              uninterrupted_run_seconds=round(run_s, 1),
                              snapshot_every=args.snapshot_every,
                              snapshots=len(list(first.state_dir.glob("seq_*.json")))))
  save(results)


def save(results: dict) -> None:
  out = Path(results["out"])
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=1) + "\n")


def table(results: dict) -> str:
  lines = ["| phase | method | size | tokens | seconds | tokens/s per core | peak RSS MB (anon) | "
           "load avg |", "|---|---|---|---|---|---|---|---|"]
  for r in results["rows"]:
    load = r["loadavg_1_5_15"][0]
    if r["phase"] == "tokenise":
      lines.append(f"| tokenise | {r['method']} ({r['cores']} cores) | {r['text_mb']} MB | "
                   f"{r['tokens']:,} | {r['seconds']:,} | {r['tokens_per_s_per_core']:,} | "
                   f"{r['peak_rss_mb']:,} ({r['peak_rss_anon_mb']:,}) | {load} |")
    else:
      note = " (extrapolated)" if r.get("extrapolated") else ""
      lines.append(f"| resume | {r['method']} | step {r['step']:,} (B={r['batch']}, "
                   f"T={r['seq_len']}) |  | {r['seconds']:,}{note} |  |  | {load} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", default="/tmp/cbd-bench-data")
  parser.add_argument("--corpus_mb", type=int, default=1024)
  parser.add_argument("--old_mb", type=int, default=64)
  parser.add_argument("--workers", type=int, default=0, help="0: one per core")
  parser.add_argument("--tokenizer", default="", help="default: the offline SmolLM2 tokenizer")
  parser.add_argument("--stream_step", type=int, default=100_000)
  parser.add_argument("--stream_batch", type=int, default=1)
  parser.add_argument("--stream_seq", type=int, default=128)
  parser.add_argument("--old_resume_steps", type=int, default=2000)
  parser.add_argument("--snapshot_every", type=int, default=100)
  parser.add_argument("--phases", default="resume,tokenise")
  parser.add_argument("--out", default=str(OUT))
  args = parser.parse_args()
  Path(args.dir).mkdir(parents=True, exist_ok=True)
  os.environ.setdefault("HF_DATASETS_CACHE", str(Path(args.dir) / "hf_datasets"))
  from cbd_jax.checkpoints import assets, hf_io

  converted = sorted((assets.cache_dir() / "converted").glob("SmolLM2*/tokenizer.json"))
  default = converted[0].parent if converted else assets.smollm2_gguf()  # GGUF: slower to load.
  tokenizer = hf_io.load_tokenizer(args.tokenizer or default)
  corpus = build_corpus(Path(args.dir), args.corpus_mb)
  results = {"machine": f"{os.cpu_count()}-core CPU", "command": "python benchmarks/bench_data.py "
             + " ".join(f"--{k}={v}" for k, v in vars(args).items()), "rows": [],
             "loadavg_start": list(os.getloadavg()), "out": args.out}
  for phase in args.phases.split(","):
    {"resume": resume_phase, "tokenise": tokenise_phase}[phase](args, tokenizer, corpus, results)
  results["loadavg_end"] = list(os.getloadavg())
  save(results)
  print(table(results))


if __name__ == "__main__":
  main()
