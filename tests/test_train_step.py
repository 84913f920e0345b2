"""The distillation step: sharded == single device, accumulation == one big batch, bf16 runs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbd_jax.chain.source import init_host_params
from cbd_jax.distill.train_step import (
  LossSettings,
  make_eval_step,
  make_init_state,
  make_optimizer,
  make_train_step,
  place_params,
)
from cbd_jax.model import decoder
from cbd_jax.model.config import ModelConfig
from cbd_jax.model.sharding import make_mesh, tree_shardings

STUDENT = ModelConfig(family="qwen2", vocab_size=128, real_vocab_size=120, hidden_size=32,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      intermediate_size=64)
TEACHER = STUDENT.replace(hidden_size=48, num_layers=3, intermediate_size=96)
LOSS = LossSettings(kind="fkl", temperature=2.0, ce_weight=0.5, chunk_size=32)


def host_params(config, seed):
  """Random params made on the host by the project's initialiser (`source.init_host_params`:
  normal(0.02) weights, unit norm scales, zero biases): nothing compiled."""
  return init_host_params(config, seed)


def _batches(seed, n, m, b, t, vocab=120):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    tokens = rng.integers(0, vocab, size=(m, b, t + 1)).astype(np.int32)
    mask = np.ones((m, b, t), np.float32)
    mask[..., -3:] = 0.0  # The loss mask must exclude these positions exactly.
    out.append({"ids": tokens[..., :-1], "labels": tokens[..., 1:], "mask": mask})
  return out


def optimizer():
  """The optimizer of every run compared here (and in test_multihost). eps 1e-6, not Adam's 1e-8:
  Qwen2's k bias gets gradients of about 1e-9 here (rounding-level), which eps 1e-8 would turn
  into updates of a tenth of the learning rate whose size depends on the order of the sums
  (sharded or not), not on the step being right."""
  return make_optimizer(1e-2, total_steps=10, warmup_steps=1, weight_decay=0.1, eps=1e-6)


def _run(mesh, batches, loss=LOSS, student=STUDENT, teacher=TEACHER):
  opt, sched = optimizer()
  state = make_init_state(student, opt, mesh)(host_params(student, 1))
  t_params = host_params(teacher, 2)
  t_params = place_params(t_params, tree_shardings(t_params, mesh), jnp.dtype(teacher.dtype))
  step = make_train_step(student, teacher, opt, loss, mesh, schedule=sched)
  history = []
  for batch in batches:
    state, metrics = step(state, t_params, batch)
    history.append(jax.device_get(metrics))
  return jax.device_get(state.params), history


@functools.cache
def _reference():
  """Two steps of two microbatches on one device."""
  return _run(make_mesh({"data": 1}, jax.devices()[:1]), _batches(0, 2, 2, 8, 16))


def _assert_params_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a, b)


def test_sharded_step_equals_single_device():
  p1, h1 = _reference()
  p8, h8 = _run(make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), _batches(0, 2, 2, 8, 16))
  for a, b in zip(h1, h8, strict=True):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    assert a["count"] == b["count"] == 2 * 8 * 13
  _assert_params_close(p1, p8)
  assert h1[0]["lr"] == 0.0 and h1[1]["lr"] > 0.0  # Warm-up starts at zero.


def _objective(params, batch, loss=LOSS):
  """The link's objective (kd_weight KD + ce_weight CE per token) of ``params`` on a training
  batch [M, B, T], from the eval step (checked against naive logits below)."""
  step = make_eval_step(STUDENT, TEACHER, loss, make_mesh({"data": 1}, jax.devices()[:1]))
  t_params = host_params(TEACHER, 2)
  sums = [jax.device_get(step(params, t_params, {k: v[m] for k, v in batch.items()}))
          for m in range(len(batch["ids"]))]
  total = sum(loss.kd_weight * x["kd_sum"] + loss.ce_weight * x["ce_sum"] for x in sums)
  return float(total / sum(x["count"] for x in sums))


def test_an_update_at_a_nonzero_learning_rate_lowers_the_objective_on_its_batch():
  """Step 0 runs at lr 0 and moves nothing; step 1 (lr 1e-2) reports the loss of the unchanged
  parameters on batch 1, then updates them on it: their objective on batch 1 falls."""
  params, history = _reference()
  batch = _batches(0, 2, 2, 8, 16)[1]
  before = _objective(host_params(STUDENT, 1), batch)
  assert history[1]["loss"] == pytest.approx(before, rel=1e-5)
  assert history[1]["lr"] > 0.0
  assert _objective(params, batch) < before - 0.02


def test_accumulation_equals_one_big_batch():
  p1, h1 = _reference()
  big = [{k: v.reshape(1, 16, 16) for k, v in b.items()} for b in _batches(0, 2, 2, 8, 16)]
  pb, hb = _run(make_mesh({"fsdp": 4}, jax.devices()[:4]), big)
  for a, b in zip(h1, hb, strict=True):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  _assert_params_close(p1, pb)


def test_eval_step_matches_naive_logits():
  batch = {k: v[0] for k, v in _batches(3, 1, 1, 4, 16)[0].items()}
  mesh = make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])
  s, t = host_params(STUDENT, 1), host_params(TEACHER, 2)
  out = jax.device_get(make_eval_step(STUDENT, TEACHER, LOSS, mesh)(s, t, batch))
  zs = decoder.forward(STUDENT, s, batch["ids"])[..., :120]
  zt = decoder.forward(TEACHER, t, batch["ids"])[..., :120]
  lq, lp = jax.nn.log_softmax(zs), jax.nn.log_softmax(zt)
  m = batch["mask"]
  kl = np.sum(np.sum(np.exp(lp) * (lp - lq), -1) * m)
  lp2, lq2 = jax.nn.log_softmax(zt / 2), jax.nn.log_softmax(zs / 2)
  kd = 4 * np.sum(np.sum(np.exp(lp2) * (lp2 - lq2), -1) * m)
  ce = -np.sum(np.take_along_axis(lq, batch["labels"][..., None], -1)[..., 0] * m)
  np.testing.assert_allclose(out["kl_sum"], kl, rtol=1e-5)
  np.testing.assert_allclose(out["kd_sum"], kd, rtol=1e-5)
  np.testing.assert_allclose(out["ce_sum"], ce, rtol=1e-5)
  assert out["count"] == m.sum() == 4 * 13


def test_bf16_compute_with_remat_keeps_fp32_master_params():
  p1, h1 = _reference()
  student = STUDENT.replace(dtype="bfloat16", remat=True)
  teacher = TEACHER.replace(dtype="bfloat16")
  pb, hb = _run(make_mesh({"fsdp": 2}, jax.devices()[:2]), _batches(0, 2, 2, 8, 16),
                student=student, teacher=teacher)
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(pb))
  np.testing.assert_allclose(hb[0]["loss"], h1[0]["loss"], rtol=2e-2)  # bf16 vs fp32 compute.
  # The bf16-computed update on batch 1 lowers the fp32 objective there, as the fp32 one does.
  batch = _batches(0, 2, 2, 8, 16)[1]
  assert _objective(pb, batch) < _objective(host_params(STUDENT, 1), batch) - 0.02


def test_mismatched_vocabularies_are_refused():
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  opt, _ = make_optimizer(1e-3, 10)
  with pytest.raises(ValueError, match="vocabulary bridge"):
    make_train_step(STUDENT, TEACHER.replace(real_vocab_size=None), opt, LOSS, mesh)
