"""load_hf / save_hf: round trips, layouts, the real GGUF teacher, and bad input."""

import json
import os
import tempfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from hf_models import tiny_hf_model, torch_logits

import cbd_jax
from cbd_jax.checkpoints import assets, convert
from cbd_jax.checkpoints.hf_config import ConfigError
from cbd_jax.checkpoints.safetensors_io import CheckpointError, read_safetensors, write_safetensors
from cbd_jax.model.config import ModelConfig


def _leaves_equal(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, path
    assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), path  # Bit-exact, NaN-safe.


@pytest.mark.parametrize("family,tie", [("llama", True), ("qwen2", False), ("qwen3", True),
                                        ("gpt2", True), ("gpt2", False)])
def test_pytorch_to_ours_to_pytorch(tmp_path, family, tie):
  hf = tiny_hf_model(family, tie=tie)
  hf.save_pretrained(tmp_path / "src")
  config, params = cbd_jax.load_hf(tmp_path / "src")
  cbd_jax.save_hf(config, params, tmp_path / "out")
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 10))
  np.testing.assert_allclose(torch_logits(back, ids), torch_logits(hf, ids), atol=1e-5, rtol=0)


# Shapes no public checkpoint has (as interpolated targets will): odd widths, MQA, head_dim != D/H.
ODD_SHAPES = [
    ModelConfig(family="llama", vocab_size=77, hidden_size=80, num_layers=3, num_heads=5,
                num_kv_heads=1, head_dim=16, intermediate_size=200),
    ModelConfig(family="qwen2", vocab_size=70, hidden_size=48, num_layers=1, num_heads=6,
                num_kv_heads=3, head_dim=8, intermediate_size=72, tie_embeddings=True),
    ModelConfig(family="qwen3", vocab_size=70, hidden_size=48, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=20, intermediate_size=40),
    ModelConfig(family="gpt2", vocab_size=61, hidden_size=96, num_layers=2, num_heads=3,
                num_kv_heads=3, head_dim=32, intermediate_size=384, tie_embeddings=True,
                max_position_embeddings=40),
]


@pytest.mark.parametrize("config", ODD_SHAPES, ids=lambda c: c.family)
def test_ours_to_hf_and_back_is_bit_exact(tmp_path, config):
  params = cbd_jax.init_params(config, jax.random.key(0))
  rng = np.random.default_rng(1)  # Non-trivial norms and biases too.
  params = jax.tree.map(lambda a: a + 0.01 * rng.standard_normal(a.shape, np.float32), params)
  cbd_jax.save_hf(config, params, tmp_path / "a")
  config2, params2 = cbd_jax.load_hf(tmp_path / "a")
  assert config2 == config
  _leaves_equal(params, params2)
  # transformers loads the unusual shape and computes the same function.
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
  ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 9))
  np.testing.assert_allclose(np.asarray(cbd_jax.forward(config, params, ids)),
                             torch_logits(hf, ids), atol=1e-4, rtol=0)


def test_bf16_sharded_export_round_trip(tmp_path):
  config = ODD_SHAPES[0]
  params = jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16),
                        cbd_jax.init_params(config, jax.random.key(2)))
  cbd_jax.save_hf(config, params, tmp_path / "m", max_shard_bytes=20_000)
  index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
  shards = set(index["weight_map"].values())
  assert len(shards) > 2 and all((tmp_path / "m" / s).exists() for s in shards)
  assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
  _, params2 = cbd_jax.load_hf(tmp_path / "m")
  _leaves_equal(params, params2)
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
  assert next(hf.parameters()).dtype == torch.bfloat16


def test_pytorch_bin_checkpoint(tmp_path):
  hf = tiny_hf_model("qwen2")
  hf.save_pretrained(tmp_path / "st")
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
  torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
  _, a = cbd_jax.load_hf(tmp_path / "st")
  _, b = cbd_jax.load_hf(tmp_path / "bin")
  _leaves_equal(a, b)


def test_hub_id_resolves_through_the_hub_cache(tmp_path, monkeypatch):
  """A hub id is fetched with huggingface_hub; offline, its cache layout is what it reads."""
  import huggingface_hub.constants as constants

  snapshot = tmp_path / "hub" / "models--cbd-test--tiny-qwen3" / "snapshots" / ("a" * 40)
  tiny_hf_model("qwen3").save_pretrained(snapshot)
  (snapshot.parents[1] / "refs").mkdir()
  (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  config, params = cbd_jax.load_hf("cbd-test/tiny-qwen3")
  assert config.family == "qwen3" and config.num_layers == 2
  with pytest.raises(FileNotFoundError, match="cbd-test/absent.*local folder"):
    cbd_jax.load_hf("cbd-test/absent")


def _word_tokenizer(n: int):
  import tokenizers

  vocab = {f"w{i}": i for i in range(n)}
  return tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))


def test_padded_qwen_vocabulary_survives_bit_exactly(tmp_path):
  """Qwen2.5-style head: 151,936 rows for a 151,665-token tokenizer."""
  config = ModelConfig(family="qwen2", vocab_size=151_936, hidden_size=16, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=16,
                       tie_embeddings=True)
  params = cbd_jax.init_params(config, jax.random.key(3))
  cbd_jax.save_hf(config, params, tmp_path / "q", tokenizer=_word_tokenizer(151_665))
  loaded, params2 = cbd_jax.load_hf(tmp_path / "q")
  assert loaded.vocab_size == 151_936 and loaded.real_vocab_size == 151_665
  assert loaded.vocab_limit == 151_665
  _leaves_equal(params, params2)
  cbd_jax.save_hf(loaded, params2, tmp_path / "q2")
  again, params3 = cbd_jax.load_hf(tmp_path / "q2")  # No tokenizer now: the config carries it.
  assert again.real_vocab_size == 151_665
  _leaves_equal(params, params3)


def test_save_hf_never_overwrites(tmp_path):
  config = ODD_SHAPES[1]
  params = cbd_jax.init_params(config, jax.random.key(0))
  (tmp_path / "keep").mkdir()
  (tmp_path / "keep" / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="not empty"):
    cbd_jax.save_hf(config, params, tmp_path / "keep")
  assert os.listdir(tmp_path / "keep") == ["notes.txt"]
  bad = dict(params, embed={"embedding": np.zeros((3, 3), np.float32)})
  with pytest.raises(convert.ConversionError, match="embed/embedding"):
    cbd_jax.save_hf(config, bad, tmp_path / "new")
  assert not (tmp_path / "new").exists() and os.listdir(tmp_path) == ["keep"]


# --- Bad input: one line that names the file or field. ---------------------------------------

@pytest.fixture(scope="module")
def saved_llama():
  with tempfile.TemporaryDirectory() as d:
    tiny_hf_model("llama").save_pretrained(d)
    yield Path(d)


def _copy(src: Path, dst: Path) -> Path:
  dst.mkdir()
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  return dst


def _one_line_error(exc_type, fn, *needles):
  with pytest.raises(exc_type) as info:
    fn()
  message = str(info.value)
  assert "\n" not in message
  for needle in needles:
    assert needle in message, message


def test_missing_config(tmp_path, saved_llama):
  folder = _copy(saved_llama, tmp_path / "m")
  (folder / "config.json").unlink()
  _one_line_error(FileNotFoundError, lambda: cbd_jax.load_hf(folder), str(folder), "config.json")


def test_unknown_model_type(tmp_path, saved_llama):
  folder = _copy(saved_llama, tmp_path / "m")
  raw = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps(dict(raw, model_type="mamba")))
  _one_line_error(ConfigError, lambda: cbd_jax.load_hf(folder), "config.json", "'mamba'")


def test_unhandled_config_field(tmp_path, saved_llama):
  folder = _copy(saved_llama, tmp_path / "m")
  raw = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps(dict(raw, attention_bias=True)))
  _one_line_error(ConfigError, lambda: cbd_jax.load_hf(folder), "config.json", "attention_bias")
  (folder / "config.json").write_text(json.dumps(dict(raw, logit_softcapping=30.0)))
  _one_line_error(ConfigError, lambda: cbd_jax.load_hf(folder), "logit_softcapping")


def test_truncated_safetensors(tmp_path, saved_llama):
  folder = _copy(saved_llama, tmp_path / "m")
  blob = (folder / "model.safetensors").read_bytes()
  (folder / "model.safetensors").write_bytes(blob[: len(blob) - 1000])
  _one_line_error(CheckpointError, lambda: cbd_jax.load_hf(folder), "model.safetensors",
                  "truncated")
  (folder / "model.safetensors").write_bytes(blob[:5])
  _one_line_error(CheckpointError, lambda: cbd_jax.load_hf(folder), "truncated")


def test_wrong_tensor_shape(tmp_path, saved_llama):
  folder = _copy(saved_llama, tmp_path / "m")
  tensors = {k: np.array(v) for k, v in read_safetensors(folder / "model.safetensors").items()}
  name = "model.layers.1.mlp.up_proj.weight"
  tensors[name] = tensors[name][:-1]
  write_safetensors(folder / "model.safetensors", tensors)
  _one_line_error(convert.ConversionError, lambda: cbd_jax.load_hf(folder), name, "(95, 64)",
                  "(96, 64)")


def test_extra_tensor_is_refused(tmp_path, saved_llama):
  folder = _copy(saved_llama, tmp_path / "m")
  tensors = {k: np.array(v) for k, v in read_safetensors(folder / "model.safetensors").items()}
  tensors["model.layers.2.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"]
  write_safetensors(folder / "model.safetensors", tensors)
  _one_line_error(convert.ConversionError, lambda: cbd_jax.load_hf(folder),
                  "model.layers.2.mlp.up_proj.weight")


# --- The real teacher: SmolLM2-135M from its GGUF file, against transformers. -------------------

PARAGRAPH = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
             "France. It is named after the engineer Gustave Eiffel, whose company designed and "
             "built the tower from 1887 to 1889. Locally nicknamed the Iron Lady, it was "
             "constructed as the centerpiece of the 1889 World's Fair, and to crown the centennial "
             "anniversary of the French Revolution.")


def test_real_smollm2_gguf_matches_transformers():
  gguf_path = assets.smollm2_gguf()
  config, params = cbd_jax.load_hf(gguf_path)
  assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
          config.vocab_size, config.rope_theta, config.tie_embeddings) == (
              30, 576, 9, 3, 49152, 100000.0, True)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()
  theirs = {k: v.numpy() for k, v in hf.state_dict().items()}
  ours = convert.to_hf_tensors(config, params)
  assert set(ours) == set(theirs) - {"lm_head.weight"}
  for name, value in ours.items():
    assert np.array_equal(value, theirs[name]), name
  tokenizer = cbd_jax.load_tokenizer(gguf_path)
  ids = np.array([tokenizer(PARAGRAPH)["input_ids"]])
  assert ids.shape[1] > 60
  ours_logits = np.asarray(cbd_jax.forward(config, params, ids))
  ref = torch_logits(hf, ids)
  np.testing.assert_allclose(ours_logits, ref, atol=1e-3, rtol=0)
  np.testing.assert_array_equal(ours_logits.argmax(-1), ref.argmax(-1))


# --- Reliability: damaged files, odd dtypes, and exports that cannot be half-written. ----------

TINY = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                   head_dim=16, intermediate_size=64)


def test_config_json_that_is_a_list_or_not_json(tmp_path, saved_llama):
  folder = _copy(saved_llama, tmp_path / "m")
  (folder / "config.json").write_text("[1, 2]")
  with pytest.raises(ConfigError) as e:
    cbd_jax.load_hf(folder)
  assert str(e.value) == (f"{folder / 'config.json'}: holds a JSON list, not an object of model "
                          "fields (model_type, hidden_size, ...); restore the model's own "
                          "config.json")
  (folder / "config.json").write_text('{"model_type": "llama",')
  _one_line_error(ConfigError, lambda: cbd_jax.load_hf(folder), "config.json", "not valid JSON")


def test_safetensors_header_that_is_a_list(tmp_path, saved_llama):
  folder = _copy(saved_llama, tmp_path / "m")
  blob = b"[1, 2, 3]"
  (folder / "model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob)
  _one_line_error(CheckpointError, lambda: cbd_jax.load_hf(folder), "model.safetensors",
                  "corrupt safetensors header (a JSON list, not an object of tensors)",
                  "rerun the command that wrote it")
  bad = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [8]}}'
  (folder / "model.safetensors").write_bytes(len(bad).to_bytes(8, "little") + bad)
  _one_line_error(CheckpointError, lambda: cbd_jax.load_hf(folder), "tensor 'w' has no valid")


def test_truncated_safetensors_names_file_tensor_and_sizes(tmp_path, saved_llama):
  folder = _copy(saved_llama, tmp_path / "m")
  blob = (folder / "model.safetensors").read_bytes()
  (folder / "model.safetensors").write_bytes(blob[:-1])
  with pytest.raises(CheckpointError) as e:
    cbd_jax.load_hf(folder)
  n = int.from_bytes(blob[:8], "little")
  header = json.loads(blob[8:8 + n])
  last = max((k for k in header if k != "__metadata__"),
             key=lambda k: header[k]["data_offsets"][1])
  begin, end = header[last]["data_offsets"]
  assert str(e.value).startswith(
      f"{folder / 'model.safetensors'}: truncated: the file has {len(blob) - 1} bytes, its header "
      f"needs {len(blob)}; tensor {last!r} (bytes {begin}..{end} of the data section) is cut off "
      f"at byte {end - 1}; the file is damaged")
  assert "re-download" not in str(e.value)


def test_int_embedding_is_refused_by_name(tmp_path, saved_llama):
  folder = _copy(saved_llama, tmp_path / "m")
  tensors = {k: np.array(v) for k, v in read_safetensors(folder / "model.safetensors").items()}
  tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].astype(np.int32)
  write_safetensors(folder / "model.safetensors", tensors)
  _one_line_error(convert.ConversionError, lambda: cbd_jax.load_hf(folder),
                  "'model.embed_tokens.weight' has dtype int32", "must be floating point")


def test_unknown_dtype_lists_the_valid_ones(tmp_path, saved_llama):
  valid = "use one of the valid dtypes: float32, bfloat16, float16"
  _one_line_error(ValueError, lambda: cbd_jax.load_hf(saved_llama, dtype="foo"),
                  "dtype='foo' is not a valid dtype", valid)
  params = cbd_jax.init_params(TINY, jax.random.key(0))
  _one_line_error(ValueError, lambda: cbd_jax.save_hf(TINY, params, tmp_path / "o", dtype="foo"),
                  "dtype='foo'", valid)
  _one_line_error(ValueError, lambda: TINY.replace(dtype="foo"), "ModelConfig.dtype='foo'", valid)
  assert not (tmp_path / "o").exists()
  assert cbd_jax.load_hf(saved_llama, dtype=ml_dtypes.bfloat16)[1]["embed"]["embedding"].dtype \
      == jax.numpy.bfloat16


def test_save_hf_refuses_non_finite_and_int_weights(tmp_path):
  params = jax.tree.map(np.array, cbd_jax.init_params(TINY, jax.random.key(0)))
  params["layers"]["mlp"]["up"]["weight"][1, 3, 5] = np.nan
  params["layers"]["mlp"]["up"]["weight"][1, 4, 5] = np.inf
  with pytest.raises(ValueError) as e:
    cbd_jax.save_hf(TINY, params, tmp_path / "nan")
  assert str(e.value).startswith(f"{tmp_path / 'nan'}: not written: tensor "
                                 "'model.layers.1.mlp.up_proj.weight' holds 2 NaN or inf values "
                                 "of 2,048; the weights diverged")
  params["layers"]["mlp"]["up"]["weight"][1] = 1e5  # Finite, but not in float16.
  _one_line_error(ValueError, lambda: cbd_jax.save_hf(TINY, params, tmp_path / "f16",
                                                      dtype="float16"),
                  "'model.layers.1.mlp.up_proj.weight' holds 2,048 NaN or inf")
  cbd_jax.save_hf(TINY, params, tmp_path / "f32")  # The same weights fit float32.
  params["final_norm"]["scale"] = np.ones(32, np.int32)
  _one_line_error(ValueError, lambda: cbd_jax.save_hf(TINY, params, tmp_path / "int"),
                  "'model.norm.weight' has dtype int32")
  assert sorted(os.listdir(tmp_path)) == ["f32"]  # Nothing else written, not even a temp folder.


def test_save_hf_destination_that_is_a_file(tmp_path):
  params = cbd_jax.init_params(TINY, jax.random.key(0))
  (tmp_path / "file").write_text("x")
  _one_line_error(FileExistsError, lambda: cbd_jax.save_hf(TINY, params, tmp_path / "file"),
                  f"{tmp_path / 'file'}: is a file, not a folder")
  _one_line_error(FileExistsError, lambda: cbd_jax.save_hf(TINY, params, tmp_path / "file" / "m"),
                  f"{tmp_path / 'file'} is a file, not a folder")
  assert os.listdir(tmp_path) == ["file"] and (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("umask, folder_mode, file_mode", [(0o022, 0o755, 0o644),
                                                            (0o077, 0o700, 0o600)])
def test_exported_folders_follow_the_umask(tmp_path, umask, folder_mode, file_mode):
  params = cbd_jax.init_params(TINY, jax.random.key(0))
  old = os.umask(umask)
  try:
    out = cbd_jax.save_hf(TINY, params, tmp_path / "deep" / "m", tokenizer=_word_tokenizer(64))
  finally:
    os.umask(old)
  assert (out.stat().st_mode & 0o777) == folder_mode
  assert ((tmp_path / "deep").stat().st_mode & 0o777) == folder_mode
  for f in out.iterdir():
    assert (f.stat().st_mode & 0o777) == file_mode, f.name


def test_leftovers_of_dead_exports_are_removed_live_ones_kept(tmp_path):
  import socket
  import subprocess
  import sys

  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  host = socket.gethostname()
  stale = tmp_path / f".anchor1.partial-{host}-{dead}-0123abcd"
  live = tmp_path / f".anchor2.partial-{host}-{os.getpid()}-0123abcd"
  other_host = tmp_path / f".anchor3.partial-elsewhere-{dead}-0123abcd"
  for d in (stale, live, other_host):
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"partial")
  cbd_jax.save_hf(TINY, cbd_jax.init_params(TINY, jax.random.key(0)), tmp_path / "m")
  assert not stale.exists() and live.exists() and other_host.exists()
  assert (tmp_path / "m" / "config.json").exists()


def test_damaged_index_and_tokenizer_are_one_line(tmp_path, saved_llama):
  folder = _copy(saved_llama, tmp_path / "m")
  (folder / "model.safetensors.index.json").write_text("[]")
  _one_line_error(CheckpointError, lambda: cbd_jax.load_hf(folder),
                  "model.safetensors.index.json: not a checkpoint index (TypeError")
  (folder / "model.safetensors.index.json").write_text('{"weight_map": [1]}')
  _one_line_error(CheckpointError, lambda: cbd_jax.load_hf(folder),
                  "weight_map is not an object of tensor: file")
  (folder / "model.safetensors.index.json").unlink()
  (folder / "tokenizer.json").write_text('{"model": 3')
  _one_line_error(CheckpointError, lambda: cbd_jax.load_hf(folder),
                  f"{folder / 'tokenizer.json'}: unreadable tokenizer (", "the file is damaged")


def test_config_json_numbers_of_the_wrong_type(tmp_path, saved_llama):
  folder = _copy(saved_llama, tmp_path / "m")
  raw = json.loads((folder / "config.json").read_text())
  for field, value in (("hidden_size", "64"), ("num_hidden_layers", 0), ("rms_norm_eps", None)):
    (folder / "config.json").write_text(json.dumps(dict(raw, **{field: value})))
    kind = "number" if field == "rms_norm_eps" else "integer"
    _one_line_error(ConfigError, lambda: cbd_jax.load_hf(folder),
                    f"config.json: {field}={value!r} must be a positive {kind}")


def test_tokenizer_larger_than_the_vocabulary_is_reported(tmp_path, caplog):
  params = cbd_jax.init_params(TINY, jax.random.key(0))
  cbd_jax.save_hf(TINY, params, tmp_path / "m", tokenizer=_word_tokenizer(70))
  with caplog.at_level("WARNING", logger="cbd_jax.checkpoints.hf_io"):
    config, _ = cbd_jax.load_hf(tmp_path / "m")
  assert config.real_vocab_size is None
  assert (f"{tmp_path / 'm'}: the tokenizer has 70 tokens but the model only 64 embedding rows"
          in caplog.text)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_shape_transformers_refuses_is_refused_before_it_is_written(tmp_path, family):
  """A Llama whose hidden size the heads do not divide (attention narrower than the stream):
  transformers' own config refuses it, so save_hf must refuse it in one line, writing nothing;
  Qwen2's config accepts the same shape, and the folder loads with the same logits."""
  config = TINY.replace(family=family, hidden_size=40, num_heads=3, num_kv_heads=1)
  params = jax.tree.map(np.array, cbd_jax.init_params(config, jax.random.key(0)))
  hf_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family]
  try:
    hf_class(hidden_size=40, num_attention_heads=3, num_key_value_heads=1, head_dim=16)
    refused = False
  except Exception:  # noqa: BLE001  (transformers' validator raises its own class)
    refused = True
  out = tmp_path / "m"
  if refused:
    _one_line_error(ValueError, lambda: cbd_jax.save_hf(config, params, out),
                    "hidden_size 40 is not a multiple of num_heads 3")
    assert not out.exists() and os.listdir(tmp_path) == []
    return
  cbd_jax.save_hf(config, params, out)
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  ids = np.arange(12, dtype=np.int32)[None] % config.vocab_size
  with torch.no_grad():
    want = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  got = np.asarray(cbd_jax.forward(config, params, ids))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
