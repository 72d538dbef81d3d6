"""Input pipeline throughput: batches/s and clips/s through Grain at the tiny config's shape.

Source: an in-memory list of synthetic clips (random frames, positive depth, a camera going out
and back so revisit windows exist), 64x64 and 64 frames each. Each batch is 8 windows of 8
frames at stride 2, resized and cropped to 32x32. Measures the steady state: the first batch
(worker start-up, first reads) is timed separately.

  python -m benchmarks.bench_input --batches=50 --worker_counts=0,2
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import numpy as np

from data_pipelines import pipeline
from mirage_jax import geometry
from mirage_jax.errors import InputError, run_cli

_BATCHES = flags.DEFINE_integer("batches", 50, "Batches timed per setting (after the first).")
_CLIPS = flags.DEFINE_integer("clips", 16, "Synthetic clips in the in-memory source.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Runs per setting; the best is reported (shared CPUs).")
_WORKER_COUNTS = flags.DEFINE_list("worker_counts", ["0", "2"], "Worker process counts to time.")


def synthetic_clip(seed: int, frames: int = 64, size: int = 64) -> dict[str, np.ndarray]:
  """A 64-frame clip dict whose camera slides 3 m sideways and back every 16 frames."""
  rng = np.random.default_rng(seed)
  xs = 3.0 * (1.0 - np.abs((np.arange(frames) % 16) - 8) / 8)
  return dict(
      frames=rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8),
      depths=rng.uniform(0.5, 8.0, (frames, size, size)).astype(np.float32),
      intrinsics=np.stack([geometry.intrinsics_from_fov(60.0, size, size)] * frames),
      poses_c2w=np.stack([geometry.look_at((x, 0.0, 0.0), (x, 0.0, 1.0)) for x in xs]),
      fps=np.float32(10.0),
      dynamic_masks=np.zeros((frames, size, size), np.uint8))


def time_pipeline(source, batches: int, **kwargs) -> tuple[float, float]:
  """(seconds to the first batch, steady-state batches/s over ``batches`` more)."""
  start = time.perf_counter()
  iterator = pipeline.make_iterator(source, **kwargs)
  try:
    next(iterator)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
      next(iterator)
    return first, batches / (time.perf_counter() - start)
  finally:
    iterator.close()


def main(argv: list[str]) -> int:
  """Times each worker count with and without require_revisit and prints a table."""
  if len(argv) > 1:
    raise InputError("command line", "arguments", f"unexpected {argv[1:]} (all options are --flags)")
  for flag in (_BATCHES, _REPEATS, _CLIPS):
    if flag.value < 1:
      raise InputError(f"--{flag.name}", flag.name, f"expected >= 1, got {flag.value}")
  try:
    worker_counts = [int(w) for w in _WORKER_COUNTS.value]
  except ValueError as e:
    raise InputError("--worker_counts", "worker_counts", str(e)) from None
  source = [synthetic_clip(i) for i in range(_CLIPS.value)]
  base = dict(num_frames=8, stride=2, resolution=(32, 32), batch_size=8, seed=0,
              shard_index=0, shard_count=1, crop="random")
  print(f"source: {len(source)} clips of 64x64x64; batch 8 x 8 frames at 32x32")
  print(f"{'workers':>7} {'revisit':>7} {'first batch s':>13} {'batches/s':>9} {'clips/s':>8}")
  for workers in worker_counts:
    for require_revisit in (False, True):
      runs = [time_pipeline(source, _BATCHES.value, worker_count=workers,
                            require_revisit=require_revisit, **base)
              for _ in range(_REPEATS.value)]
      first, rate = min(r[0] for r in runs), max(r[1] for r in runs)
      print(f"{workers:>7} {str(require_revisit):>7} {first:>13.2f} {rate:>9.1f} "
            f"{rate * base['batch_size']:>8.1f}")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: run_cli(lambda: main(argv)))
