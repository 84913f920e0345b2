"""Sequence-level KD: a corpus of text the teacher writes, for a student with any tokenizer.

Prompts are the first ``prompt_tokens`` teacher tokens of training paragraphs (a seeded sample);
the teacher continues each with ``new_tokens`` sampled tokens (`model.generate`, temperature and
top-k); prompt and continuation, decoded to text, form one document of the corpus. The student
then trains with plain cross-entropy on that text through its own tokenizer, which side-steps the
vocabulary mismatch (the paper's bridge to a chain of another family).

The corpus is cached as ``corpus.jsonl`` ({"text": ...} per line) with ``corpus.json`` beside it
(the settings and how many batches are done). Batch b is sampled with key fold_in(seed, b), so an
interrupted build resumes at its next batch and ends with the same corpus as an uninterrupted one.
Teacher forward FLOPs are counted as 2 * N_teacher per position the teacher computes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from cbd_jax.model.config import ModelConfig, num_params

log = logging.getLogger(__name__)
CORPUS, META = "corpus.jsonl", "corpus.json"


@dataclasses.dataclass(frozen=True)
class SeqKDSettings:
  """How many sequences the teacher writes, from which prompts, and how it samples."""

  num_sequences: int = 256
  prompt_tokens: int = 32
  new_tokens: int = 96
  batch_size: int = 32
  temperature: float = 1.0
  top_k: int = 50
  seed: int = 0


def sample_prompts(paragraphs: list[str], tokenizer, settings: SeqKDSettings) -> np.ndarray:
  """Token ids [num_sequences, prompt_tokens]: the start of a seeded sample of paragraphs."""
  order = np.random.default_rng(settings.seed).permutation(len(paragraphs))
  prompts = []
  for i in order:
    ids = tokenizer(paragraphs[i], add_special_tokens=False)["input_ids"]
    if len(ids) >= settings.prompt_tokens:
      prompts.append(ids[:settings.prompt_tokens])
    if len(prompts) == settings.num_sequences:
      break
  if len(prompts) < settings.num_sequences:
    raise ValueError(f"only {len(prompts)} paragraphs have {settings.prompt_tokens} tokens, "
                     f"{settings.num_sequences} prompts were asked for; give more text or fewer "
                     "sequences")
  return np.asarray(prompts, np.int32)


def load_meta(out_dir: str | os.PathLike) -> dict | None:
  """The corpus metadata in ``out_dir`` (None when no batch is done yet)."""
  out_dir = Path(out_dir)
  path = out_dir / META
  return json.loads(path.read_text()) if path.exists() else None


def _save_meta(out_dir: Path, meta: dict) -> None:
  tmp = out_dir / f"{META}.{os.getpid()}.part"
  tmp.write_text(json.dumps(meta, indent=2) + "\n")
  os.replace(tmp, out_dir / META)


def _start_meta(out_dir: Path, wanted: dict) -> dict:
  """The corpus metadata to continue from; a corpus of other settings is refused."""
  meta = load_meta(out_dir)
  if meta is not None and {k: meta.get(k) for k in wanted} != wanted:
    raise ValueError(f"{out_dir / META} was written with other settings or another teacher "
                     f"({ {k: meta.get(k) for k in wanted} }); use another folder")
  if meta is None:
    meta = dict(wanted, batches_done=0, bytes=0, sequences=0, teacher_tokens=0,
                generated_tokens=0, teacher_flops=0, seconds=0.0)
  with open(out_dir / CORPUS, "ab") as f:  # Drop whatever a crash left after the last batch.
    f.truncate(meta["bytes"])
  return meta


def _generate_batch(teacher: ModelConfig, params, tokenizer, rows: np.ndarray, key,
                    settings: SeqKDSettings, eos: int) -> tuple[list[str], int]:
  """(JSONL lines of prompt + continuation, generated tokens) of one batch of prompts."""
  import jax.numpy as jnp

  from cbd_jax.model.generate import generate

  n = len(rows)
  if n < settings.batch_size:  # Same shapes every batch (one compile); extra rows dropped.
    rows = np.concatenate([rows, np.repeat(rows[-1:], settings.batch_size - n, 0)])
  tokens, keep = generate(teacher, params, jnp.asarray(rows), jnp.ones(rows.shape, jnp.int32),
                          key, settings.new_tokens, settings.temperature, settings.top_k, eos)
  tokens, keep = np.asarray(tokens)[:n], np.asarray(keep)[:n].astype(bool)
  lines, written = [], 0
  for prompt, row, k in zip(rows[:n], tokens, keep):
    new = [int(t) for t in row[k] if int(t) != eos]
    written += int(k.sum())
    text = tokenizer.decode(list(map(int, prompt)) + new, skip_special_tokens=True)
    lines.append(json.dumps({"text": text}) + "\n")
  return lines, written


def build_corpus(teacher: ModelConfig, teacher_params, tokenizer, paragraphs: list[str],
                 out_dir: str | os.PathLike, settings: SeqKDSettings,
                 teacher_name: str = "", max_batches: int = 0) -> dict:
  """Writes (or finishes) the teacher-generated corpus in ``out_dir``; returns its metadata.

  ``max_batches`` > 0 stops after that many new batches (a later call resumes). A corpus already
  there with other settings or another teacher is refused, never overwritten.
  """
  import jax
  import jax.numpy as jnp

  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  meta = _start_meta(out_dir, {"settings": dataclasses.asdict(settings), "teacher": teacher_name,
                               "teacher_params": num_params(teacher)})
  corpus = out_dir / CORPUS
  num_batches = -(-settings.num_sequences // settings.batch_size)
  if meta["batches_done"] >= num_batches:
    return meta
  prompts = sample_prompts(paragraphs, tokenizer, settings)
  eos = teacher.eos_token_id
  eos = int(eos[0] if isinstance(eos, tuple) else eos) if eos is not None else -1
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.dtype(teacher.dtype)), teacher_params)
  key = jax.random.key(settings.seed)
  last = num_batches if not max_batches else min(num_batches, meta["batches_done"] + max_batches)
  for b in range(meta["batches_done"], last):
    start = time.time()
    rows = prompts[b * settings.batch_size:(b + 1) * settings.batch_size]
    lines, written = _generate_batch(teacher, params, tokenizer, rows,
                                     jax.random.fold_in(key, b), settings, eos)
    with open(corpus, "ab") as f:
      f.write("".join(lines).encode())
      f.flush()
      os.fsync(f.fileno())
    # Compute spent, padding rows and steps after eos included: B * (P + N) teacher positions.
    read = settings.batch_size * (settings.prompt_tokens + settings.new_tokens)
    meta.update(batches_done=b + 1, bytes=corpus.stat().st_size,
                sequences=meta["sequences"] + len(rows),
                teacher_tokens=meta["teacher_tokens"] + read,
                generated_tokens=meta["generated_tokens"] + written,
                teacher_flops=meta["teacher_flops"] + 2 * num_params(teacher) * read,
                seconds=meta["seconds"] + time.time() - start)
    _save_meta(out_dir, meta)
    log.info("seqkd: batch %d/%d, %d sequences, %d generated tokens (%.1f s)", b + 1,
             num_batches, meta["sequences"], meta["generated_tokens"], time.time() - start)
  return meta


def corpus_path(out_dir: str | os.PathLike) -> Path:
  return Path(out_dir) / CORPUS
