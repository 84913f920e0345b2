r"""A pod-sized Qwen chain: Qwen2.5-7B -> 3B -> 1.5B -> 0.5B, every anchor a public checkpoint.

  python launch/aot_compile.py --config=configs/qwen7b_chain.py --topology=v5p-128   # fits?
  python launch/train_chain.py --config=configs/qwen7b_chain.py                      # on the pod
  python launch/train_chain.py --config=configs/qwen7b_chain.py:smoke                # tiny, CPU

Each link distils a public Qwen2.5 checkpoint (``init``) from its predecessor, so the finished
anchors bracket 0.5B-7B and ``init_model.py --size=5b`` (or any size in that range) finds two
adjacent anchors. Sized for a v5p-128 slice (64 chips, ``fsdp=-1``): one sequence of 2,048
tokens per chip per microbatch (``per_device_batch_size=1``: 64 sequences on that slice).
Everything else (data, evaluation, checkpoints, overrides) is as in ``configs/qwen_chain.py``,
whose link builder this file uses.
"""

from pathlib import Path

import ml_collections as mlc

VARIANTS = ("", "smoke")


def _qwen_chain():
  """configs/qwen_chain.py, loaded by path (configs are files, not a package)."""
  from cbd_jax.cli import load_module

  return load_module(Path(__file__).with_name("qwen_chain.py"))


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """Variants: "" (the 7B chain, for a pod) or "smoke" (tiny random models, CPU, about a minute)."""
  arg = arg or ""
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of configs/qwen7b_chain.py; use '' or 'smoke'")
  base = _qwen_chain()
  c = base.get_config(arg)
  if arg == "smoke":
    c.workdir = "runs/qwen7b_chain_smoke"
    c.chain = (*c.chain, base.link("anchor3", shape=dict(
        base.NO_SHAPE, num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1,
        intermediate_size=48), steps=8, batch_size=8, per_device_batch_size=0.0, microbatches=2,
        seq_len=64, lr=3e-3, warmup_steps=2, dtype="float32", remat=False))
    c.chain[2].loss.chunk_size = 256
    return c
  c.workdir = "runs/qwen7b_chain"
  c.source.path = "Qwen/Qwen2.5-7B"
  pod = dict(per_device_batch_size=1.0, microbatches=2, seq_len=2048, warmup_steps=200)
  c.chain = (
      base.link("qwen2.5-3b", init="Qwen/Qwen2.5-3B", tokens=1_000_000_000, lr=3e-5, **pod),
      base.link("qwen2.5-1.5b", init="Qwen/Qwen2.5-1.5B", tokens=1_000_000_000, lr=5e-5, **pod),
      base.link("qwen2.5-0.5b", init="Qwen/Qwen2.5-0.5B", tokens=1_000_000_000, lr=5e-5, **pod),
  )
  c.mesh = mlc.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.eval.batch_size = 64
  return c
