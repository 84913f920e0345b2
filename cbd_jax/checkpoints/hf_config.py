"""Hugging Face ``config.json`` <-> `ModelConfig`, with an allow-list of fields.

Every field of a config.json is either used, known to be inert for a forward pass (ids, dropout,
bookkeeping), or required to hold the one value we implement. Anything else raises: a silently
ignored field would give wrong logits.
"""

from __future__ import annotations

from typing import Any

from cbd_jax.model.config import ModelConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}

# Fields that do not change the function the model computes (or that only training dropout uses:
# distillation here runs without dropout).
_INERT = {
    "architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path", "use_cache",
    "initializer_range", "output_hidden_states", "output_attentions", "return_dict", "id2label",
    "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "pad_token_id",
    "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_type",
    "summary_use_proj", "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
    "task_specific_params", "n_ctx", "tokenizer_class", "max_window_layers", "pretraining_tp",
    "model_type", "bos_token_id", "eos_token_id", "real_vocab_size", "sliding_window",
    "layer_types", "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters",
    "reorder_and_upcast_attn", "head_dim", "use_bfloat16", "tf_legacy_loss", "pruned_heads",
    "torchscript", "keys_to_ignore_at_inference", "generation_config",
}

# Fields we accept only at the value we implement: {field: allowed values}.
_FIXED = {
    "llama": {"hidden_act": ("silu",), "attention_bias": (False,), "mlp_bias": (False,)},
    "qwen2": {"hidden_act": ("silu",), "use_sliding_window": (False,)},
    "qwen3": {"hidden_act": ("silu",), "attention_bias": (False,), "use_sliding_window": (False,)},
    "gpt2": {"activation_function": ("gelu_new", "gelu_pytorch_tanh"),
             "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
             "add_cross_attention": (False,), "n_inner": (None,)},
}

# Fields that become ModelConfig fields: {family: {hf name: our name}}.
_LLAMA_LIKE = {"vocab_size": "vocab_size", "hidden_size": "hidden_size",
               "intermediate_size": "intermediate_size", "num_hidden_layers": "num_layers",
               "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads",
               "max_position_embeddings": "max_position_embeddings", "rms_norm_eps": "norm_eps"}
_FIELDS = {
    "llama": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE,
    "gpt2": {"vocab_size": "vocab_size", "n_embd": "hidden_size", "n_layer": "num_layers",
             "n_head": "num_heads", "n_positions": "max_position_embeddings",
             "layer_norm_epsilon": "norm_eps"},
}
_TIE_DEFAULT = {"llama": False, "qwen2": False, "qwen3": False, "gpt2": True}


class ConfigError(ValueError):
  """A config.json we cannot represent faithfully."""


def _rope(hf: dict[str, Any], where: str) -> tuple[float, tuple | None]:
  """rope_theta and scaling from `rope_parameters` (transformers 5) or the top level (older)."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  merged = {**scaling, **params}
  kind = merged.get("rope_type", merged.get("type", "default"))
  if kind == "default":
    return float(theta), None
  if kind == "llama3":
    return float(theta), ("llama3", float(merged["factor"]), float(merged["low_freq_factor"]),
                          float(merged["high_freq_factor"]),
                          int(merged["original_max_position_embeddings"]))
  raise ConfigError(f"{where}: rope type {kind!r} is not supported (supported: default, llama3); "
                    "use a checkpoint without rope scaling or add the type to model.decoder")


def _check_numbers(hf: dict[str, Any], fields: dict[str, str], where: str) -> None:
  """Shape fields must be positive integers and the norm epsilon a positive number."""
  for theirs, ours in fields.items():
    value = hf.get(theirs)
    if theirs not in hf:
      continue
    if ours == "norm_eps":
      ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    else:
      ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    if not ok:
      kind = "a positive number" if ours == "norm_eps" else "a positive integer"
      raise ConfigError(f"{where}: {theirs}={value!r} must be {kind}; restore the model's own "
                        "config.json")


def from_hf_config(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
  """Builds a ModelConfig from a parsed config.json; raises ConfigError on anything unhandled."""
  if not isinstance(hf, dict):
    raise ConfigError(f"{where}: holds a JSON {type(hf).__name__}, not an object of model fields "
                      "(model_type, hidden_size, ...); restore the model's own config.json")
  family = hf.get("model_type")
  if family not in _FIELDS:
    raise ConfigError(f"{where}: model_type {family!r} is not supported; supported: "
                      f"{sorted(_FIELDS)}")
  fields, fixed = _FIELDS[family], _FIXED[family]
  for key, value in hf.items():
    if key in fields or key in _INERT:
      continue
    if key not in fixed:
      raise ConfigError(f"{where}: field {key!r}={value!r} is not handled for model_type "
                        f"{family!r}; remove it if it is inert, or add support in cbd_jax")
    if value not in fixed[key]:
      raise ConfigError(f"{where}: {key}={value!r} is not supported for {family} "
                        f"(supported: {fixed[key]})")
  for key in hf.get("layer_types") or ():
    if key != "full_attention":
      raise ConfigError(f"{where}: layer type {key!r} is not supported (only full_attention)")
  _check_numbers(hf, fields, where)
  kwargs = {ours: hf[theirs] for theirs, ours in fields.items() if theirs in hf}
  kwargs["family"] = family
  kwargs["tie_embeddings"] = bool(hf.get("tie_word_embeddings", _TIE_DEFAULT[family]))
  if family == "gpt2":
    kwargs["intermediate_size"] = 4 * kwargs["hidden_size"]
    kwargs["num_kv_heads"] = kwargs["num_heads"]
  else:
    kwargs.setdefault("num_kv_heads", kwargs["num_heads"])
    kwargs["rope_theta"], kwargs["rope_scaling"] = _rope(hf, where)
  head_dim = hf.get("head_dim") or kwargs["hidden_size"] // kwargs["num_heads"]
  kwargs["head_dim"] = int(head_dim)
  kwargs["real_vocab_size"] = hf.get("real_vocab_size")
  kwargs["bos_token_id"] = hf.get("bos_token_id")
  eos = hf.get("eos_token_id")
  kwargs["eos_token_id"] = tuple(eos) if isinstance(eos, list) else eos
  try:
    return ModelConfig(**kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{where}: {e}") from None


def to_hf_config(config: ModelConfig, dtype: str) -> dict[str, Any]:
  """The config.json that `transformers` 5 loads for this ModelConfig."""
  c = config
  out: dict[str, Any] = {"architectures": [ARCHITECTURES[c.family]], "model_type": c.family}
  if c.is_gpt2:
    out.update(vocab_size=c.vocab_size, n_embd=c.hidden_size, n_layer=c.num_layers,
               n_head=c.num_heads, n_positions=c.max_position_embeddings, n_inner=None,
               layer_norm_epsilon=c.norm_eps, activation_function="gelu_new",
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if c.intermediate_size != 4 * c.hidden_size or c.head_dim * c.num_heads != c.hidden_size:
      raise ConfigError(f"GPT-2 export needs intermediate_size = 4 * hidden_size and head_dim * "
                        f"num_heads = hidden_size, got {c}")
  else:
    out.update(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
               intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
               num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
               head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings,
               rms_norm_eps=c.norm_eps, hidden_act="silu", attention_dropout=0.0)
    rope: dict[str, Any] = {"rope_theta": c.rope_theta, "rope_type": "default"}
    if c.rope_scaling is not None:
      _, factor, low, high, original = c.rope_scaling
      rope.update(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                  original_max_position_embeddings=original)
    out["rope_parameters"] = rope
    if c.family == "llama":
      out.update(attention_bias=False, mlp_bias=False)
    if c.family == "qwen3":
      out["attention_bias"] = False
    if c.family in ("qwen2", "qwen3"):
      out["use_sliding_window"] = False
  out["tie_word_embeddings"] = c.tie_embeddings
  out["bos_token_id"] = c.bos_token_id
  eos = c.eos_token_id
  out["eos_token_id"] = list(eos) if isinstance(eos, tuple) else eos
  if c.real_vocab_size is not None:
    out["real_vocab_size"] = c.real_vocab_size
  out["dtype"] = dtype
  return out
