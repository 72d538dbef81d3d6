"""Compiles the real train step for a TPU topology on this host (no TPU needed) and reports it.

  python -m mirage_jax.aot --config=experiments/pod_v5p_128.py:denoiser --topology=v5p:4x4x4

Uses libtpu's compiler through ``jax.experimental.topologies`` (``pip install -e .[tpu]``).
Reports per-device memory (against the chip's HBM), per-device FLOPs (XLA's cost analysis,
the model's analytic count, and the matmul FLOPs the step executes: backward and remat
recompute included), and a roofline estimate of the step time and MFU:
``time >= max(executed FLOPs / peak, bytes accessed / HBM bandwidth)`` per device, so the MFU
printed (analytic FLOPs / peak / time) is an upper bound: communication is not modelled.
XLA's cost analysis counts a scanned layer stack's body once, so with ``scan_layers`` its
FLOPs and bytes undercount.

Several processes (``jax.distributed``, the flags of ``mirage_jax.main``, e.g. a command
run on every worker of a pod): process 0 compiles, prints the report and writes the
executable; the others wait for it and exit with its status.

Compile once, reuse: ``--save_executable=FILE`` also serialises the compiled step, which a
run of the same config on that topology loads instead of compiling
(``--config.train.executable=FILE``; ``training.executables.load_executable`` checks config,
mesh, devices and JAX version first). Independently, every entry point that calls
``training.executables.enable_compilation_cache`` keeps its compiled executables in JAX's
persistent cache.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import jax
import ml_collections
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec

from mirage_jax import distributed, paths
from mirage_jax.errors import InputError, run_app
from mirage_jax.training import executables
from mirage_jax.training.flops import jaxpr_flops
from mirage_jax.training.inputs import abstract_batch
from mirage_jax.training.mesh import build_mesh
from mirage_jax.training.step import make_setup, make_stage, make_train_step

_CONFIG = None  # defined in main() so importing this module defines no flags
_INIT_DISTRIBUTED = None  # likewise (mirage_jax.distributed.define_flags)

# Per chip: (HBM GiB, dense bf16 TFLOP/s, HBM GB/s); topology name prefix -> spec.
CHIPS = {
    "v4": (32.0, 275.0, 1200.0),
    "v5e": (16.0, 197.0, 819.0),
    "v5p": (95.0, 459.0, 2765.0),
    "v6e": (32.0, 918.0, 1640.0),
}


def topology_devices(topology: str, num_slices: int = 1) -> list[Any]:
  """Devices of a TPU topology like ``v5e:2x2`` (compile-only; needs libtpu)."""
  # Compile-only: no chip is opened, so other processes holding libtpu's lock do not matter.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  chip = topology.split(":")[0]
  if chip not in CHIPS:
    raise InputError("--topology", "topology", f"unknown chip {chip!r}; known: {sorted(CHIPS)}")
  try:
    desc = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                        num_slices=num_slices)
  except Exception as e:  # libtpu missing, or a name libtpu does not know
    raise InputError("--topology", "topology", f"cannot describe {topology!r}: {e}") from None
  return list(desc.devices)


# ----------------------------------------------------------------------------- report


@contextlib.contextmanager
def _without_compilation_cache():
  """Compiles inside bypass JAX's persistent cache (no read, no write).

  An executable that JAX loaded from its persistent cache serialises into a file that cannot
  be loaded again on CPU ("Function ..._fusion not found"): its fused kernels are missing.
  So a step that is going to be saved is always compiled afresh.
  """
  before = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", before)


def compile_train_step(config: ml_collections.ConfigDict, devices: list[Any],
                       for_saving: bool = False) -> dict[str, Any]:
  """Lowers and compiles the train step of ``config`` for ``devices`` (a topology's, or real).

  ``for_saving``: compile without the persistent compilation cache, so that
  ``executables.save_executable`` writes a loadable file.

  Returns:
    dict: ``compiled`` (jax.stages.Compiled), ``step`` (the jitted function), ``args``
    (abstract state, batch, frozen), ``stage``, ``setup``, ``mesh``, ``key``
    (``executables.executable_key``).
  """
  mesh = build_mesh(config, devices)
  # Shapes only: the frozen params are an input of the step, never materialised here.
  stage = make_stage(config, frozen="abstract")
  setup = make_setup(config, stage, mesh)
  batch = abstract_batch(config, stage, mesh, setup.rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  frozen_sharding = setup.frozen_sharding()
  if isinstance(frozen_sharding, NamedSharding):
    frozen_sharding = jax.tree.map(lambda _: replicated, stage.frozen)
  frozen_abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), stage.frozen,
      frozen_sharding)
  step = make_train_step(config, stage, setup, {k: v.sharding for k, v in batch.items()})
  cache = _without_compilation_cache() if for_saving else contextlib.nullcontext()
  with setup.context(), cache:
    compiled = step.lower(setup.abstract, batch, frozen_abstract).compile()
  return {"compiled": compiled, "step": step, "args": (setup.abstract, batch, frozen_abstract),
          "stage": stage, "setup": setup, "mesh": mesh,
          "key": executables.executable_key(config, list(mesh.devices.flat), dict(mesh.shape))}


def compile_report(config: ml_collections.ConfigDict, topology: str,
                   num_slices: int = 1, save_executable_to: str | None = None) -> dict[str, Any]:
  """Lowers and compiles the train step of ``config`` on ``topology``; returns the report.

  Args:
    save_executable_to: also serialise the compiled step there
      (``executables.save_executable``).
  Returns:
    dict with devices, mesh, params, per-device memory (bytes, fraction of HBM, fits),
    per-device FLOPs (XLA and analytic), and roofline step time / MFU estimates.
  """
  devices = topology_devices(topology, num_slices)
  built = compile_train_step(config, devices, for_saving=save_executable_to is not None)
  compiled, step, setup, stage = built["compiled"], built["step"], built["setup"], built["stage"]
  mesh, args = built["mesh"], built["args"]
  with setup.context():
    # Matmul FLOPs the step really runs (backward and remat recompute included, scans times
    # their length): what the chip must execute, beside the model's own FLOPs.
    executed = jaxpr_flops(step.jitted, *args, step.abstract_total)
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hbm_gib, peak_tflops, hbm_gbs = CHIPS[topology.split(":")[0]]
  per_device_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                      - mem.alias_size_in_bytes + mem.temp_size_in_bytes
                      + mem.generated_code_size_in_bytes)
  n = len(devices)
  analytic = stage.step_flops(config.data.batch_size) / n
  xla_flops = float(cost.get("flops", 0.0))
  bytes_accessed = float(cost.get("bytes accessed", 0.0))
  # XLA's cost analysis counts a while loop's body once (scanned layers), so compute time
  # comes from the executed count; bytes accessed has the same undercount (a lower bound).
  time_s = max(executed / n / (peak_tflops * 1e12), bytes_accessed / (hbm_gbs * 1e9))
  params = sum(x.size for x in jax.tree.leaves(setup.abstract["params"]))
  saved = {}
  if save_executable_to:
    saved = {"executable": save_executable_to,
             "executable_bytes": executables.save_executable(compiled, save_executable_to, built["key"])}
  return {
      **saved, "topology": topology, "num_slices": num_slices, "devices": n,
      "mesh": {k: int(v) for k, v in mesh.shape.items()}, "stage": config.stage,
      "params": int(params), "global_batch": config.data.batch_size,
      # models/attention.py; 'auto' compiles the Pallas splash kernel for TPU.
      "attention": (config.denoiser.model if config.stage == "denoiser"
                    else config.autoencoder).get("attention", "auto"),
      "frames": config.data.num_frames, "resolution": list(config.data.resolution),
      "memory_per_device_gib": per_device_bytes / 2**30,
      "memory_breakdown_gib": {
          "arguments": mem.argument_size_in_bytes / 2**30,
          "outputs_not_aliased": (mem.output_size_in_bytes - mem.alias_size_in_bytes) / 2**30,
          "temporaries": mem.temp_size_in_bytes / 2**30},
      "hbm_per_device_gib": hbm_gib, "fits": per_device_bytes <= hbm_gib * 2**30,
      "xla_tflops_per_device": xla_flops / 1e12, "analytic_tflops_per_device": analytic / 1e12,
      "executed_tflops_per_device": executed / n / 1e12,
      "bytes_accessed_per_device_gb": bytes_accessed / 1e9,
      "roofline_step_time_s": time_s,
      "roofline_mfu": analytic / (peak_tflops * 1e12) / time_s if time_s > 0 else 0.0,
  }


def _main() -> int:
  if _CONFIG.value is None:
    raise InputError("--config", "config", "required (e.g. experiments/pod_v5p_128.py)")
  # Written under a temporary name and renamed into place (see mirage_jax.atomic).
  paths.require_local(flags.FLAGS.save_executable, "--save_executable",
                      "write it locally, then copy it up")
  _INIT_DISTRIBUTED()
  executables.enable_compilation_cache(_CONFIG.value.get("compilation_cache_dir"))
  # Compiling against a topology needs no other process: process 0 alone compiles and writes.
  report = distributed.on_process_zero(lambda: compile_report(
      _CONFIG.value, flags.FLAGS.topology, flags.FLAGS.num_slices,
      flags.FLAGS.save_executable), "aot: compiled")
  if jax.process_index() == 0:
    print(json.dumps(report, indent=2))
  if not report["fits"]:
    if jax.process_index() == 0:
      print(f"does not fit: {report['memory_per_device_gib']:.1f} GiB per device > "
            f"{report['hbm_per_device_gib']} GiB HBM")
    return 1
  return 0


if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _INIT_DISTRIBUTED = distributed.define_flags()
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
  flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:8x8, v5p:4x4x4.", required=True)
  flags.DEFINE_integer("num_slices", 1, "Slices (multi-slice over DCN; set config.dcn_mesh).")
  flags.DEFINE_string("save_executable", None, "Also write the compiled train step here; a "
                      "run on that topology loads it with --config.train.executable=FILE.")
  run_app(_main)
