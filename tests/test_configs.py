"""Every file in configs/ loads in each of its variants, passes the driver's checks, and every
field can be overridden from the command line (links by index)."""

import importlib.util
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from cbd_jax.chain.checks import link_steps, resolve_batches
from cbd_jax.chain.driver import check_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


def _module(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _variants():
  for path in CONFIGS:
    for variant in getattr(_module(path), "VARIANTS", ("",)):
      yield pytest.param(path, variant, id=f"{path.stem}:{variant}")


@pytest.mark.parametrize("path, variant", list(_variants()))
def test_config_loads_and_passes_checks(path, variant):
  config = _module(path).get_config(variant)
  if "chain" not in config:  # configs/recovery.py trains one model, not a chain.
    from cbd_jax.chain import recovery

    config.model = config.model or "runs/chain/targets/50m"  # The one field it cannot default.
    recovery.check_config(config)
    assert link_steps(resolve_batches(config, 1)) >= 1
    return
  check_config(config)
  assert config.workdir and config.source.path
  for link in resolve_batches(config, 1).chain:
    assert link_steps(link) >= 1


def test_unknown_variant_is_refused():
  for path in CONFIGS:
    with pytest.raises(ValueError, match="unknown variant"):
      _module(path).get_config("no-such-variant")


def _parse(*args):
  values, argv = flags.FlagValues(), ["prog", *args]
  config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def test_command_line_overrides_reach_links_by_index():
  config = _parse(f"--config={ROOT / 'configs' / 'qwen_chain.py'}:smoke",
                  "--config.chain[1].steps=3", "--config.chain[0].loss.kind=rkl",
                  "--config.chain[1].optimizer.lr=0.5", "--config.mesh.fsdp=2",
                  "--config.data.seed=7")
  assert config.chain[1].steps == 3 and config.chain[0].loss.kind == "rkl"
  assert config.chain[1].optimizer.lr == 0.5 and config.mesh.fsdp == 2 and config.data.seed == 7
  assert config.chain[0].steps == 8  # Untouched fields keep the variant's values.


def test_qwen_chain_brackets_138m_and_budgets_tokens():
  config = _module(ROOT / "configs" / "qwen_chain.py").get_config("")
  from cbd_jax.model.config import ModelConfig, num_params

  qwen05 = ModelConfig(family="qwen2", vocab_size=151936, real_vocab_size=151665,
                       hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                       intermediate_size=4864, tie_embeddings=True)
  counts = [num_params(qwen05.replace(**dict(link.shape))) for link in config.chain[1:]]
  assert counts[0] > 138e6 > counts[1]
  link = resolve_batches(config, 1).chain[1]
  assert link_steps(link) * link.batch_size * link.microbatches * link.seq_len >= link.tokens


@pytest.mark.parametrize("field, value, message", [
    ("chain[0].bridge", "bogus", "bridge"), ("chain[1].loss.kind", "kl2", "kind"),
    ("mesh.model", 2, "unknown axes")])
def test_bad_fields_are_refused_with_their_name(field, value, message):
  config = _module(ROOT / "configs" / "qwen_chain.py").get_config("smoke")
  with config.unlocked():
    if field.startswith("mesh."):
      config.mesh[field[5:]] = value
    elif field == "chain[0].bridge":
      config.chain[0].bridge = value
    else:
      config.chain[1].loss.kind = value
  with pytest.raises(ValueError, match=message):
    check_config(config)


def test_a_per_device_batch_counts_every_device():
  config = _module(ROOT / "configs" / "qwen_chain.py").get_config("")
  pod = resolve_batches(config, 256)  # v5e-256, as written: 4 sequences per chip.
  assert [link.batch_size for link in pod.chain] == [1024] * 3
  assert not any(link.per_device_batch_size for link in pod.chain)  # What ran is recorded.
  assert link_steps(pod.chain[0]) == -(-200_000_000 // (1024 * 4 * 2048))
  assert resolve_batches(config, 1).chain[0].batch_size == 4
  assert config.chain[0].batch_size == 0  # The given config is left as it is.
  smoke = _module(ROOT / "configs" / "qwen_chain.py").get_config("smoke")
  assert resolve_batches(smoke, 8) is smoke  # No link gives one: nothing to resolve.
  config.chain[0].per_device_batch_size = 0.3
  with pytest.raises(ValueError, match="0.3 x 8 devices = 2.4 sequences, not a whole number"):
    resolve_batches(config, 8)
  config.chain[0].batch_size = 32
  with pytest.raises(ValueError, match="batch_size=32 and per_device_batch_size=0.3 both set"):
    check_config(config)
