"""Step time and input bytes per step: float32 frames without prefetch vs uint8 + prefetch.

  python benchmarks/bench_prefetch.py [--steps=60] [--stage=autoencoder] [--pairs=7]

Runs the real training loop (``training.loop.train_and_evaluate``) on the tiny config with random
posed clips held in memory, and reports per setting the ``step_time_s`` and ``data_wait_s`` (mean
of the logged intervals after the first: compilation excluded), and the bytes of one global
batch as it crosses to the devices. The settings' runs alternate (``benchmarks/timing.py``,
self-timed: each run reports its own mean step time; ``--warmup`` discarded rounds, ``--pairs``
kept), so the step times are medians over runs and each ratio to float32 comes with its IQR.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # pylint: disable=g-import-not-at-top,wrong-import-position
_PAIRS, _WARMUP = timing.define_absl_flags(pairs=7, warmup=0)
SETTINGS = {"float32": ("float32", 0), "uint8": ("uint8", 0), "uint8 + prefetch 2": ("uint8", 2)}


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
  runs = {name: [] for name in SETTINGS}

  def side(name):
    def one_run():
      runs[name].append(run(*SETTINGS[name], _STEPS.value))
      return runs[name][-1]["step_time_s"]
    return one_run

  result = timing.compare({name: side(name) for name in SETTINGS}, pairs=_PAIRS.value,
                          warmup=_WARMUP.value, baseline="float32", self_timed=True,
                          label=f"tiny {_STAGE.value} step, {_STEPS.value} steps per run")
  for name, rows in runs.items():
    kept = rows[_WARMUP.value:]
    row = {**kept[-1], "step_time_s": result.median_s(name),
           "data_wait_s": float(np.median([r["data_wait_s"] for r in kept])), "runs": len(kept)}
    if name != "float32":
      r = result.ratio(name)
      row.update(ratio_to_float32=r.median, iqr=list(r.iqr), verdict=r.verdict)
    print(json.dumps(row), flush=True)
  print(result.format(), flush=True)


if __name__ == "__main__":
  app.run(main)
