"""Wan DiT precision policy on the tiny Wan family: CPU step time and loss.

  python benchmarks/bench_wan_precision.py --steps=20

``experiments/mirage_wan22_5b.py:tiny`` (random frozen base, VACE trained), one random
latent batch repeated, this host's default devices; cases ``denoiser.model.precision`` =
f32, f32_residual, bf16. The cases are built and compiled first, then stepped interleaved
(``benchmarks/timing.py``: one step of each per round, ``--warmup`` rounds discarded, ``--steps``
kept). Prints one JSON line per case: compile (first step) time, median step time, its median
per-round ratio to the first case with the IQR, the last step's loss; then the summary.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # pylint: disable=g-import-not-at-top,wrong-import-position
import timing  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.FLAGS.set_default("steps", 20)  # bench_train's --steps: kept interleaved rounds
_WARMUP = flags.DEFINE_integer("warmup", 2, timing.WARMUP_HELP)
_CASES = flags.DEFINE_list("cases", ["f32", "f32_residual", "bf16"], "Precision policies.")


def _batch(stage, specs):
  """Random latents, unit-ish depths, cameras stepping sideways (the memory reads something)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  b, f = specs["intrinsics"].shape[:2]
  h, w = stage.latent_hw
  c2w = np.broadcast_to(np.eye(4, dtype=np.float32), (b, f, 4, 4)).copy()
  c2w[:, :, 0, 3] = np.linspace(0.0, 0.3, f)
  values = {"depths": rng.uniform(1.0, 3.0, (b, f, h, w)), "static_masks": np.ones((b, f, h, w)),
            "intrinsics": np.broadcast_to(np.array([[16.0 * w, 0, 8.0 * w], [0, 16.0 * w, 8.0 * h],
                                                    [0, 0, 1]]), (b, f, 3, 3)),
            "poses_c2w": c2w, "has_text": np.ones((b,))}
  out = {}
  for k, s in specs.items():
    x = values.get(k, rng.normal(size=s.shape) if s.size else np.zeros(s.shape))
    out[k] = jax.device_put(np.ascontiguousarray(np.asarray(x).astype(s.dtype)), s.sharding)
  return out


def prepare(precision: str) -> bench_train.Stepper:
  """A compiled one-step-per-call stepper for the tiny Wan denoiser at ``precision``."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from experiments import mirage_wan22_5b  # pylint: disable=g-import-not-at-top
  from mirage_jax.families.wan import stages as wan_stage  # pylint: disable=g-import-not-at-top
  from mirage_jax.training import inputs as inputs_lib  # pylint: disable=g-import-not-at-top
  from mirage_jax.training import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from mirage_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  config = mirage_wan22_5b.get_config("tiny")
  config.denoiser.model.precision = precision
  config.mesh = dict(data=-1, fsdp=1, context=1, tensor=1)  # whatever this host has
  stage = wan_stage.WanStage(config, "abstract")
  model = stage.build(nnx.Rngs(0))  # random base: the step's cost does not depend on it
  _, _, rest = nnx.split(model, stage.trainable, ...)
  frozen = {"base": rest.to_pure_dict(),
            **{k: jnp.zeros(v.shape, v.dtype) for k, v in stage.frozen.items() if k != "base"}}
  stage.frozen = frozen
  mesh = mesh_lib.build_mesh(config)
  setup = step_lib.make_setup(config, stage, mesh)
  state = step_lib.init_state(config, stage, setup)
  specs = inputs_lib.abstract_batch(config, stage, mesh, setup.rules)
  batch = _batch(stage, specs)
  frozen = jax.device_put(frozen, setup.frozen_sharding())
  step = step_lib.make_train_step(config, stage, setup, {k: v.sharding for k, v in specs.items()})
  stepper = bench_train.Stepper(setup, step, state, batch, frozen)
  stepper.info = {"devices": jax.device_count(), "batch": config.data.batch_size}
  return stepper


def main(argv) -> None:
  del argv
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  steppers = {p: prepare(p) for p in _CASES.value}
  if len(steppers) < 2:
    raise app.UsageError(f"--cases needs at least two policies, got {_CASES.value}")
  result = timing.compare(dict(steppers), pairs=flags.FLAGS.steps, warmup=_WARMUP.value,
                          baseline=_CASES.value[0], label="tiny Wan denoiser step")
  for p, stepper in steppers.items():
    row = {"precision": p, **stepper.info, "first_step_s": round(stepper.first_s, 2),
           "step_s": round(result.median_s(p), 4), "loss": float(stepper.metrics["loss"])}
    if p != result.baseline:
      r = result.ratio(p)
      row.update(ratio=round(r.median, 3), over=r.baseline, iqr=[round(x, 3) for x in r.iqr],
                 verdict=r.verdict)
    print(json.dumps(row), flush=True)
  print(result.format(), flush=True)


if __name__ == "__main__":
  app.run(main)
