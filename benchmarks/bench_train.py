"""Train-step benchmark: CPU step time and MFU (tiny_cpu, base), AOT memory/FLOPs (pod configs).

  python benchmarks/bench_train.py --part=cpu            # tiny_cpu and base, this host's CPU
  python benchmarks/bench_train.py --part=aot            # pod configs vs their TPU topology

MFU on CPU is measured against the best float32 matmul throughput measured in the same run
(``training.flops.measure_matmul_tflops``), so it says how close the step comes to this machine's own
matmul peak. Prints one JSON line per case.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

_PART = flags.DEFINE_enum("part", "cpu", ["cpu", "aot"], "What to benchmark.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per CPU case (after one warm-up).")

# CPU cases: (config module, stage, overrides). base is cut to a batch a CPU can step.
CPU_CASES = [
    ("tiny_cpu", "autoencoder", {}),
    ("tiny_cpu", "denoiser", {}),
    ("base", "autoencoder", {"data.batch_size": 2}),
    ("base", "denoiser", {"data.batch_size": 1}),
]
AOT_CASES = [
    ("pod_v5p_128", "autoencoder", "v5p:4x4x4"),
    ("pod_v5p_128", "denoiser", "v5p:4x4x4"),
    ("pod_v5e_256", "autoencoder", "v5e:16x16"),
    ("pod_v5e_256", "denoiser", "v5e:16x16"),
]


def _config(name: str, stage: str, overrides: dict):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"experiments.{name}").get_config(stage)
  for key, value in overrides.items():
    *path, last = key.split(".")
    node = config
    for p in path:
      node = node[p]
    node[last] = value
  return config


def synthetic_batch(specs: dict) -> dict:
  """Valid random inputs of the given global shapes (cameras on an arc around the origin)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mirage_jax import geometry  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  b, t, h, w = specs["depths"].shape
  angles = np.linspace(0.0, 1.0, t)
  poses = np.stack([geometry.look_at([2 * np.cos(a), 0.2, 2 * np.sin(a)], [0, 0, 0])
                    for a in angles]).astype(np.float32)
  values = {
      "frames": rng.uniform(-1, 1, (b, t, h, w, 3)).astype(np.float32),
      "depths": rng.uniform(1, 3, (b, t, h, w)).astype(np.float32),
      "intrinsics": np.broadcast_to(geometry.intrinsics_from_fov(60.0, h, w), (b, t, 3, 3)),
      "poses_c2w": np.broadcast_to(poses, (b, t, 4, 4)),
      "dynamic_masks": np.zeros((b, t, h, w), np.uint8),
      "depth_valid": np.ones((b, t, h, w), np.uint8),
  }
  return {k: jax.device_put(np.ascontiguousarray(values[k]), s.sharding)
          for k, s in specs.items()}


class Stepper:
  """One training case, stepped one step per call (the unit :func:`timing.compare` times).

  ``first_s``: the first step's seconds (compilation included); ``metrics``: the last step's.
  """

  def __init__(self, setup, step, state, batch, frozen):
    import jax  # pylint: disable=g-import-not-at-top
    self._setup, self._step, self.state, self._batch, self._frozen = (setup, step, state,
                                                                     batch, frozen)
    t0 = time.perf_counter()
    self()
    jax.block_until_ready(self.metrics)
    self.first_s = time.perf_counter() - t0

  def __call__(self):
    """One step on the same batch; returns its metrics (JAX arrays, not waited for)."""
    with self._setup.context():
      self.state, self.metrics = self._step(self.state, self._batch, self._frozen)
    return self.metrics


def time_steps(setup, step, state, batch, frozen, steps: int):
  """Runs ``step`` once (compile + first step), then ``steps`` more on the same batch.

  Returns:
    (first step seconds, mean seconds of the timed steps, the last state, its metrics).
  """
  import jax  # pylint: disable=g-import-not-at-top
  stepper = Stepper(setup, step, state, batch, frozen)
  t0 = time.perf_counter()
  for _ in range(steps):
    stepper()
  jax.block_until_ready(stepper.metrics)
  return stepper.first_s, (time.perf_counter() - t0) / steps, stepper.state, stepper.metrics


def prepare_cpu(name: str, stage_name: str, overrides: dict):
  """(stepper, report): a compiled :class:`Stepper` for a CPU case, and
  ``report(step_seconds, peak)`` -> the case's JSON fields at that step time."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  from mirage_jax.families.small import autoencoder  # pylint: disable=g-import-not-at-top
  from mirage_jax.training import inputs as inputs_lib  # pylint: disable=g-import-not-at-top
  from mirage_jax.training import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from mirage_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  config = _config(name, stage_name, overrides)
  mesh = mesh_lib.build_mesh(config)
  frozen = None
  if stage_name == "denoiser":  # random weights: the step's cost does not depend on them
    ae = autoencoder.Autoencoder(config.autoencoder, nnx.Rngs(0))
    frozen = nnx.state(ae, nnx.Param).to_pure_dict()
  stage = step_lib.make_stage(config, frozen=frozen)
  setup = step_lib.make_setup(config, stage, mesh)
  state = step_lib.init_state(config, stage, setup)
  specs = inputs_lib.abstract_batch(config, stage, mesh, setup.rules)
  batch = synthetic_batch(specs)
  frozen = jax.device_put(stage.frozen, NamedSharding(mesh, PartitionSpec()))
  step = step_lib.make_train_step(config, stage, setup, {k: v.sharding for k, v in specs.items()})
  stepper = Stepper(setup, step, state, batch, frozen)
  flops = stage.step_flops(config.data.batch_size)
  params = sum(x.size for x in jax.tree.leaves(stepper.state["params"]))

  def report(seconds: float, peak: float) -> dict:
    return {"case": f"{name}:{stage_name}", "devices": jax.device_count(),
            "params_m": params / 1e6, "batch": config.data.batch_size,
            "frames": config.data.num_frames, "resolution": list(config.data.resolution),
            "first_step_s": stepper.first_s, "step_s": seconds,
            "examples_per_s": config.data.batch_size / seconds,
            "step_tflop": flops / 1e12, "tflops_per_s": flops / seconds / 1e12,
            "matmul_peak_tflops": peak, "mfu": flops / seconds / 1e12 / peak,
            "loss": float(stepper.metrics["loss"])}
  return stepper, report


def bench_cpu(name: str, stage_name: str, overrides: dict, steps: int, peak: float) -> dict:
  """One case alone: mean step time over ``steps`` steps after the first."""
  import jax  # pylint: disable=g-import-not-at-top
  stepper, report = prepare_cpu(name, stage_name, overrides)
  t0 = time.perf_counter()
  for _ in range(steps):
    stepper()
  jax.block_until_ready(stepper.metrics)
  return report((time.perf_counter() - t0) / steps, peak)


def main(argv) -> None:
  del argv
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if _PART.value == "cpu":
    from mirage_jax.training import flops as flops_lib  # pylint: disable=g-import-not-at-top
    peak = max(flops_lib.measure_matmul_tflops(2048) for _ in range(2))
    print(json.dumps({"matmul_peak_tflops": peak}), flush=True)
    for name, stage, overrides in CPU_CASES:
      print(json.dumps(bench_cpu(name, stage, overrides, _STEPS.value, peak)), flush=True)
  else:
    from mirage_jax import aot  # pylint: disable=g-import-not-at-top
    for name, stage, topology in AOT_CASES:
      t0 = time.perf_counter()
      report = aot.compile_report(_config(name, stage, {}), topology)
      report.update(case=f"{name}:{stage}", compile_s=time.perf_counter() - t0)
      print(json.dumps(report), flush=True)


if __name__ == "__main__":
  app.run(main)
