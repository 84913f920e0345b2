"""The teacher cache: it stores the teacher's rounded top-k and tail, its step equals a float64
reference of the top-k loss for every loss kind and storage dtype (a confident teacher included)
and the live step when k covers the vocabulary, and a link trained from it is resumable,
reusable without recomputing, and refuses a cache built for other settings."""

import functools
import os
import shutil
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from cbd_jax.chain.source import init_host_params
from cbd_jax.checkpoints import manifest
from cbd_jax.distill import losses, teacher_cache
from cbd_jax.distill.fused_loss import fused_distill_loss
from cbd_jax.distill.train_step import LossSettings, make_init_state, make_optimizer
from cbd_jax.model import decoder
from cbd_jax.model.config import ModelConfig
from cbd_jax.model.sharding import make_mesh

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import kd_reference as ref  # noqa: E402

from configs import qwen_chain  # noqa: E402

TEACHER = ModelConfig(family="qwen2", vocab_size=96, real_vocab_size=90, hidden_size=32,
                      num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                      intermediate_size=64)
STUDENT = TEACHER.replace(hidden_size=16, num_heads=1, intermediate_size=32)
REAL_V = 90
TEMPERATURE = 0.5
CONFIDENCE = 50.0  # Teacher head scale: a confident teacher, its tail mostly below 1e-4.
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
  """One step of a confident teacher, cached at k = 8 and at k = 90 (the whole real vocabulary)
  in every storage dtype; its float64 logits."""
  mesh = make_mesh({"data": -1})
  t_params = init_host_params(TEACHER, 1)
  t_params["lm_head"] = {"weight": CONFIDENCE * t_params["lm_head"]["weight"]}
  ids = np.random.default_rng(0).integers(0, REAL_V, (1, 8, 13)).astype(np.int32)  # [M, B, T+1]
  batch = {"ids": ids[..., :-1], "labels": ids[..., 1:], "mask": np.ones((1, 8, 12), np.float32)}
  folders = {}
  for k in (8, REAL_V):
    topk = teacher_cache.make_topk(TEACHER, k, TEMPERATURE, chunk_size=40, mesh=mesh, rules=())
    for dtype in DTYPES:
      folder = tmp_path_factory.mktemp(f"k{k}_{dtype}")
      assert teacher_cache.fill(folder, 1, lambda _: batch, topk, lambda: t_params, mesh,
                                dtype) == 1
      folders[k, dtype] = folder
  t_logits = np.asarray(jax.vmap(lambda x: decoder.forward(TEACHER, t_params, x))(batch["ids"]),
                        np.float64)
  return mesh, t_params, batch, t_logits, folders


def _stored(folder: Path):
  (path,) = folder.glob("step_00000000.*.npz")
  with np.load(path) as z:
    out = {name: z[name] for name in z.files}
  if out["logp"].dtype == np.dtype("V2"):  # How np.save writes bfloat16.
    out["logp"] = out["logp"].view(ml_dtypes.bfloat16)
  return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_fill_stores_the_teachers_rounded_topk_and_its_tail(cached, dtype):
  _, _, _, t_logits, folders = cached
  stored = _stored(folders[8, dtype])
  assert stored["logp"].dtype == DTYPES[dtype] and stored["idx"].shape == (1, 8, 12, 8)
  lp = ref.log_softmax(t_logits, TEMPERATURE, REAL_V)
  np.testing.assert_array_equal(np.sort(stored["idx"], -1), np.sort(np.argsort(-lp)[..., :8], -1))
  exact = np.take_along_axis(lp, stored["idx"], -1)
  # The fp32 log-softmax of logits up to |z / T| ~ 200 is exact to a few fp32 ulps of 200;
  # storage then rounds to the nearest value of the dtype (half an ulp).
  fp32_error = 8 * np.finfo(np.float32).eps * np.abs(t_logits / TEMPERATURE).max()
  half_ulp = np.abs(exact) * float(np.finfo(DTYPES[dtype]).eps) / 2
  assert (np.abs(stored["logp"].astype(np.float64) - exact) <= half_ulp + fp32_error).all()
  want_rest = ref.tail_logprob(t_logits, stored["idx"], TEMPERATURE, REAL_V)
  np.testing.assert_allclose(stored["rest"], want_rest, rtol=0, atol=fp32_error)
  # The case the stored tail is for: 1 - sum p_topk of the stored values cancels to 0 or less.
  assert (1 - np.exp(stored["logp"].astype(np.float32)).sum(-1) <= 0).any()


def test_cached_step_equals_a_float64_reference_in_every_storage_dtype(cached):
  """Reverse KL, the kind a lost tail sends to ~1e29, with the CE mix; k = 8 and 90."""
  mesh, _, batch, t_logits, folders = cached
  loss = LossSettings(kind="rkl", temperature=TEMPERATURE, kd_weight=1.0, ce_weight=0.5,
                      chunk_size=40)
  opt, _ = make_optimizer(1e-3, total_steps=4)
  step = teacher_cache.make_cached_step(STUDENT, opt, loss, mesh, (), None)
  init = make_init_state(STUDENT, opt, mesh)
  s_params = init_host_params(STUDENT, 2)
  s_logits = np.asarray(jax.vmap(lambda x: decoder.forward(STUDENT, s_params, x))(batch["ids"]),
                        np.float64)
  lq = ref.log_softmax(s_logits, 1.0, REAL_V)
  want_ce = -np.take_along_axis(lq, batch["labels"][..., None], -1).sum()
  for dtype in DTYPES:
    stored = _stored(folders[8, dtype])
    rest = ref.tail_logprob(t_logits, stored["idx"], TEMPERATURE, REAL_V)  # The true tail.
    want_kd = ref.kd_topk_per_token(s_logits, stored["idx"], stored["logp"], rest, "rkl",
                                    TEMPERATURE, REAL_V).sum()
    _, metrics = step(init(s_params), None, dict(batch, **teacher_cache.read_step(folders[8, dtype],
                                                                             0)))
    np.testing.assert_allclose(metrics["kd_sum"], want_kd, rtol=1e-5, err_msg=dtype)
    np.testing.assert_allclose(metrics["ce_sum"], want_ce, rtol=1e-5, err_msg=dtype)
    np.testing.assert_allclose(metrics["loss"], (want_kd + 0.5 * want_ce) / batch["mask"].sum(),
                               rtol=1e-5, err_msg=dtype)


@functools.partial(jax.jit, static_argnames="dense")
def _kd_of_every_kind(s_params, t_params, ids_MxBxT, topk, dense=False):
  """{kind: KD sum} of the fused loss over microbatches: from the cached top-k, or (``dense``)
  from the live teacher's hidden states and head."""
  out = {kind: 0.0 for kind in losses.KINDS}
  for m in range(ids_MxBxT.shape[0]):
    hidden, _ = decoder.apply_hidden(STUDENT, s_params, ids_MxBxT[m])
    head = decoder.head_weight(STUDENT, s_params)
    live = {}
    if dense:
      live = dict(teacher_hidden_BxTxD=decoder.apply_hidden(TEACHER, t_params, ids_MxBxT[m])[0],
                  teacher_head_VxD=decoder.head_weight(TEACHER, t_params))
    for kind in losses.KINDS:
      value, _ = fused_distill_loss(
          hidden, head, kind=kind, temperature=TEMPERATURE, vocab_limit=REAL_V, chunk_size=40,
          teacher_topk=None if dense else tuple(x[m] for x in topk), **live)
      out[kind] = out[kind] + value
  return out


def test_cached_kd_equals_live_kd_for_every_kind_and_storage_dtype(cached):
  """With k = the whole real vocabulary the cached loss is the live one: equal in fp32, and in
  fp16 / bf16 equal to the float64 loss of the rounded values it stores; with k = 8 it is the
  float64 top-k loss of the stored values and the true tail."""
  _, t_params, batch, t_logits, folders = cached
  s_params = init_host_params(STUDENT, 2)
  s_logits = np.asarray(jax.vmap(lambda x: decoder.forward(STUDENT, s_params, x))(batch["ids"]),
                        np.float64)
  live = _kd_of_every_kind(s_params, t_params, batch["ids"], None, dense=True)
  for kind in losses.KINDS:
    want = ref.kd_per_token(s_logits, t_logits, kind, TEMPERATURE, REAL_V).sum()
    np.testing.assert_allclose(live[kind], want, rtol=1e-5, err_msg=kind)
  for (k, dtype), folder in folders.items():
    stored, read = _stored(folder), teacher_cache.read_step(folder, 0)
    got = _kd_of_every_kind(s_params, None, batch["ids"],
                            (read["t_idx"], read["t_logp"], read["t_rest"]))
    rest = ref.tail_logprob(t_logits, stored["idx"], TEMPERATURE, REAL_V)
    for kind in losses.KINDS:
      where = f"{kind}, k={k}, {dtype}"
      want = ref.kd_topk_per_token(s_logits, stored["idx"], stored["logp"], rest, kind,
                                   TEMPERATURE, REAL_V).sum()
      np.testing.assert_allclose(got[kind], want, rtol=1e-5, err_msg=where)
      if k == REAL_V and dtype == "float32":
        np.testing.assert_allclose(got[kind], live[kind], rtol=1e-5, err_msg=where)


def _cached_link(workdir: Path, cache: Path, k: int = 64, text: Path | None = None, **data):
  config = qwen_chain.get_config("smoke")
  config.workdir = str(workdir)
  config.chain = (config.chain[0],)
  config.chain[0].teacher_cache.update(dict(k=k, dir=str(cache)))
  config.eval.every, config.log.progress = 0, False
  if text is not None:
    config.data.train = str(text)
  config.data.update(data)
  return config


def _run(config):
  from cbd_jax.chain import driver

  return driver.run_chain(config)


def _weights(workdir: Path):
  return safetensors.numpy.load_file(workdir / "anchors" / "anchor1" / "model.safetensors")


def test_a_cached_link_resumes_its_fill_reuses_the_cache_and_refuses_other_settings(tmp_path):
  cache, text = tmp_path / "cache", tmp_path / "train.txt"
  shutil.copy(qwen_chain.get_config("smoke").data.train, text)
  first = _run(_cached_link(tmp_path / "a", cache, text=text))["anchors"][0]
  assert first["status"] == "done"
  assert first["teacher_cache"]["steps_computed_now"] == 8
  files = sorted(cache.glob("step_*.npz"))
  assert len(files) == 8
  with np.load(files[0]) as z:
    assert z["idx"].shape == (2, 8, 64, 64) and z["logp"].dtype == np.float32
  for f in files[2:5]:  # A fill killed part-way: the finished steps stay, the others are redone.
    f.unlink()
  second = _run(_cached_link(tmp_path / "b", cache, text=text))["anchors"][0]
  assert second["teacher_cache"]["steps_computed_now"] == 3
  # Settings that do not change the tokens (how they are made) keep the cache.
  third = _run(_cached_link(tmp_path / "c", cache, text=text, tokenize_workers=1,
                            cache_shared=False))["anchors"][0]
  assert third["teacher_cache"]["steps_computed_now"] == 0  # No teacher step at all.
  a, b, c = (_weights(tmp_path / n) for n in "abc")
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    np.testing.assert_array_equal(a[key], c[key], err_msg=key)
  assert manifest.read(tmp_path / "c")["anchors"][0]["eval"] == first["eval"]
  with pytest.raises(ValueError) as e:
    _run(_cached_link(tmp_path / "d", cache, k=32, text=text))
  assert str(e.value) == (f"{cache}: a teacher cache built for other settings (k 64 -> 32); "
                          "delete it or set another teacher_cache.dir")
  files[6].write_bytes(files[6].read_bytes()[:100])
  with pytest.raises(ValueError) as e:
    _run(_cached_link(tmp_path / "e", cache, text=text))
  assert str(e.value).startswith(f"{files[6]}: damaged or missing teacher-cache file (")
  with text.open("a") as f:  # The same path, edited: other training tokens.
    f.write("One more paragraph of training text, added after the cache was built.\n")
  with pytest.raises(ValueError) as e:
    _run(_cached_link(tmp_path / "f", cache, text=text))
  assert str(e.value).startswith(f"{cache}: a teacher cache built for other settings (data ")


def test_the_cache_key_follows_the_data_and_teachers_content_not_how_tokens_are_made(tmp_path):
  text, teacher = tmp_path / "train.txt", tmp_path / "teacher"
  text.write_text("Some training text.\n")
  teacher.mkdir()
  (teacher / "model.safetensors").write_bytes(b"w" * 64)
  (teacher / "config.json").write_text("{}")
  config = _cached_link(tmp_path / "run", tmp_path / "cache", text=text)

  def key():
    return teacher_cache.cache_key(config.chain[0], config.data, str(teacher), "tokenizer-fp")

  base = key()
  config.data.update(dict(tokenize_workers=4, cache_shared=False, tokenize_timeout_s=60,
                          cache_dir=str(tmp_path / "elsewhere"), heldout_split="test"))
  (teacher / "tokenizer.json").write_text("{}")  # Not the weights.
  assert key() == base
  with text.open("a") as f:
    f.write("More text.\n")
  edited = key()
  assert edited["data"] != base["data"] and dict(edited, data=0) == dict(base, data=0)
  config.data.seed += 1
  assert key()["data"] != edited["data"]
  stamp = (teacher / "model.safetensors").stat().st_mtime + 10
  os.utime(teacher / "model.safetensors", (stamp, stamp))  # Rewritten: same size, new time.
  assert key()["teacher"] != base["teacher"]
