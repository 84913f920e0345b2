"""`ModelConfig`: one decoder description that covers Llama, Qwen2, Qwen3 and GPT-2."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

FAMILIES = ("llama", "qwen2", "qwen3", "gpt2")
DTYPES = ("float32", "bfloat16", "float16")  # Compute and storage dtypes of weights.


def check_dtype(name: Any, what: str = "dtype") -> str:
  """The canonical name of a supported float dtype; anything else is a one-line ValueError."""
  text = getattr(name, "name", None) or getattr(name, "__name__", None) or str(name)
  if text not in DTYPES:
    raise ValueError(f"{what}={name!r} is not a valid dtype; use one of the valid dtypes: "
                     f"{', '.join(DTYPES)}")
  return text


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a decoder-only LM.

  ``vocab_size`` is the number of embedding rows (possibly padded, as in Qwen2.5);
  ``real_vocab_size`` is the tokenizer's size, so losses can mask the padded rows.
  """

  family: str = "llama"
  vocab_size: int = 256
  hidden_size: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 16
  intermediate_size: int = 128
  max_position_embeddings: int = 2048
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
  rope_scaling: tuple[Any, ...] | None = None
  tie_embeddings: bool = False
  real_vocab_size: int | None = None
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  dtype: str = "float32"  # Compute dtype; params are kept in whatever dtype they arrive in.
  remat: bool = False

  def __post_init__(self):
    check_dtype(self.dtype, "ModelConfig.dtype")
    if self.family not in FAMILIES:
      raise ValueError(f"unsupported model family {self.family!r}; supported: {FAMILIES}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.real_vocab_size is not None and self.real_vocab_size > self.vocab_size:
      raise ValueError(f"real_vocab_size={self.real_vocab_size} exceeds "
                       f"vocab_size={self.vocab_size} embedding rows")

  # Family traits, derived rather than stored so a config cannot contradict its family.
  @property
  def is_gpt2(self) -> bool:
    return self.family == "gpt2"

  @property
  def qkv_bias(self) -> bool:
    return self.family in ("qwen2", "gpt2")

  @property
  def out_bias(self) -> bool:
    return self.is_gpt2

  @property
  def qk_norm(self) -> bool:
    return self.family == "qwen3"

  @property
  def gated_mlp(self) -> bool:
    return not self.is_gpt2

  @property
  def vocab_limit(self) -> int:
    """Rows of the output head that are real tokens."""
    return self.real_vocab_size or self.vocab_size

  def replace(self, **kwargs) -> ModelConfig:
    return dataclasses.replace(self, **kwargs)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    d = dict(d)
    for key in ("rope_scaling", "eos_token_id"):
      if isinstance(d.get(key), list):
        d[key] = tuple(d[key])
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
    return cls(**d)


def export_refusal(config: ModelConfig) -> str | None:
  """Why ``transformers`` would refuse to build this config, or None. Llama's config demands a
  hidden size that is a multiple of the heads even when head_dim is given (Qwen2 and Qwen3 do
  not; GPT-2 derives head_dim from it)."""
  if config.family == "llama" and config.hidden_size % config.num_heads:
    return (f"hidden_size {config.hidden_size} is not a multiple of num_heads "
            f"{config.num_heads}, which transformers' LlamaConfig refuses")
  return None


def num_params(config: ModelConfig) -> int:
  """Parameter count (embeddings included once when tied), computed from the shape alone."""
  d, f, L = config.hidden_size, config.intermediate_size, config.num_layers
  q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  attn = d * (q + 2 * kv) + q * d
  if config.qkv_bias:
    attn += q + 2 * kv
  if config.out_bias:
    attn += d
  if config.qk_norm:
    attn += 2 * config.head_dim
  mlp = (3 if config.gated_mlp else 2) * d * f + ((f + d) if config.is_gpt2 else 0)
  norms_per = (2 if config.is_gpt2 else 1) * d
  layer = attn + mlp + 2 * norms_per
  total = L * layer + norms_per + config.vocab_size * d
  if not config.tie_embeddings:
    total += config.vocab_size * d
  if config.is_gpt2:
    total += config.max_position_embeddings * d
  return total


def host_value(x) -> np.ndarray | None:
  """``x`` as a host array; None when absent, traced under jit, or not all on this host."""
  if x is None:
    return None
  import jax

  if isinstance(x, jax.core.Tracer) or (isinstance(x, jax.Array) and not x.is_fully_addressable):
    return None
  return np.asarray(x)


def check_ids(config: ModelConfig, ids, positions=None, new_tokens: int = 0,
              vocab: int | None = None) -> None:
  """Host-side input check: a one-line ValueError for a token id outside [0, vocab) (default
  vocab_size; `vocab_limit` where ids are also next-token targets), or a GPT-2 sequence (plus
  ``new_tokens`` to generate) past its learned positions. Traced ids pass."""
  ids = host_value(ids)
  if ids is None:
    return
  vocab = config.vocab_size if vocab is None else vocab
  if ids.size and (ids.min() < 0 or ids.max() >= vocab):
    where = tuple(int(i) for i in np.argwhere((ids < 0) | (ids >= vocab))[0])
    raise ValueError(f"token id {int(ids[where])} at index {list(where)} is outside the model's "
                     f"vocabulary [0, {vocab}); encode the text with this model's "
                     "own tokenizer (one whose size is at most the vocabulary)")
  if not config.is_gpt2:
    return
  pos = host_value(positions)
  length = (ids.shape[-1] if pos is None or not pos.size else int(pos.max()) + 1) + new_tokens
  if length > config.max_position_embeddings:
    extra = f" ({new_tokens} of them to generate)" if new_tokens else ""
    raise ValueError(f"a sequence of {length} tokens{extra} is longer than this GPT-2 model's "
                     f"{config.max_position_embeddings} learned positions "
                     f"(max_position_embeddings); cut it to at most "
                     f"{config.max_position_embeddings} tokens")
