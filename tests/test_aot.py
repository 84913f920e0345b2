"""Ahead-of-time compilation for TPU topologies (needs libtpu, no TPU): fit, memory, slices."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("libtpu", reason="libtpu is not installed (pip install -e '.[tpu]')")

from cbd_jax.chain import aot  # noqa: E402
from cbd_jax.model.config import num_params  # noqa: E402
from cbd_jax.model.sharding import make_mesh  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _smoke_config():
  spec = importlib.util.spec_from_file_location("qwen_chain", ROOT / "configs" / "qwen_chain.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("smoke")


def test_topology_names():
  assert aot.topology_name("v5e-256") == "v5e:16x16"
  assert aot.topology_name("v6e-256") == "v6e:16x16"
  assert aot.topology_name("v5p-128") == "v5p:4x4x4"  # v5p counts 2 cores per chip.
  assert aot.topology_name("v5p:2x2x4") == "v5p:2x2x4"
  with pytest.raises(ValueError, match="unknown TPU topology"):
    aot.topology_name("v9x-8")
  assert len(aot.topology_devices("v5e-4")) == 4


def test_smoke_link_compiles_and_fits_on_v5e_2x2():
  config = _smoke_config()
  config.chain[0].seq_len = 128  # Whole 128-token blocks: the Pallas flash kernel is chosen.
  config.chain[0].batch_size, config.chain[0].per_device_batch_size = 0, 2  # 8 on 4 chips.
  config.eval.batch_size = 2  # Padded to the 4 batch shards with masked rows.
  (report,) = aot.compile_chain(config, "v5e:2x2", link="anchor1")
  assert report.batch_size == 8
  assert report.attention == "pallas"
  assert report.mesh == {"data": 4, "fsdp": 1, "tensor": 1}
  assert report.fits and report.eval_fits and not report.error
  assert report.hbm == 16 * aot.GIB
  assert report.tokens_per_chip == 8 * 128 // 4
  # Data parallel: every chip holds the whole fp32 student, its two Adam moments (plus the two
  # int32 step counts of Adam and the schedule) and the fp32 teacher.
  (_, student, teacher), _ = aot.link_models(config)
  student, teacher = num_params(student), num_params(teacher)
  assert report.params == 4 * student and report.teacher == 4 * teacher
  assert report.opt_state == 2 * report.params + 2 * 4
  assert report.total >= report.params + report.opt_state + report.teacher + report.temporaries
  # Weight matmuls of the step (2 microbatches): 6 N_student + 2 N_teacher per token.
  assert report.model_flops == (6 * student + 2 * teacher) * 256 * 2
  # XLA counts a loop body (layers, microbatches, loss chunks) once: fewer than the whole step.
  assert report.model_flops / 20 < report.flops < report.model_flops


def test_two_slices_make_a_hybrid_mesh_and_compile():
  devices = aot.topology_devices("v5e:2x2", num_slices=2)
  mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  for row in mesh.devices.reshape(2, -1):  # Each data row (DCN) is one slice (ICI).
    assert len({d.slice_index for d in row}) == 1
  assert {d.slice_index for d in mesh.devices[:, 0, 0]} == {0, 1}
  config = _smoke_config()
  config.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
  (report,) = aot.compile_chain(config, "v5e:2x2", num_slices=2, link="anchor2")
  assert report.mesh["data"] == 2 and report.fits
  assert report.attention == "xla"  # 64-token sequences: not whole flash blocks.


def test_launcher_exits_nonzero_with_a_suggestion_when_a_link_does_not_fit():
  cmd = [sys.executable, str(ROOT / "launch" / "aot_compile.py"),
         "--config=configs/qwen_chain.py:smoke", "--topology=v5e:2x2", "--link=anchor2",
         "--batch=65536", "--seq_len=4096", "--microbatches=1", "--remat"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 1, out.stdout + out.stderr[-2000:]
  assert "anchor2" in out.stdout and "NO" in out.stdout
  assert "does not fit" in out.stdout and "--batch=32768 --microbatches=2" in out.stdout
