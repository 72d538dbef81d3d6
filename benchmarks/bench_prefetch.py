"""Step time and input bytes per step: float32 frames without prefetch vs uint8 + prefetch.

  python benchmarks/bench_prefetch.py [--steps=60] [--stage=autoencoder]

Runs the real training loop (``training.loop.train_and_evaluate``) on the tiny config with random
posed clips held in memory, once per setting, and reports the mean ``step_time_s`` and
``data_wait_s`` of the logged intervals after the first (compilation excluded), and the
bytes of one global batch as it crosses to the devices.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top
from absl import app, flags, logging  # pylint: disable=g-import-not-at-top

from experiments import tiny_cpu  # pylint: disable=g-import-not-at-top
from mirage_jax import geometry  # pylint: disable=g-import-not-at-top
from mirage_jax.training import inputs as inputs_lib  # pylint: disable=g-import-not-at-top
from mirage_jax.training import loop as loop_lib  # pylint: disable=g-import-not-at-top
from mirage_jax.training import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
from mirage_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top

_STEPS = flags.DEFINE_integer("steps", 60, "Training steps per setting.")
_STAGE = flags.DEFINE_string("stage", "autoencoder", "autoencoder (no frozen model needed).")


def random_clips(n: int, frames: int = 24, size: int = 32) -> list[dict]:
  rng = np.random.default_rng(0)
  K = geometry.intrinsics_from_fov(60.0, size, size)
  clips = []
  for i in range(n):
    angles = np.linspace(0.0, 0.8, frames) + i
    poses = np.stack([geometry.look_at([2 * np.cos(a), 0.2, 2 * np.sin(a)], [0, 0, 0])
                      for a in angles]).astype(np.float32)
    clips.append(dict(frames=rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8),
                      depths=rng.uniform(1.0, 3.0, (frames, size, size)).astype(np.float32),
                      intrinsics=np.repeat(K[None], frames, 0), poses_c2w=poses,
                      fps=np.float32(10)))
  return clips


def run(frames_dtype: str, prefetch: int, steps: int) -> dict:
  config = tiny_cpu.get_config(_STAGE.value)
  config.data.frames_dtype = frames_dtype
  config.train.update(steps=steps, log_every=max(steps // 3, 1), prefetch=prefetch,
                      tensorboard=False)
  config.checkpoint.every = 0
  stage = step_lib.make_stage(config)
  mesh = mesh_lib.build_mesh(config)
  specs = inputs_lib.abstract_batch(config, stage, mesh, mesh_lib.logical_rules(config))
  nbytes = sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in specs.values())
  clips = random_clips(32)
  with tempfile.TemporaryDirectory() as workdir:
    loop_lib.train_and_evaluate(config, workdir, {"train": clips, "validation": clips[:2]})
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f][1:]  # the first interval follows compilation
  return {"frames_dtype": frames_dtype, "prefetch": prefetch, "input_bytes_per_step": nbytes,
          "step_time_s": float(np.mean([r["step_time_s"] for r in rows])),
          "data_wait_s": float(np.mean([r["data_wait_s"] for r in rows]))}


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  for frames_dtype, depth in (("float32", 0), ("uint8", 0), ("uint8", 2)):
    print(json.dumps(run(frames_dtype, depth, _STEPS.value)), flush=True)


if __name__ == "__main__":
  app.run(main)
