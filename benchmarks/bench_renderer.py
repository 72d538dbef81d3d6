"""Frames per second of the procedural renderer (one process, NumPy) at 64x64 and 128x128.

Usage: python benchmarks/bench_renderer.py [--frames 64] [--repeats 3] [--objects 2]
Times ``render_views`` alone (scene and trajectory are built once, outside the timing) and
the whole ``render_clip`` (layout + planning + rendering).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from data_pipelines.procedural import add_moving_objects, build_scene, make_trajectory, render_clip, render_views
from mirage_jax import geometry
from mirage_jax.errors import InputError, run_cli


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--frames", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--objects", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if args.frames < 2:
    raise InputError("--frames", "frames", f"need at least 2, got {args.frames}")
  if args.repeats < 1:
    raise InputError("--repeats", "repeats", f"need at least 1, got {args.repeats}")

  scene = build_scene(args.seed)
  poses = make_trajectory(np.random.default_rng(args.seed), scene, "loop", args.frames)
  scene = add_moving_objects(np.random.default_rng(args.seed), scene, poses, args.objects, 10.0)
  t = np.arange(args.frames) / 10.0
  print(f"scene: {len(scene.box_lo)} boxes, {len(scene.cyl_r)} pillars, {len(scene.objects)} moving objects, "
        f"{args.frames} frames per call")
  for size in (64, 128):
    K = np.repeat(geometry.intrinsics_from_fov(75.0, size, size)[None], args.frames, 0)
    render_views(scene, K[:2], poses[:2], size, size, t[:2])   # warm-up
    best = np.inf
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      render_views(scene, K, poses, size, size, t)
      best = min(best, time.perf_counter() - t0)
    clip_best = np.inf
    for r in range(args.repeats):
      t0 = time.perf_counter()
      render_clip(args.seed + r, args.frames, size, size, trajectory="random", moving_objects=args.objects)
      clip_best = min(clip_best, time.perf_counter() - t0)
    print(f"{size}x{size}: render_views {args.frames / best:7.1f} frames/s | "
          f"render_clip (layout+trajectory+render) {args.frames / clip_best:7.1f} frames/s")
  return 0


if __name__ == "__main__":
  run_cli(main)
