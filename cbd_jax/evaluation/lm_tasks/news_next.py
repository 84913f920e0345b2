"""A local multiple-choice task from the fetched news text: which of 4 sentences comes next?

Each document is a news article's opening sentence(s); the choices are the sentence that really
follows and the sentences that follow at the same place in three other articles. A model of
English ranks the true sentence first far more often than 1 in 4. Built offline from
``assets.english_text()["heldout"]`` (news prose), deterministic in ``seed``.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

CHOICES = 4
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def sentences(paragraph: str) -> list[str]:
  """A paragraph split after '.', '!' or '?' followed by a capital or a quote."""
  return [s.strip() for s in _SENTENCE.split(paragraph.strip()) if len(s.strip()) > 20]


def news_next_docs(text_file: str | Path, num_docs: int = 200, seed: int = 0,
                   context_sentences: int = 2) -> list[dict]:
  """Docs {"context", "choices" (4 sentences), "label" (index of the true next sentence)}."""
  lines = Path(text_file).read_text(encoding="utf-8").splitlines()
  articles = [s for s in (sentences(line) for line in lines) if len(s) > context_sentences]
  if len(articles) < CHOICES:
    raise ValueError(f"{text_file}: {len(articles)} articles of more than {context_sentences} "
                     f"sentences; need at least {CHOICES}")
  rng = random.Random(seed)
  docs = []
  for k in rng.sample(range(len(articles)), min(num_docs, len(articles))):
    others = rng.sample([j for j in range(len(articles)) if j != k], CHOICES - 1)
    truth = articles[k][context_sentences]
    choices = [truth] + [articles[j][context_sentences] for j in others]
    rng.shuffle(choices)
    docs.append({"context": " ".join(articles[k][:context_sentences]), "choices": choices,
                 "label": choices.index(truth)})
  return docs


def load(num_docs: int = 200, seed: int = 0, **unused):
  """lm-eval's ``custom_dataset`` hook: the task's documents as a ``{"test": Dataset}``."""
  import datasets

  from cbd_jax.checkpoints import assets

  docs = news_next_docs(assets.english_text()["heldout"], int(num_docs), int(seed))
  return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
