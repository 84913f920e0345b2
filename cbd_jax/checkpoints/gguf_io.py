"""GGUF (llama.cpp) Llama-architecture files -> HF-named fp32 tensors and an HF-style config.

Tensors are dequantised with the `gguf` package (no torch). llama.cpp stores the rows of q and k
permuted for its rotary kernel; `_unpermute` restores the Hugging Face order, after which every
tensor equals what `transformers` loads from the same file.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from cbd_jax.checkpoints.safetensors_io import DAMAGED, CheckpointError

_NAMES = {  # GGUF name (per block "{i}") -> HF name.
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_PATTERNS = [(re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), h)
             for g, h in _NAMES.items()]


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (interleaved -> rotate-half rotary order)."""
  rows, cols = w.shape
  return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


class GGUFTensors(Mapping):
  """A lazy {HF name: fp32 array} view of a GGUF file; each tensor is dequantised on access."""

  def __init__(self, reader, n_head: int, n_kv_head: int, where: str):
    import gguf  # noqa: F401  (imported here so the rest of the package does not need it)

    self._reader, self._n_head, self._n_kv, self._where = reader, n_head, n_kv_head, where
    self._tensors = {}
    for t in reader.tensors:
      for pattern, hf in _PATTERNS:
        m = pattern.match(t.name)
        if m:
          self._tensors[hf.format(i=m.group(1)) if m.groups() else hf] = t
          break
      else:
        raise CheckpointError(f"{where}: GGUF tensor {t.name!r} is not a Llama tensor we handle")

  def __getitem__(self, name: str) -> np.ndarray:
    import gguf

    t = self._tensors[name]
    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    w = w.reshape(tuple(int(s) for s in reversed(t.shape)))
    if name.endswith("q_proj.weight"):
      w = _unpermute(w, self._n_head)
    elif name.endswith("k_proj.weight"):
      w = _unpermute(w, self._n_kv)
    return w

  def __contains__(self, name) -> bool:  # Mapping's default would dequantise the tensor.
    return name in self._tensors

  def __iter__(self) -> Iterator[str]:
    return iter(self._tensors)

  def __len__(self) -> int:
    return len(self._tensors)

  @property
  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(s) for s in reversed(t.shape)) for k, t in self._tensors.items()}


def _field(reader, key: str, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def read_gguf(path: str | Path) -> tuple[dict, GGUFTensors]:
  """Returns (an HF-style config.json dict, lazy HF-named tensors) for a Llama GGUF file."""
  import gguf

  path = Path(path)
  try:
    reader = gguf.GGUFReader(str(path))
  except Exception as e:  # The gguf package raises assorted errors on damaged files.
    raise CheckpointError(f"{path}: not a readable GGUF file ({e}); {DAMAGED}") from None
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
  a = "llama."
  n_head = int(_field(reader, a + "attention.head_count"))
  n_kv = int(_field(reader, a + "attention.head_count_kv", n_head))
  tensors = GGUFTensors(reader, n_head, n_kv, str(path))
  hidden = int(_field(reader, a + "embedding_length"))
  vocab = tensors.shapes["model.embed_tokens.weight"][0]
  config = {
      "model_type": "llama",
      "vocab_size": vocab,
      "hidden_size": hidden,
      "intermediate_size": int(_field(reader, a + "feed_forward_length")),
      "num_hidden_layers": int(_field(reader, a + "block_count")),
      "num_attention_heads": n_head,
      "num_key_value_heads": n_kv,
      "head_dim": int(_field(reader, a + "rope.dimension_count", hidden // n_head)),
      "max_position_embeddings": int(_field(reader, a + "context_length", 2048)),
      "rms_norm_eps": float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)),
      "rope_theta": float(_field(reader, a + "rope.freq_base", 10000.0)),
      "tie_word_embeddings": "lm_head.weight" not in tensors,
      "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
  }
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  if tokens is not None:
    config["real_vocab_size"] = len(tokens.data)
  return config, tensors
