"""Ahead-of-time compilation of a chain's steps for a TPU topology, on any machine.

Each link's real train and eval steps (``distill.train_step``) are lowered with abstract inputs
(``ShapeDtypeStruct`` + ``NamedSharding``) on a mesh of the topology's abstract devices
(``jax.experimental.topologies``; libtpu must be installed, no TPU needed) and compiled by XLA's
TPU compiler. The compiled step reports per-chip memory and FLOPs, so a pod configuration is
proven to fit before it is launched, as MaxText's ``train_compile.py`` does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from cbd_jax.chain.checks import check_batch, link_steps, resolve_batches
from cbd_jax.checkpoints import hf_config
from cbd_jax.distill import train_step
from cbd_jax.model import decoder
from cbd_jax.model.config import ModelConfig, num_params
from cbd_jax.model.sharding import (
  batch_sharding,
  data_parallel_size,
  make_mesh,
  padded_rows,
  parse_rules,
  tree_shardings,
)

GIB = 1024 ** 3
# HBM per chip by the device kind the topology reports.
HBM_BYTES = {"TPU v4": 32 * GIB, "TPU v5 lite": 16 * GIB, "TPU v5": 95 * GIB,
             "TPU v6 lite": 32 * GIB}
# Chips per slice -> ICI topology, for the names Cloud TPU sells ("v5e-256", "v5p-128").
_TOPOLOGY_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_TOPOLOGY_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
                256: "4x8x8", 512: "8x8x8"}
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}

# config.json of the public checkpoints the shipped configs name, for machines without the hub.
_QWEN25 = dict(model_type="qwen2", vocab_size=151936, max_position_embeddings=32768,
               rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
               real_vocab_size=151665)
KNOWN_CONFIGS = {
    "Qwen/Qwen2.5-0.5B": dict(_QWEN25, num_hidden_layers=24, hidden_size=896,
                              num_attention_heads=14, num_key_value_heads=2,
                              intermediate_size=4864),
    "Qwen/Qwen2.5-1.5B": dict(_QWEN25, num_hidden_layers=28, hidden_size=1536,
                              num_attention_heads=12, num_key_value_heads=2,
                              intermediate_size=8960),
    "Qwen/Qwen2.5-3B": dict(_QWEN25, num_hidden_layers=36, hidden_size=2048,
                            num_attention_heads=16, num_key_value_heads=2,
                            intermediate_size=11008),
    "Qwen/Qwen2.5-7B": dict(_QWEN25, num_hidden_layers=28, hidden_size=3584,
                            num_attention_heads=28, num_key_value_heads=4,
                            intermediate_size=18944, vocab_size=152064,
                            tie_word_embeddings=False),
}


def topology_name(name: str) -> str:
  """'v5p-128' (Cloud TPU's name, cores for v4/v5p) or 'v5p:4x4x8' -> 'v5p:4x4x8'."""
  if ":" in name:
    return name
  m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name)
  if not m:
    raise ValueError(f"unknown TPU topology {name!r}; use e.g. v5e-256, v5p-128 or v5e:16x16")
  kind, chips = m.group(1), int(m.group(2)) // _CORES_PER_CHIP[m.group(1)]
  table = _TOPOLOGY_3D if kind in ("v4", "v5p") else _TOPOLOGY_2D
  if chips not in table:
    raise ValueError(f"{name}: no known topology for {chips} chips; pass it as {kind}:AxBxC")
  return f"{kind}:{table[chips]}"


def topology_devices(name: str, num_slices: int = 1) -> list:
  """The abstract TPU devices of ``num_slices`` slices of a topology (needs libtpu, no TPU)."""
  from jax.experimental import topologies

  # Compiling needs no TPU, so it need not hold libtpu's one-process lock (/tmp/libtpu_lockfile).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  full = topology_name(name)
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=full,
                                        chip_config_name="default",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=num_slices)
  except Exception as e:  # No libtpu, or a topology libtpu does not know: one line with the fix.
    raise ValueError(f"cannot describe TPU topology {full!r} ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:160]}); install libtpu with "
                     "pip install -e '.[tpu]' and check the name") from None
  return list(desc.devices)


def model_config(path: str, random_init=None) -> ModelConfig:
  """The ModelConfig of a checkpoint without reading its weights (folder, hub id or known id)."""
  local = Path(path).expanduser() / "config.json"
  if local.exists():
    return hf_config.from_hf_config(json.loads(local.read_text()), str(local))
  if random_init:
    spec = {k: v for k, v in dict(random_init).items() if k not in ("tokenizer_vocab", "seed")}
    real = int(random_init.tokenizer_vocab)
    return ModelConfig(vocab_size=-(-real // 64) * 64, real_vocab_size=real, **spec)
  if path in KNOWN_CONFIGS:
    return hf_config.from_hf_config(KNOWN_CONFIGS[path], path)
  try:
    import huggingface_hub

    file = huggingface_hub.hf_hub_download(path, "config.json")
    return hf_config.from_hf_config(json.loads(Path(file).read_text()), path)
  except Exception as e:
    raise ValueError(f"{path}: no config.json found ({type(e).__name__}); pass a local folder "
                     f"or one of {sorted(KNOWN_CONFIGS)}") from None


def link_models(config) -> list[tuple[Any, ModelConfig, ModelConfig]]:
  """(link, student, teacher) for every link, in compute dtypes, from shapes alone."""
  from cbd_jax.chain.driver import student_config

  teacher = model_config(str(config.source.path), config.source.get("random_init"))
  out = []
  for link in config.chain:
    student = model_config(link.init) if link.get("init") else student_config(link, teacher)
    remat = bool(link.get("remat"))
    t_dtype = link.get("teacher_dtype") or link.dtype
    out.append((link, student.replace(dtype=link.dtype, remat=remat),
                teacher.replace(dtype=t_dtype, remat=remat)))
    teacher = student
  return out


def _abstract(shapes: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying their shardings."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def chip_bytes(tree: Any) -> int:
  """Bytes one chip holds of a tree of sharded ShapeDtypeStructs (its largest shard per leaf)."""
  def one(leaf):
    shard = leaf.sharding.shard_shape(leaf.shape)
    return math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
  return sum(one(leaf) for leaf in jax.tree.leaves(tree))


def abstract_inputs(link, student: ModelConfig, teacher: ModelConfig, optimizer, mesh, rules,
                    eval_rows: int):
  """(state, teacher params, train batch [M, B, T], eval batch [E, T]) as sharded abstracts."""
  s_shapes = decoder.abstract_params(student)
  state_shapes = jax.eval_shape(lambda p: train_step.init_train_state(p, optimizer), s_shapes)
  state = _abstract(state_shapes, train_step.state_shardings(student, optimizer, mesh, rules))
  t_shapes = decoder.abstract_params(teacher, jnp.dtype(teacher.dtype))
  t_params = _abstract(t_shapes, tree_shardings(t_shapes, mesh, rules))
  m, b, t = int(link.microbatches), int(link.batch_size), int(link.seq_len)

  def batch(shape, leading):
    sh = batch_sharding(mesh, ndim=len(shape), leading=leading)
    return {"ids": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh),
            "labels": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh),
            "mask": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh)}
  return state, t_params, batch((m, b, t), 1), batch((eval_rows, t), 0)


@dataclasses.dataclass
class LinkReport:
  """Per-chip memory (bytes) and FLOPs of one link's compiled train step."""

  link: str
  mesh: dict[str, int]
  batch_size: int      # Sequences per microbatch, global (a per-device batch times the chips).
  tokens_per_chip: int
  params: int
  opt_state: int
  teacher: int
  temporaries: int
  total: int
  hbm: int
  flops: float         # XLA's count; a loop body (layers, microbatches, chunks) counts once.
  model_flops: float   # 6 N_student + 2 N_teacher per token (weight matmuls), for the whole step.
  attention: str       # "pallas" when the TPU flash kernel is in the compiled step, else "xla".
  fits: bool
  eval_fits: bool | None  # None when the eval step was not compiled.
  compile_s: float
  error: str = ""

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _compile(fn, args, mesh):
  """(compiled step or None, one-line error, seconds); traced under the mesh (activation rules)."""
  start = time.time()
  try:
    with jax.set_mesh(mesh):
      compiled = fn.lower(*args).compile()
    return compiled, "", time.time() - start
  except Exception as e:  # XLA reports HBM exhaustion as a compile error.
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "exceeds available" not in text:
      raise
    line = next((ln for ln in text.splitlines() if "exceeds" in ln or "RESOURCE" in ln), text)
    return None, line.strip()[:300], time.time() - start


def _exhausted_temporaries(error: str) -> int:
  """The temporaries XLA names in an out-of-memory error ('temporaries (21.7G)'), in bytes."""
  m = re.search(r"temporar\w*\s*\(?([\d.]+)\s*([KMGT])", error)
  if not m:
    return 0
  return int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)


def _memory(compiled) -> tuple[int, int]:
  """(temporaries, total) per chip from XLA's memory analysis; donated outputs counted once."""
  ma = compiled.memory_analysis()
  total = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
           + ma.temp_size_in_bytes + ma.generated_code_size_in_bytes)
  return int(ma.temp_size_in_bytes), int(total)


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def compile_link(config, link, student: ModelConfig, teacher: ModelConfig, mesh,
                 with_eval: bool = True) -> LinkReport:
  """Compiles one link's train (and eval) step on ``mesh``; per-chip memory, FLOPs and fit."""
  rules = parse_rules(config.get("sharding_rules"))
  dp = data_parallel_size(mesh)
  check_batch(link.batch_size, mesh, f"link {link.name}")
  optimizer, schedule = train_step.make_optimizer(total_steps=link_steps(link),
                                                  **dict(link.optimizer))
  loss = train_step.LossSettings(**dict(link.loss))
  state, t_params, batch, eval_batch = abstract_inputs(
      link, student, teacher, optimizer, mesh, rules, padded_rows(config.eval.batch_size, mesh))
  step = train_step.make_train_step(student, teacher, optimizer=optimizer, loss=loss, mesh=mesh,
                                    rules=rules, schedule=schedule)
  evaluate = train_step.make_eval_step(student, teacher, loss=loss, mesh=mesh, rules=rules)
  compiled, error, seconds = _compile(step, (state, t_params, batch), mesh)
  e_compiled, e_error, e_seconds = (_compile(evaluate, (state.params, t_params, eval_batch), mesh)
                                    if with_eval else (None, "", 0.0))
  hbm = HBM_BYTES.get(mesh.devices.flat[0].device_kind, 0)
  temporaries, total = _memory(compiled) if compiled else (_exhausted_temporaries(error), 0)
  e_total = _memory(e_compiled)[1] if e_compiled else 0
  tokens = int(link.batch_size) * int(link.seq_len) // dp
  per_token = 6 * num_params(student) + 2 * num_params(teacher)
  model_flops = per_token * tokens * int(link.microbatches)
  pallas = bool(compiled) and "tpu_custom_call" in compiled.as_text()
  return LinkReport(
      link=link.name, mesh=dict(mesh.shape), batch_size=int(link.batch_size),
      tokens_per_chip=tokens,
      params=chip_bytes(state.params), opt_state=chip_bytes(state.opt_state),
      teacher=chip_bytes(t_params), temporaries=temporaries, total=total, hbm=hbm,
      flops=_flops(compiled) if compiled else 0.0, model_flops=float(model_flops),
      attention="pallas" if pallas else "xla",
      fits=bool(compiled) and (not hbm or total <= hbm),
      eval_fits=(bool(e_compiled) and (not hbm or e_total <= hbm)) if with_eval else None,
      compile_s=round(seconds + e_seconds, 1), error=error or e_error)


def suggestion(report: LinkReport, link) -> str:
  """One line: the first change likely to make a link fit (remat, smaller microbatch, mesh)."""
  mesh, b, m = report.mesh, report.batch_size, int(link.microbatches)
  per_chip = b // max(mesh.get("data", 1) * mesh.get("fsdp", 1), 1)
  if not link.get("remat"):
    return "turn on rematerialisation: --remat=true"
  if per_chip > 1:
    return (f"halve the microbatch, keep the tokens per step: --batch={b // 2} "
            f"--microbatches={2 * m}")
  if mesh.get("data", 1) > 1:
    return "shard params and optimizer state over every chip: --mesh=data=1,fsdp=-1,tensor=1"
  return ("split heads and FFN over chips as well: --mesh=data=1,fsdp=-1,tensor=2 "
          "(or use a larger topology, or a shorter --seq_len)")


def compile_chain(config, topology: str, num_slices: int = 1, link: str = "",
                  with_eval: bool = True) -> list[LinkReport]:
  """Compiles every link (or the one named ``link``) for ``num_slices`` slices of a topology; a
  per-device batch counts every chip of them."""
  devices = topology_devices(topology, num_slices)
  config = resolve_batches(config, len(devices))
  mesh = make_mesh(dict(config.mesh), devices)
  models = link_models(config)
  if link:
    names = [lk.name for lk, _, _ in models]
    if link not in names:
      raise ValueError(f"no link named {link!r}; the config's links are {names}")
    models = [m for m in models if m[0].name == link]
  return [compile_link(config, lk, student, teacher, mesh, with_eval)
          for lk, student, teacher in models]


def format_reports(reports: list[LinkReport]) -> str:
  """A table: one row per link; memory in GiB per chip, model TFLOPs per chip and step."""
  head = (f"{'link':<16} {'mesh':<22} {'tok/chip':>8} {'params':>7} {'opt':>7} {'teacher':>7} "
          f"{'temp':>7} {'total':>7} {'HBM':>5} {'TFLOP':>6} {'attn':>6} {'fits':>4} "
          f"{'compile':>7}")
  rows = [head]
  for r in reports:
    mesh = ",".join(f"{k}={v}" for k, v in r.mesh.items())
    gib = lambda x: f"{x / GIB:7.2f}"
    rows.append(f"{r.link:<16} {mesh:<22} {r.tokens_per_chip:>8} {gib(r.params)} "
                f"{gib(r.opt_state)} {gib(r.teacher)} {gib(r.temporaries)} {gib(r.total)} "
                f"{r.hbm / GIB:5.0f} {r.model_flops / 1e12:6.1f} {r.attention:>6} "
                f"{'yes' if r.fits and r.eval_fits is not False else 'NO':>4} "
                f"{r.compile_s:6.0f}s")
  return "\n".join(rows)
