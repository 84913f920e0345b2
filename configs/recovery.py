r"""Recovery training of one model (an ``init_model`` target or any supported checkpoint).

  python launch/train_target.py --config=configs/recovery.py \
      --config.model=runs/smollm2_chain/targets/50m
  python launch/train_target.py --config=configs/recovery.py \
      --config.model=runs/smollm2_chain/targets/50m \
      --config.teacher=runs/smollm2_chain/anchors/smollm2-80m --config.loss.kd_weight=1.0
  python launch/train_target.py --config=configs/recovery.py:smoke    # tiny, about a minute

Plain LM loss by default (no teacher); name a teacher with the same tokenizer (typically the
nearest larger anchor) and set ``loss.kd_weight`` for KD, or both weights for a mix. Budget:
``tokens`` when > 0, else ``steps``. Re-running the same command resumes from the last checkpoint.
The ``smoke`` variant trains a tiny random Qwen2 model (built on first use, with a BPE tokenizer
of the training text) for a few steps.
"""

import ml_collections as mlc

VARIANTS = ("", "smoke")


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """Variants: "" (recovery of ``--config.model``, CPU-sized) or "smoke" (a tiny random model)."""
  from cbd_jax.checkpoints import assets

  arg = arg or ""
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of configs/recovery.py; use one of {VARIANTS}")
  c = mlc.ConfigDict()
  c.name = "recovery"
  c.model = ""                    # HF folder, hub id or .gguf file to train (required).
  c.teacher = ""                  # Optional teacher (same tokenizer); "" = plain LM loss.
  c.random_init = None            # Smoke runs: build a random model at `model` when missing.
  c.workdir = "runs/recovery"     # Checkpoints, metrics, recovery.json.
  c.out = ""                      # Export folder ("" = <workdir>/model).
  c.overwrite = False             # Replace an existing non-empty `out` not written by this run.
  c.steps, c.tokens = 0, 262_144  # Budget: tokens when > 0, else steps.
  c.loss = mlc.ConfigDict(dict(kind="fkl", temperature=1.0, kd_weight=0.0, ce_weight=1.0,
                               chunk_size=2048))
  c.optimizer = mlc.ConfigDict(dict(lr=3e-4, warmup_steps=10, schedule="cosine",
                                    min_lr_ratio=0.1, weight_decay=0.01, b1=0.9, b2=0.95,
                                    eps=1e-8, grad_clip=1.0))
  c.batch_size, c.microbatches, c.seq_len = 8, 1, 128
  c.per_device_batch_size = 0.0   # > 0: sequences per device per microbatch, instead of batch_size.
  c.dtype, c.teacher_dtype, c.remat = "float32", "", False
  c.data = mlc.ConfigDict(assets.english_text_data())
  c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = ()
  c.checkpoint = mlc.ConfigDict(dict(every=50, keep=2))
  c.eval = mlc.ConfigDict(dict(every=100, batch_size=8, num_batches=4))
  c.log = mlc.ConfigDict(dict(every=10, progress=True, tensorboard=False))
  c.export_dtype = "float32"
  c.stop_after = 0                # Steps per invocation (0 = to the end).
  c.allow_changes = False         # Resume a started link with a changed config (recorded).
  if arg == "smoke":
    c.workdir = "runs/recovery_smoke"
    c.model = str(assets.cache_dir() / "smoke" / "recovery-random-model")
    c.random_init = mlc.ConfigDict(dict(
        family="qwen2", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, tie_embeddings=True, max_position_embeddings=512,
        tokenizer_vocab=512, seed=0))
    c.steps, c.tokens = 24, 0
    c.batch_size, c.seq_len = 8, 64
    c.optimizer.update(dict(lr=3e-3, warmup_steps=2, weight_decay=0.0))
    c.loss.chunk_size = 256
    c.checkpoint.every = 8
    c.eval.update(dict(every=12, num_batches=2))
    c.log.update(dict(every=4, progress=False))
  return c
