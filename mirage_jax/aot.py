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
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mirage_jax.errors import InputError, parse_flags, run_cli

_CONFIG = None  # defined in main() so importing this module defines no flags

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


def compile_report(config: ml_collections.ConfigDict, topology: str,
                   num_slices: int = 1) -> dict[str, Any]:
  """Lowers and compiles the train step of ``config`` on ``topology``; returns the report.

  Returns:
    dict with devices, mesh, params, per-device memory (bytes, fraction of HBM, fits),
    per-device FLOPs (XLA and analytic), and roofline step time / MFU estimates.
  """
  from mirage_jax import train  # pylint: disable=g-import-not-at-top
  from mirage_jax.models import autoencoder  # pylint: disable=g-import-not-at-top
  devices = topology_devices(topology, num_slices)
  mesh = train.build_mesh(config, devices)
  frozen = None
  if config.stage == "denoiser" and config.denoiser.model.get("family") == "wan":
    frozen = "abstract"  # the frozen Wan base: shapes only, FSDP-sharded (WanStage)
  elif config.stage == "denoiser":
    # Shapes only: the frozen autoencoder is an input of the step, never materialised here.
    ae = nnx.eval_shape(lambda: autoencoder.Autoencoder(config.autoencoder, nnx.Rngs(0)))
    frozen = nnx.state(ae, nnx.Param).to_pure_dict()
  stage = train.make_stage(config, frozen=frozen)
  setup = train.make_setup(config, stage, mesh)
  batch = train.abstract_batch(config, stage, mesh, setup.rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  frozen_sharding = setup.frozen_sharding()
  if isinstance(frozen_sharding, NamedSharding):
    frozen_sharding = jax.tree.map(lambda _: replicated, stage.frozen)
  frozen_abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), stage.frozen,
      frozen_sharding)
  step = train.make_train_step(config, stage, setup, {k: v.sharding for k, v in batch.items()})
  with setup.context():
    compiled = step.lower(setup.abstract, batch, frozen_abstract).compile()
    # Matmul FLOPs the step really runs (backward and remat recompute included, scans times
    # their length): what the chip must execute, beside the model's own FLOPs.
    executed = train.jaxpr_flops(step, setup.abstract, batch, frozen_abstract)
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
  return {
      "topology": topology, "num_slices": num_slices, "devices": n,
      "mesh": {k: int(v) for k, v in mesh.shape.items()}, "stage": config.stage,
      "params": int(params), "global_batch": config.data.batch_size,
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
  report = compile_report(_CONFIG.value, flags.FLAGS.topology, flags.FLAGS.num_slices)
  print(json.dumps(report, indent=2))
  if not report["fits"]:
    print(f"does not fit: {report['memory_per_device_gib']:.1f} GiB per device > "
          f"{report['hbm_per_device_gib']} GiB HBM")
    return 1
  return 0


def main(argv) -> None:
  del argv
  run_cli(_main)


if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
  flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:8x8, v5p:4x4x4.", required=True)
  flags.DEFINE_integer("num_slices", 1, "Slices (multi-slice over DCN; set config.dcn_mesh).")
  app.run(main, flags_parser=parse_flags)
