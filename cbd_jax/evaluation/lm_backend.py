"""lm-evaluation-harness backend: the jitted JAX model scores and generates for lm-eval tasks.

Importing this module registers the model ``cbd_jax`` with lm-eval::

  import cbd_jax.evaluation.lm_backend  # noqa: F401
  lm_eval.simple_evaluate(model="cbd_jax", model_args="pretrained=DIR", tasks=["hellaswag"])

or, from the shell, ``python -m cbd_jax.evaluation.lm_backend run --model cbd_jax --model_args
pretrained=DIR --tasks hellaswag`` (lm-eval's own command line, with the model registered).

Scoring follows lm-eval's ``hf`` backend exactly: the same tokenisation, left truncation to the
context length and log-softmax over every row of the output head. Batches are padded to a few
fixed lengths (powers of two) and a fixed number of rows, so each shape compiles once, and are
split over the ``data`` (and ``fsdp``) axes of a mesh of all devices. Every host of a multi-host
job runs every request (SPMD); lm-eval sees one process.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models import utils as lm_model_utils

from cbd_jax.model import decoder, sharding
from cbd_jax.model import generate as generation
from cbd_jax.model.config import ModelConfig

_MIN_LEN = 32          # Shortest padded length; lengths are powers of two above it.
_HEAD_CHUNK = 256      # Positions per output-head chunk: no [B, T, V] logits tensor at once.


def padded_length(n: int, limit: int) -> int:
  """The power of two >= n (at least 32), capped at ``limit`` rounded up to a multiple of 32."""
  cap = -(-max(limit, n) // _MIN_LEN) * _MIN_LEN
  return min(max(_MIN_LEN, 1 << (max(n, 1) - 1).bit_length()), cap)


@functools.partial(jax.jit, static_argnums=0)
def score_tokens(config: ModelConfig, params, ids_BxT, targets_BxT, weights_BxT):
  """(sum_t w_t log q(target_t | ids_<=t) [B], every weighted target is the argmax [B]).

  Right padding needs no mask under causal attention; GPT-2 positions past the table are clipped
  (they only ever hold padding)."""
  B, T = ids_BxT.shape
  positions = jnp.arange(T)
  if config.is_gpt2:
    positions = jnp.minimum(positions, config.max_position_embeddings - 1)
  hidden, _ = decoder.apply_hidden(config, params, ids_BxT,
                                   positions=jnp.broadcast_to(positions, (B, T)))
  chunk = math.gcd(T, _HEAD_CHUNK)

  def one(args):
    hidden_BxCxD, targets_BxC = args
    logits_BxCxV = decoder.logits_from_hidden(config, params, hidden_BxCxD)
    logp = jax.nn.log_softmax(logits_BxCxV, axis=-1)
    picked = jnp.take_along_axis(logp, targets_BxC[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits_BxCxV, axis=-1) == targets_BxC

  split = lambda x: x.reshape(B, T // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731
  logp, greedy = jax.lax.map(one, (split(hidden), split(targets_BxT)))
  logp = logp.swapaxes(0, 1).reshape(B, T)
  greedy = greedy.swapaxes(0, 1).reshape(B, T)
  weights = weights_BxT.astype(jnp.float32)
  return (logp * weights).sum(axis=1), jnp.all(greedy | (weights == 0), axis=1)


def _resolve_batch_size(batch_size) -> int:
  """lm-eval passes ints, digit strings or "auto"; "auto" means 16 rows."""
  if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
    return 16
  if not str(batch_size).isdigit() or int(batch_size) <= 0:
    raise ValueError(f"batch_size={batch_size!r}: pass a positive integer, e.g. batch_size=16")
  return int(batch_size)


@register_model("cbd_jax")
class JaxLM(TemplateLM):
  """An lm-eval model: an HF folder, hub id or .gguf file run by cbd_jax's Flax decoder."""

  def __init__(self, pretrained: str, batch_size=16, max_length: int | None = None,
               dtype: str = "float32", fsdp: int = 1, tensor: int = 1, max_gen_toks: int = 256,
               add_bos_token: bool | None = None, seed: int = 0, tokenizer: str | None = None,
               **harness_args):
    """``dtype``: weights and compute (float32 or bfloat16); ``fsdp``/``tensor``: mesh axes that
    shard the weights (the rest of the devices split the batch)."""
    super().__init__()
    unknown = set(harness_args) - {"device", "max_batch_size"}  # What lm-eval adds on its own.
    if unknown:
      raise ValueError(f"unknown cbd_jax model argument(s) {sorted(unknown)}; use pretrained, "
                       "batch_size, max_length, dtype, fsdp, tensor, max_gen_toks, add_bos_token, "
                       "seed or tokenizer")
    from cbd_jax.checkpoints import hf_io

    config, params = hf_io.load_hf_numpy(pretrained, dtype=jnp.dtype(dtype))
    self.config = config.replace(dtype=jnp.dtype(dtype).name)
    self.mesh = sharding.make_mesh({"data": -1, "fsdp": int(fsdp), "tensor": int(tensor)})
    self.params = jax.device_put(params, sharding.tree_shardings(params, self.mesh))
    self.tokenizer = hf_io.load_tokenizer(tokenizer or pretrained)
    self.pretrained = str(pretrained)
    rows = sharding.data_parallel_size(self.mesh)
    self.rows = -(-_resolve_batch_size(batch_size) // rows) * rows
    self._max_length = int(max_length or config.max_position_embeddings)
    self._max_gen_toks = int(max_gen_toks)
    self.add_bos_token = None if add_bos_token is None else str(add_bos_token) == "True"
    self.rng = jax.random.PRNGKey(int(seed))

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    bos = self.tokenizer.bos_token_id
    return bos if bos is not None else self.tokenizer.eos_token_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def tokenizer_name(self) -> str:
    return self.tokenizer.name_or_path.replace("/", "__")

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    """As lm-eval's hf backend: the tokenizer's default special tokens unless told otherwise,
    and none when the string already starts with the prefix token."""
    kw = {}
    if add_special_tokens is not None:
      kw["add_special_tokens"] = add_special_tokens
    elif self.add_bos_token is not None:
      kw["add_special_tokens"] = self.add_bos_token
    if add_special_tokens is None and string.startswith(
        self.tokenizer.decode(self.prefix_token_id)):
      kw["add_special_tokens"] = False
    return self.tokenizer.encode(string, **kw)

  def _put(self, array: np.ndarray) -> jax.Array:
    """A host batch (the same on every host) as a global array split over the batch axes."""
    spec = sharding.batch_sharding(self.mesh, array.ndim)
    return jax.make_array_from_callback(array.shape, spec, lambda index: array[index])

  def _score_batch(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
    """(logprob, greedy) of rows (tokens, continuation length), padded to a fixed shape."""
    T = padded_length(max(len(t) - 1 for t, _ in rows), self.max_length)
    ids, targets, weights = (np.zeros((self.rows, T), np.int32) for _ in range(3))
    for i, (tokens, cont) in enumerate(rows):
      n = len(tokens) - 1
      ids[i, :n], targets[i, :n] = tokens[:-1], tokens[1:]
      weights[i, n - cont:n] = 1
    logp, greedy = score_tokens(self.config, self.params, self._put(ids), self._put(targets),
                                self._put(weights))
    logp, greedy = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                    for x in (logp, greedy))
    return [(float(logp[i]), bool(greedy[i])) for i in range(len(rows))]

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """Scores (key, context ids, continuation ids) triples, longest first, in fixed batches."""
    rows = []
    for _, context, continuation in requests:
      if not context or not continuation or len(continuation) > self.max_length:
        raise ValueError(f"cannot score a continuation of {len(continuation)} tokens after "
                         f"{len(context)} context tokens (max_length {self.max_length})")
      rows.append(((context + continuation)[-(self.max_length + 1):], len(continuation)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = [None] * len(rows)
    for start in range(0, len(order), self.rows):
      chunk = order[start:start + self.rows]
      for i, answer in zip(chunk, self._score_batch([rows[i] for i in chunk]), strict=True):
        out[i] = answer
        if requests[i][0] is not None:
          self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Whole-document log-likelihoods in disjoint windows of max_length, as lm-eval's hf."""
    windows, owners = [], []
    for k, (string,) in enumerate(req.args for req in requests):
      for context, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)):
        windows.append((None, context, cont))
        owners.append(k)
    totals = [0.0] * len(requests)
    for k, (logp, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
      totals[k] += logp
    for req, total in zip(requests, totals, strict=True):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Continues each context (greedy unless do_sample) until a stop string or max_gen_toks."""
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
    out = [""] * len(requests)
    for indices in groups.values():
      gen_kwargs = requests[indices[0]].args[1]
      contexts = [requests[i].args[0] for i in indices]
      for i, text in zip(indices, self._generate_group(contexts, gen_kwargs), strict=True):
        out[i] = text
        self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out

  def _generate_group(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
    """Generations for contexts that share their generation kwargs, in fixed-shape batches."""
    kwargs = lm_model_utils.normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
    eos = self.tokenizer.decode([self.eot_token_id])
    until = lm_model_utils.handle_stop_sequences(kwargs.pop("until", None), eos=eos)
    new_tokens = int(kwargs.pop("max_gen_toks"))
    temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
    if new_tokens >= self.max_length:
      raise ValueError(f"max_gen_toks {new_tokens} must be below the context length "
                       f"{self.max_length}; ask for fewer new tokens")
    prompts = [self.tok_encode(c)[-(self.max_length - new_tokens):] for c in contexts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [""] * len(prompts)
    for start in range(0, len(order), self.rows):
      chunk = order[start:start + self.rows]
      tokens = self._generate_batch([prompts[i] for i in chunk], new_tokens, temperature,
                                    int(kwargs.get("top_k", 0) or 0))
      for i, row in zip(chunk, tokens, strict=True):
        text = self.tokenizer.decode(row, skip_special_tokens=True)
        out[i] = lm_model_utils.postprocess_generated_text(text, until, None)
    return out

  def _generate_batch(self, prompts: list[list[int]], new_tokens: int, temperature: float,
                      top_k: int) -> list[list[int]]:
    """New token ids of each prompt (left-padded to a fixed shape), up to and with eos."""
    P = padded_length(max(len(p) for p in prompts), self.max_length)
    ids, mask = np.zeros((self.rows, P), np.int32), np.zeros((self.rows, P), np.int32)
    for i in range(self.rows):
      prompt = prompts[i] if i < len(prompts) else [self.eot_token_id]
      ids[i, P - len(prompt):], mask[i, P - len(prompt):] = prompt, 1
    self.rng, key = jax.random.split(self.rng)
    tokens, keep = generation.generate(self.config, self.params, self._put(ids), self._put(mask),
                                       key, new_tokens, temperature, top_k, self.eot_token_id)
    tokens, keep = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                    for x in (tokens, keep))
    return [tokens[i][keep[i]].tolist() for i in range(len(prompts))]


def main() -> None:
  """lm-eval's command line with the ``cbd_jax`` model registered."""
  from lm_eval.__main__ import cli_evaluate

  cli_evaluate()


if __name__ == "__main__":
  main()
