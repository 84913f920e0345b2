r"""A Qwen chain: Qwen2.5-1.5B -> Qwen2.5-0.5B -> ~250M -> ~100M (every link distilled).

  python launch/train_chain.py --config=configs/qwen_chain.py
  python launch/train_chain.py --config=configs/qwen_chain.py:smoke        # tiny, CPU, ~1 min
  python launch/train_chain.py --config=configs/qwen_chain.py \
      --config.source.path=/models/Qwen2.5-1.5B --config.chain[0].init=/models/Qwen2.5-0.5B \
      --config.chain[1].steps=2000 --config.data.train='/data/*.jsonl' --config.workdir=runs/q

Every field can be overridden from the command line; links are addressed by index
(``--config.chain[2].loss.kind=rkl``). A link's student starts from ``init`` (a public
checkpoint: hub id or folder) when set, else from Shrink of its teacher to ``shape``. Its budget
is ``tokens`` (when > 0) or ``steps``; one step is batch_size * microbatches * seq_len tokens.
Its batch is per device (``per_device_batch_size``: 4 sequences of 2,048 tokens per device per
microbatch, so one GPU and a v5e-256 pod run the file as written) or global (``batch_size``).
The finished anchors bracket 100M-1.5B, so ``init_model.py --size=138m`` (or any size in that
range) finds two adjacent anchors.
"""

import ml_collections as mlc

VARIANTS = ("", "smoke")

# Qwen2.5-0.5B: 24 x 896, 14 heads / 2 kv heads of 64, FFN 4864, tied embeddings (151,936 rows).
ANCHOR_250M = dict(num_layers=20, hidden_size=640, num_heads=10, num_kv_heads=2,
                   intermediate_size=3456)  # 249.7M parameters.
ANCHOR_100M = dict(num_layers=16, hidden_size=384, num_heads=6, num_kv_heads=2,
                   intermediate_size=2048)  # 102.4M parameters.
NO_SHAPE = dict(num_layers=0, hidden_size=0, num_heads=0, num_kv_heads=0, intermediate_size=0)


def optimizer(lr: float, warmup_steps: int) -> mlc.ConfigDict:
  return mlc.ConfigDict(dict(lr=lr, warmup_steps=warmup_steps, schedule="cosine",
                             min_lr_ratio=0.1, weight_decay=0.01, b1=0.9, b2=0.95, eps=1e-8,
                             grad_clip=1.0))


def link(name: str, init: str = "", shape: dict | None = None, steps: int = 0,
         tokens: int = 0, lr: float = 3e-4, warmup_steps: int = 200, batch_size: int = 0,
         per_device_batch_size: float = 4.0, microbatches: int = 4, seq_len: int = 2048,
         dtype: str = "bfloat16", remat: bool = True) -> mlc.ConfigDict:
  """One link of the chain: its anchor, budget, loss, bridge, optimiser, batch and numerics."""
  return mlc.ConfigDict(dict(
      name=name,
      init=init,                       # Public checkpoint (hub id / folder); "" = Shrink.
      shape=dict(shape or NO_SHAPE),   # Student shape when started by Shrink (0 = keep).
      # Shrink of the teacher (interpolation.prune): units ranked by their activations on
      # calib_tokens of the link's training text, layers dropped by re-measured block influence,
      # norms rescaled for what was cut (shrink_refit: see configs/default.py).
      shrink="activation", shrink_layers="greedy", shrink_rescale=True, shrink_refit=False,
      calib_tokens=8192,
      steps=steps, tokens=tokens,      # Budget: tokens when > 0, else steps.
      loss=dict(kind="fkl", temperature=1.0, kd_weight=1.0, ce_weight=0.0, chunk_size=4096),
      bridge="none",                   # Same tokenizer all along the chain.
      optimizer=optimizer(lr, warmup_steps),
      batch_size=batch_size,           # Sequences per microbatch (global, all hosts), or
      per_device_batch_size=per_device_batch_size,  # per device (0 = batch_size is given).
      microbatches=microbatches,       # Gradient accumulation.
      seq_len=seq_len,
      dtype=dtype, teacher_dtype="",   # Compute dtypes ("" = same as the student's).
      remat=remat,
      # Teacher cache: k > 0 runs the teacher once over the budget and trains from its stored
      # top-k log-probs (dir "" = <workdir>/teacher_cache/<name>); see distill/teacher_cache.py.
      teacher_cache=dict(k=0, dir="", dtype="float32"),
  ))


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """Variants: "" (the real chain) or "smoke" (tiny random models, CPU, about a minute)."""
  arg = arg or ""
  if arg not in ("", "smoke"):
    raise ValueError(f"unknown variant {arg!r} of configs/qwen_chain.py; use '' or 'smoke'")
  c = mlc.ConfigDict()
  c.workdir = "runs/qwen_chain"
  c.source = mlc.ConfigDict(dict(path="Qwen/Qwen2.5-1.5B", tokenizer="", random_init=None))
  c.chain = (
      link("qwen2.5-0.5b", init="Qwen/Qwen2.5-0.5B", tokens=200_000_000, lr=5e-5),
      link("qwen-250m", shape=ANCHOR_250M, tokens=500_000_000),
      link("qwen-100m", shape=ANCHOR_100M, tokens=500_000_000, lr=6e-4),
  )
  c.data = mlc.ConfigDict(dict(
      train="HuggingFaceFW/fineweb-edu", hub_config="sample-10BT", hub_split="train",
      text_field="text", streaming=True, shuffle_buffer=10_000, seed=0,
      heldout="Salesforce/wikitext", heldout_config="wikitext-103-raw-v1",
      heldout_split="validation", heldout_fraction=0.01, cache_dir=""))
  c.mesh = mlc.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.sharding_rules = ()  # [(regex, (axis, ...)), ...] to override model.sharding's defaults.
  c.checkpoint = mlc.ConfigDict(dict(every=500, keep=2))
  c.eval = mlc.ConfigDict(dict(every=500, batch_size=16, num_batches=8))
  c.log = mlc.ConfigDict(dict(every=10, progress=True, tensorboard=True))
  c.export_dtype = "bfloat16"     # dtype of the exported anchors ("" = fp32 master weights).
  c.stop_after = 0                # Steps per invocation (0 = to the end), for time-limited jobs.
  c.allow_changes = False         # Resume a started link with a changed config (recorded).
  if arg == "smoke":
    _smoke(c)
  return c


def _smoke(c: mlc.ConfigDict) -> None:
  """Tiny Qwen2 models on the fetched English text: the same code paths in about a minute."""
  from cbd_jax.checkpoints import assets

  text = assets.english_text()
  c.workdir = "runs/qwen_chain_smoke"
  c.source.path = str(assets.cache_dir() / "smoke" / "qwen2-random-source")
  c.source.random_init = mlc.ConfigDict(dict(
      family="qwen2", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
      intermediate_size=128, tie_embeddings=True, max_position_embeddings=512,
      tokenizer_vocab=512, seed=0))
  tiny = dict(batch_size=8, per_device_batch_size=0.0, microbatches=2, seq_len=64, lr=3e-3,
              warmup_steps=2, dtype="float32", remat=False)
  c.chain = (
      link("anchor1", shape=dict(NO_SHAPE, num_layers=3, hidden_size=48, intermediate_size=96),
           steps=8, **tiny),
      link("anchor2", shape=dict(NO_SHAPE, num_layers=2, hidden_size=32, num_heads=2,
                                 num_kv_heads=1, intermediate_size=64), steps=8, **tiny),
  )
  for item in c.chain:
    item.loss.chunk_size = 256
  c.chain[1].loss.ce_weight = 0.1  # Exercises the KD + CE mix.
  c.data.update(dict(train=str(text["train"]), heldout=str(text["heldout"]), streaming=False,
                     hub_config="", heldout_config=""))
  c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.checkpoint = mlc.ConfigDict(dict(every=4, keep=2))
  c.eval = mlc.ConfigDict(dict(every=4, batch_size=8, num_batches=2))
  c.log = mlc.ConfigDict(dict(every=2, progress=True, tensorboard=False))
  c.export_dtype = "float32"
