r"""A heterogeneous link: SmolLM2-135M (Llama, 49,152 tokens) -> a GPT-2 anchor (GPT-2 tokenizer).

  python launch/train_chain.py --config=configs/smollm2_gpt2.py:vocab_bridge
  python launch/train_chain.py --config=configs/smollm2_gpt2.py:seqkd
  python launch/report.py --chain runs/smollm2_gpt2_vocab      # held-out ppl and bits per byte

The student is a GPT-2-architecture model (learned positions, LayerNorm, GELU MLP, biases) with
the real GPT-2 tokenizer (50,257 tokens, fetched by ``checkpoints.assets``), started from random
weights: Shrink cannot cross families. The teacher's knowledge crosses the vocabulary gap either

* ``vocab_bridge``: token-level KD through the vocabulary-projection bridge: teacher
  distributions projected onto the GPT-2 vocabulary (byte-exact token map with a prefix
  fallback) at the positions where both tokenizations end at the same byte; or
* ``seqkd``: sequence-level KD, the paper's bridge: SmolLM2 continues prompts drawn from the
  training text (cached in ``<workdir>/seqkd``) and the student trains on that text with plain
  cross-entropy.

Held-out perplexities of the two tokenizers are not comparable per token; the report's bits per
byte are. ``*_smoke`` variants (``smoke`` = ``vocab_bridge_smoke``) run the same code paths with a
few steps. CPU-sized budgets.
"""

import ml_collections as mlc

VARIANTS = ("vocab_bridge", "seqkd", "vocab_bridge_smoke", "seqkd_smoke", "smoke")

# GPT-2 family, 6 x 384, 6 heads of 64, FFN 1536, tied embeddings: 30.1M parameters.
STUDENT = dict(family="gpt2", num_layers=6, hidden_size=384, num_heads=6, num_kv_heads=6,
               head_dim=64, intermediate_size=1536, max_position_embeddings=1024,
               tie_embeddings=True, norm_eps=1e-5, vocab_multiple=64, seed=0)
NO_SHAPE = dict(num_layers=0, hidden_size=0, num_heads=0, num_kv_heads=0, intermediate_size=0)


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """Variants: "vocab_bridge" / "seqkd" (CPU-sized), their "_smoke" versions (seconds), and
  "smoke" (= "vocab_bridge_smoke")."""
  from cbd_jax.checkpoints import assets

  arg = arg or "vocab_bridge"
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of configs/smollm2_gpt2.py; use one of {VARIANTS}")
  arg = "vocab_bridge_smoke" if arg == "smoke" else arg
  bridge, smoke = arg.removesuffix("_smoke"), arg.endswith("_smoke")
  vocab, merges = assets.gpt2_tokenizer_files()
  c = mlc.ConfigDict()
  c.workdir = f"runs/smollm2_gpt2_{'vocab' if bridge == 'vocab_bridge' else 'seqkd'}"
  c.source = mlc.ConfigDict(dict(path=str(assets.smollm2_gguf()), tokenizer="",
                                 random_init=None))
  link = mlc.ConfigDict(dict(
      name="gpt2-30m",
      init="",                              # Or a GPT-2 checkpoint folder / hub id.
      shape=dict(NO_SHAPE),                 # Unused: a bridged student is not Shrink-started.
      shrink="leading",
      student=dict(STUDENT),                # Random-initialised student architecture.
      tokenizer=f"{vocab},{merges}",        # The student's tokenizer (GPT-2 BPE).
      bridge="vocab" if bridge == "vocab_bridge" else "seqkd",
      teacher_len=192,                      # Teacher tokens per window (vocab bridge).
      max_windows=0,                        # Training windows to align (0 = all the text).
      seqkd=dict(num_sequences=192, prompt_tokens=32, new_tokens=64, batch_size=32,
                 temperature=1.0, top_k=50, seed=0),
      steps=0, tokens=16_384,
      loss=dict(kind="fkl", temperature=1.0, kd_weight=1.0, ce_weight=0.0, chunk_size=2048),
      optimizer=dict(lr=2e-3, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1,
                     weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0),
      batch_size=8, microbatches=1, seq_len=128,
      per_device_batch_size=0.0,            # > 0: sequences per device, not batch_size.
      dtype="float32", teacher_dtype="", remat=False,
  ))
  c.chain = (link,)
  c.data = mlc.ConfigDict(assets.english_text_data())
  c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = ()
  c.checkpoint = mlc.ConfigDict(dict(every=8, keep=1))
  c.eval = mlc.ConfigDict(dict(every=0, batch_size=8, num_batches=4))
  c.log = mlc.ConfigDict(dict(every=2, progress=False, tensorboard=False))
  c.export_dtype = "float32"
  c.stop_after = 0                # Steps per invocation (0 = to the end).
  c.allow_changes = False         # Resume a started link with a changed config (recorded).
  c.report = mlc.ConfigDict(dict(eval_tokens=4096, seq_len=128))
  if smoke:
    c.workdir += "_smoke"
    link.update(dict(tokens=0, steps=2, batch_size=8, seq_len=32, teacher_len=48,
                     max_windows=16))
    link.student.update(dict(num_layers=1, hidden_size=64, num_heads=1, num_kv_heads=1,
                             intermediate_size=256, max_position_embeddings=64))
    link.seqkd.update(dict(num_sequences=4, prompt_tokens=8, new_tokens=8, batch_size=4))
    c.checkpoint.every = 1
    c.eval.update(dict(batch_size=8, num_batches=1))
    c.log.every = 1
    c.report.update(dict(eval_tokens=256, seq_len=32))
  return c
