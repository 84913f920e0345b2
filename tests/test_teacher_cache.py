"""The teacher cache: its top-k equals the teacher's, its step equals the top-k loss computed from
full logits, and a link trained from it is resumable, reusable without recomputing, and refuses
a cache built for other settings."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from cbd_jax import losses, manifest, model, teacher_cache
from cbd_jax.config import ModelConfig
from cbd_jax.sharding import make_mesh
from cbd_jax.source import init_host_params
from cbd_jax.train_step import LossSettings, make_init_state, make_optimizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import qwen_chain  # noqa: E402

TEACHER = ModelConfig(family="qwen2", vocab_size=96, real_vocab_size=90, hidden_size=32,
                      num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                      intermediate_size=64)
STUDENT = TEACHER.replace(hidden_size=16, num_heads=1, intermediate_size=32)


def test_cached_topk_and_step_equal_the_loss_from_full_logits():
  mesh = make_mesh({"data": -1})
  t_params, s_params = init_host_params(TEACHER, 1), init_host_params(STUDENT, 2)
  ids = np.random.default_rng(0).integers(0, 90, (2, 8, 13)).astype(np.int32)  # [M, B, T+1]
  batch = {"ids": ids[..., :-1], "labels": ids[..., 1:], "mask": np.ones((2, 8, 12), np.float32)}
  k, temperature = 8, 2.0
  topk = teacher_cache.make_topk(TEACHER, k, temperature, chunk_size=40, mesh=mesh, rules=())
  idx, logp = jax.device_get(topk(t_params, batch["ids"]))
  t_logits = jax.vmap(lambda x: model.forward(TEACHER, t_params, x))(batch["ids"])
  want_idx, want_logp = losses.topk_teacher(t_logits, k, temperature, TEACHER.vocab_limit)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-6)

  loss = LossSettings(temperature=temperature, kd_weight=1.0, ce_weight=0.5, chunk_size=40)
  opt, _ = make_optimizer(1e-3, total_steps=4)
  step = teacher_cache.make_cached_step(STUDENT, opt, loss, mesh, (), None)
  state = make_init_state(STUDENT, opt, mesh)(s_params)
  _, metrics = step(state, None, dict(batch, t_idx=idx, t_logp=logp))
  s_logits = jax.vmap(lambda x: model.forward(STUDENT, s_params, x))(batch["ids"])
  kd, count = losses.kd_loss_topk_sum(s_logits, jnp.asarray(idx), jnp.asarray(logp),
                                      temperature=temperature, vocab_limit=STUDENT.vocab_limit)
  ce, _ = losses.cross_entropy_sum(s_logits, batch["labels"], vocab_limit=STUDENT.vocab_limit)
  np.testing.assert_allclose(metrics["kd_sum"], kd, rtol=2e-5)
  np.testing.assert_allclose(metrics["ce_sum"], ce, rtol=2e-5)
  np.testing.assert_allclose(metrics["loss"], (kd + 0.5 * ce) / count, rtol=2e-5)


def _cached_link(workdir: Path, cache: Path, k: int = 64):
  config = qwen_chain.get_config("smoke")
  config.workdir = str(workdir)
  config.chain = (config.chain[0],)
  config.chain[0].teacher_cache.update(dict(k=k, dir=str(cache)))
  config.eval.every, config.log.progress = 0, False
  return config


def _run(config):
  from cbd_jax import chain

  return chain.run_chain(config)


def _weights(workdir: Path):
  return safetensors.numpy.load_file(workdir / "anchors" / "anchor1" / "model.safetensors")


def test_a_cached_link_resumes_its_fill_reuses_the_cache_and_refuses_other_settings(tmp_path):
  cache = tmp_path / "cache"
  first = _run(_cached_link(tmp_path / "a", cache))["anchors"][0]
  assert first["status"] == "done"
  assert first["teacher_cache"]["steps_computed_now"] == 8
  files = sorted(cache.glob("step_*.npz"))
  assert len(files) == 8
  with np.load(files[0]) as z:
    assert z["idx"].shape == (2, 8, 64, 64) and z["logp"].dtype == np.float32
  for f in files[2:5]:  # A fill killed part-way: the finished steps stay, the others are redone.
    f.unlink()
  second = _run(_cached_link(tmp_path / "b", cache))["anchors"][0]
  assert second["teacher_cache"]["steps_computed_now"] == 3
  third = _run(_cached_link(tmp_path / "c", cache))["anchors"][0]
  assert third["teacher_cache"]["steps_computed_now"] == 0  # No teacher step at all.
  a, b, c = (_weights(tmp_path / n) for n in "abc")
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    np.testing.assert_array_equal(a[key], c[key], err_msg=key)
  assert manifest.read(tmp_path / "c")["anchors"][0]["eval"] == first["eval"]
  with pytest.raises(ValueError) as e:
    _run(_cached_link(tmp_path / "d", cache, k=32))
  assert str(e.value) == (f"{cache}: a teacher cache built for other settings (k 64 -> 32); "
                          "delete it or set another teacher_cache.dir")
  files[6].write_bytes(files[6].read_bytes()[:100])
  with pytest.raises(ValueError) as e:
    _run(_cached_link(tmp_path / "e", cache))
  assert str(e.value).startswith(f"{files[6]}: damaged or missing teacher-cache file (")
