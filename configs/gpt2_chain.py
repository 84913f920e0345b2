r"""The paper's chain: GPT-2 XL -> Large -> Medium -> base, every anchor a public checkpoint.

  python launch/train_chain.py --config=configs/gpt2_chain.py
  python launch/train_chain.py --config=configs/gpt2_chain.py:smoke        # tiny, CPU, offline
  python launch/train_chain.py --config=configs/gpt2_chain.py \
      --config.source.path=/models/gpt2-xl --config.chain[0].init=/models/gpt2-large \
      --config.chain[1].init=/models/gpt2-medium --config.chain[2].init=/models/gpt2 \
      --config.data.train='/data/openwebtext/*.parquet' --config.workdir=runs/gpt2

Each link starts from its own public checkpoint (``init``) and is distilled from its predecessor
(the source for the first), as in the paper. The finished anchors are

  gpt2-xl 48 x 1600 (1.56B) > gpt2-large 36 x 1280 (774M) > gpt2-medium 24 x 1024 (355M)
  > gpt2 12 x 768 (124M)         (head_dim 64, vocab 50,257, 1,024 positions, tied head)

so ``init_model.py --chain=runs/gpt2_chain --size=138m`` resolves to 14 x 768 (between gpt2 and
gpt2-medium), 220m to 18 x 896, 380m to 26 x 1024 and 537m to 30 x 1152 (between gpt2-medium
and gpt2-large): the paper's targets.

Data: OpenWebText (the open copy of GPT-2's WebText), hub dataset ``Skylion007/openwebtext``,
streamed. Where the hub is out of reach, or its loader is refused by ``datasets`` (it once was a
script), download the parquet files (the hub's ``refs/convert/parquet`` branch) or any text/jsonl
copy and pass them: ``--config.data.train='/data/openwebtext/*.parquet'
--config.data.streaming=False``. Held-out: WikiText-103 validation, as in qwen_chain.py. Link and
budget fields are those of configs/qwen_chain.py, whose link builder this file uses.
"""

from pathlib import Path

import ml_collections as mlc

VARIANTS = ("", "smoke")

# The published shapes (all GPT-2s: head_dim 64, FFN 4 x width, vocab 50,257, 1,024 positions).
GPT2_SHAPES = {
    "gpt2-xl": dict(num_layers=48, hidden_size=1600, num_heads=25),
    "gpt2-large": dict(num_layers=36, hidden_size=1280, num_heads=20),
    "gpt2-medium": dict(num_layers=24, hidden_size=1024, num_heads=16),
    "gpt2": dict(num_layers=12, hidden_size=768, num_heads=12),
}
HUB = {name: f"openai-community/{name}" for name in GPT2_SHAPES}


def _qwen_chain():
  """configs/qwen_chain.py, loaded by path (configs are files, not a package)."""
  from cbd_jax.cli import load_module

  return load_module(Path(__file__).with_name("qwen_chain.py"))


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """Variants: "" (the paper's GPT-2 chain) or "smoke" (tiny random GPT-2s, CPU, offline)."""
  arg = arg or ""
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of configs/gpt2_chain.py; use '' or 'smoke'")
  base = _qwen_chain()
  c = base.get_config(arg)
  if arg == "smoke":
    _smoke(c, base)
    return c
  c.workdir = "runs/gpt2_chain"
  c.source.path = HUB["gpt2-xl"]
  # GPT-2 trained at 1,024 positions; 16 x 4 x 1,024 = 65,536 tokens a step.
  gpt2 = dict(batch_size=16, per_device_batch_size=0.0, microbatches=4, seq_len=1024,
              warmup_steps=200)
  c.chain = (
      base.link("gpt2-large", init=HUB["gpt2-large"], tokens=500_000_000, lr=3e-5, **gpt2),
      base.link("gpt2-medium", init=HUB["gpt2-medium"], tokens=500_000_000, lr=5e-5, **gpt2),
      base.link("gpt2", init=HUB["gpt2"], tokens=500_000_000, lr=6e-5, **gpt2),
  )
  c.data.update(dict(train="Skylion007/openwebtext", hub_config="", hub_split="train",
                     text_field="text", streaming=True))
  return c


def _smoke(c: mlc.ConfigDict, base) -> None:
  """Tiny random GPT-2s (learned positions, LayerNorm, GELU, tied head) on the fetched English
  text: source 4 x 64 -> 3 x 48 -> 2 x 32 -> 1 x 16, anchors started by Shrink (the public
  checkpoints are not there offline), a few steps each."""
  c.workdir = "runs/gpt2_chain_smoke"
  c.source.path = c.source.path.replace("qwen2-random-source", "gpt2-random-source")
  c.source.random_init = mlc.ConfigDict(dict(
      family="gpt2", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=4, head_dim=16,
      intermediate_size=256, tie_embeddings=True, max_position_embeddings=128,
      tokenizer_vocab=512, seed=0))
  tiny = dict(steps=4, batch_size=8, per_device_batch_size=0.0, microbatches=1, seq_len=64,
              lr=3e-3, warmup_steps=1, dtype="float32", remat=False)
  shape = lambda layers, width: dict(  # noqa: E731
      base.NO_SHAPE, num_layers=layers, hidden_size=width, num_heads=width // 16,
      num_kv_heads=width // 16, intermediate_size=4 * width)
  c.chain = (base.link("gpt2-large", shape=shape(3, 48), **tiny),
             base.link("gpt2-medium", shape=shape(2, 32), **tiny),
             base.link("gpt2", shape=shape(1, 16), **tiny))
  for item in c.chain:
    item.loss.chunk_size = 256
  c.eval.num_batches = 1
