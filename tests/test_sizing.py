"""Size resolution: sizes parse, land on the anchors' line within 3%, out-of-range sizes fail."""

import math

import jax
import numpy as np
import pytest

from cbd_jax.interpolation import sizing
from cbd_jax.model import decoder
from cbd_jax.model.config import ModelConfig, num_params

GPT2_SMALL = ModelConfig(family="gpt2", vocab_size=50257, hidden_size=768, num_layers=12,
                         num_heads=12, num_kv_heads=12, head_dim=64, intermediate_size=3072,
                         max_position_embeddings=1024, tie_embeddings=True)
GPT2_MEDIUM = GPT2_SMALL.replace(hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=16,
                                 intermediate_size=4096)
SMOL = ModelConfig(family="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                   num_kv_heads=3, head_dim=64, intermediate_size=1536, tie_embeddings=True)
SMOL_SMALL = SMOL.replace(hidden_size=384, num_layers=16, num_heads=6, num_kv_heads=2,
                          intermediate_size=1024)


def _allocated_count(config):
  """Parameter count of the model's own init, from shapes only (jax.eval_shape: no allocation)."""
  shapes = jax.eval_shape(lambda: decoder.init_params(config, jax.random.PRNGKey(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("text,count", [("138m", 138_000_000), ("220M", 220_000_000),
                                        ("1.2b", 1_200_000_000), ("500k", 500_000),
                                        ("138000000", 138_000_000), (" 0.5B ", 500_000_000),
                                        (42_000, 42_000)])
def test_parse_size(text, count):
  assert sizing.parse_size(text) == count


@pytest.mark.parametrize("bad", ["", "m", "12x", "-3m", "0", "1.2.3b", "ten"])
def test_parse_size_rejects_with_an_example(bad):
  with pytest.raises(ValueError, match="e.g. 138m"):
    sizing.parse_size(bad)


def test_gpt2_anchor_counts_are_gpt2s():
  assert _allocated_count(GPT2_SMALL) == num_params(GPT2_SMALL) == 124_439_808
  assert _allocated_count(GPT2_MEDIUM) == num_params(GPT2_MEDIUM) == 354_823_168


@pytest.mark.parametrize("size,shape", [("138m", (14, 768)), ("220m", (18, 896))])
def test_paper_sizes_between_gpt2_small_and_medium(size, shape):
  target = sizing.resolve_size(size, GPT2_SMALL, GPT2_MEDIUM)
  count = _allocated_count(target)
  assert count == num_params(target)
  assert abs(count - sizing.parse_size(size)) <= 0.03 * sizing.parse_size(size)
  assert (target.num_layers, target.hidden_size) == shape  # The paper's inferred shapes.
  assert target.num_heads * target.head_dim == target.hidden_size and target.head_dim == 64
  assert target.intermediate_size == 4 * target.hidden_size  # GPT-2's FFN ratio is kept.
  assert sizing.resolve_size(size, GPT2_MEDIUM, GPT2_SMALL) == target  # Either order.


@pytest.mark.parametrize("size", ["130m", "150m", "180m", "260m", "300m", "340m"])
def test_sizes_sit_near_the_line_within_tolerance(size):
  target = sizing.resolve_size(size, GPT2_SMALL, GPT2_MEDIUM)
  want = sizing.parse_size(size)
  assert abs(num_params(target) - want) <= 0.03 * want
  assert 12 <= target.num_layers <= 24 and 768 <= target.hidden_size <= 1024
  assert target.hidden_size % 64 == 0 and target.intermediate_size % 128 == 0
  _, _, distance = sizing.shape_at(GPT2_SMALL, GPT2_MEDIUM, target.num_layers,
                                   target.hidden_size)
  assert distance <= 0.2


def test_anchor_sizes_return_the_anchor_shapes():
  assert sizing.resolve_size(num_params(GPT2_SMALL), GPT2_SMALL, GPT2_MEDIUM) == GPT2_SMALL
  assert sizing.resolve_size("354.8m", GPT2_SMALL, GPT2_MEDIUM) == GPT2_MEDIUM


@pytest.mark.parametrize("size", ["60m", "100m", "120m"])
def test_gqa_anchors_keep_their_group_size(size):
  target = sizing.resolve_size(size, SMOL_SMALL, SMOL)
  assert target.num_heads // target.num_kv_heads == 3
  assert target.num_heads % target.num_kv_heads == 0
  assert abs(num_params(target) - sizing.parse_size(size)) <= 0.03 * sizing.parse_size(size)


def test_kv_heads_always_divide_heads():
  for size in np.linspace(45e6, 134e6, 12).astype(int):
    target = sizing.resolve_size(int(size), SMOL_SMALL, SMOL)
    assert target.num_heads % target.num_kv_heads == 0


@pytest.mark.parametrize("size", ["100m", "400m", "1.2b"])
def test_out_of_range_sizes_name_the_valid_range(size):
  with pytest.raises(ValueError, match=r"outside the anchors' range \[124.4M, 354.8M\]"):
    sizing.resolve_size(size, GPT2_SMALL, GPT2_MEDIUM)


def test_anchors_of_different_families_are_refused():
  with pytest.raises(ValueError, match="families differ"):
    sizing.resolve_size("100m", SMOL_SMALL, GPT2_SMALL)


def test_describe_prints_shape_and_count():
  line = sizing.describe(sizing.resolve_size("138m", GPT2_SMALL, GPT2_MEDIUM))
  assert line == ("14 layers x 768 (12 heads, 12 kv heads of 64, ffn 3072), 138.6M params "
                  "(138,615,552)")


def _gpt2(layers: int, width: int) -> ModelConfig:
  """A GPT-2 config from its published shape: vocab 50257, 1024 positions, tied, head_dim 64."""
  return GPT2_SMALL.replace(num_layers=layers, hidden_size=width, num_heads=width // 64,
                            num_kv_heads=width // 64, intermediate_size=4 * width)


GPT2_CHAIN = {"gpt2": _gpt2(12, 768), "gpt2-medium": _gpt2(24, 1024),
              "gpt2-large": _gpt2(36, 1280), "gpt2-xl": _gpt2(48, 1600)}


def test_published_gpt2_counts():
  counts = {name: num_params(c) for name, c in GPT2_CHAIN.items()}
  assert counts == {"gpt2": 124_439_808, "gpt2-medium": 354_823_168,
                    "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


@pytest.mark.parametrize("size,pair,shape", [
    ("138m", ("gpt2", "gpt2-medium"), (14, 768)), ("220m", ("gpt2", "gpt2-medium"), (18, 896)),
    ("380m", ("gpt2-medium", "gpt2-large"), (26, 1024)),
    ("537m", ("gpt2-medium", "gpt2-large"), (30, 1152))])
def test_paper_targets_resolve_between_adjacent_gpt2_anchors(size, pair, shape):
  counts = sorted(num_params(c) for c in GPT2_CHAIN.values())
  want = sizing.parse_size(size)
  small, large = (GPT2_CHAIN[name] for name in pair)
  # The pair is the adjacent one that brackets the size, as init_model picks it.
  assert [num_params(small), num_params(large)] in [counts[i:i + 2] for i in range(3)]
  assert num_params(small) < want < num_params(large)
  target = sizing.resolve_size(size, small, large)
  assert (target.num_layers, target.hidden_size) == shape
  assert target.head_dim == 64 and target.num_heads == target.num_kv_heads == shape[1] // 64
  assert target.intermediate_size == 4 * shape[1]
  assert abs(_allocated_count(target) - want) <= 0.03 * want


def test_sizes_between_anchors_with_narrow_attention_are_shapes_transformers_builds():
  """The default chain's anchors (22 x 576 with 6 heads of 64, 16 x 384 with 3): their attention
  is narrower than their residual stream, so heads are searched apart from width; every resolved
  size must be a config transformers' own LlamaConfig accepts, within 3%, heads between theirs."""
  import transformers

  large = SMOL.replace(num_layers=22, num_heads=6, num_kv_heads=2, intermediate_size=1024)
  small = SMOL.replace(num_layers=16, hidden_size=384, num_heads=3, num_kv_heads=1,
                       intermediate_size=640)
  lo, hi = num_params(small), num_params(large)
  for want in np.linspace(lo, hi, 9)[1:-1].astype(int):
    c = sizing.resolve_size(int(want), small, large)
    assert abs(num_params(c) - want) <= 0.03 * want
    assert small.num_heads <= c.num_heads <= large.num_heads
    transformers.LlamaConfig(hidden_size=c.hidden_size, num_attention_heads=c.num_heads,
                             num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
                             intermediate_size=c.intermediate_size, vocab_size=c.vocab_size)


@pytest.mark.parametrize("size", ["40m", "50m", "60m", "70m"])
def test_a_large_width_shape_keeps_the_large_anchors_width_and_attention(size):
  """Between SmolLM2-135M and a 16 x 384 anchor: the large anchor's width, heads and kv heads,
  fewer layers and FFN neurons (FFN in multiples of 128), within 3% of the count, and no other
  such shape cuts depth and FFN in closer proportion."""
  target = sizing.large_width_shape(size, SMOL_SMALL, SMOL)
  want = sizing.parse_size(size)
  assert abs(num_params(target) - want) <= 0.03 * want
  assert (target.hidden_size, target.num_heads, target.num_kv_heads, target.head_dim) == (
      576, 9, 3, 64)
  assert target.num_layers < 30 and target.intermediate_size <= 1536
  assert target.intermediate_size % 128 == 0
  gap = abs(target.num_layers / 30 - target.intermediate_size / 1536)
  for layers in range(1, 31):
    for ffn in range(128, 1537, 128):
      other = SMOL.replace(num_layers=layers, intermediate_size=ffn)
      if abs(num_params(other) - want) <= 0.03 * want:
        assert abs(layers / 30 - ffn / 1536) >= gap - 0.03, (layers, ffn)


def test_target_shapes_offer_the_line_and_the_large_width():
  line = sizing.resolve_size("60m", SMOL_SMALL, SMOL)
  wide = sizing.large_width_shape("60m", SMOL_SMALL, SMOL)
  assert sizing.target_shapes("60m", SMOL_SMALL, SMOL) == [line, wide]
  assert sizing.target_shapes("60m", SMOL, SMOL_SMALL, "line") == [line]
  assert sizing.target_shapes("60m", SMOL_SMALL, SMOL, "large_width") == [wide]
  assert sizing.large_width_shape(num_params(SMOL), SMOL_SMALL, SMOL) != SMOL  # Not the anchor.
  assert sizing.large_width_shape("20m", SMOL_SMALL, SMOL) is None  # Below one layer of 576.
  with pytest.raises(ValueError, match="unknown shape 'wide'; use one of"):
    sizing.target_shapes("60m", SMOL_SMALL, SMOL, "wide")


DEFAULT_LARGE = SMOL.replace(num_layers=22, num_heads=6, num_kv_heads=2, intermediate_size=1024)
DEFAULT_SMALL = SMOL.replace(num_layers=16, hidden_size=384, num_heads=3, num_kv_heads=1,
                             intermediate_size=640)


@pytest.mark.parametrize("size", ["40m", "46m", "50m"])
def test_a_large_attention_shape_keeps_the_large_anchors_heads_on_the_narrowest_stream(size):
  """The default chain's anchors (attention narrower than the stream): the large anchor's heads
  and kv heads, depth and FFN between the anchors', within 3%, a config transformers' own
  LlamaConfig accepts, and no narrower stream that holds those heads reaches the count."""
  import transformers

  target = sizing.large_attention_shape(size, DEFAULT_SMALL, DEFAULT_LARGE)
  want = sizing.parse_size(size)
  assert abs(num_params(target) - want) <= 0.03 * want
  assert (target.num_heads, target.num_kv_heads, target.head_dim) == (6, 2, 64)
  assert 384 <= target.hidden_size < 576 and 16 <= target.num_layers <= 22
  assert 640 <= target.intermediate_size <= 1024 and target.intermediate_size % 128 == 0
  transformers.LlamaConfig(hidden_size=target.hidden_size, num_attention_heads=6,
                           num_key_value_heads=2, head_dim=64,
                           intermediate_size=target.intermediate_size, vocab_size=49152)
  for width in range(384, target.hidden_size, 64):
    if width % 6:
      continue
    for layers in range(16, 23):
      for ffn in range(640, 1025, 128):
        other = target.replace(hidden_size=width, num_layers=layers, intermediate_size=ffn)
        assert abs(num_params(other) - want) > 0.03 * want, (width, layers, ffn)


def test_target_shapes_offer_the_large_attention_only_where_attention_is_narrow():
  """At 46m the default chain's anchors get three candidates (line, large attention, large
  width); at 60m no stream narrower than 576 holds 6 heads and reaches the count (384 tops out
  near 53.5M; 448 and 512 do not split into 6 heads), and anchors whose attention fills the
  stream (SmolLM2's) get none."""
  line = sizing.resolve_size("46m", DEFAULT_SMALL, DEFAULT_LARGE)
  attention = sizing.large_attention_shape("46m", DEFAULT_SMALL, DEFAULT_LARGE)
  wide = sizing.large_width_shape("46m", DEFAULT_SMALL, DEFAULT_LARGE)
  assert len({line, attention, wide}) == 3
  assert sizing.target_shapes("46m", DEFAULT_LARGE, DEFAULT_SMALL) == [line, attention, wide]
  assert sizing.target_shapes("46m", DEFAULT_SMALL, DEFAULT_LARGE, "line") == [line]
  assert sizing.large_attention_shape("60m", DEFAULT_SMALL, DEFAULT_LARGE) is None
  assert sizing.large_attention_shape("50m", SMOL_SMALL, SMOL) is None
