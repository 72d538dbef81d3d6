"""Clips per second of the ``reference_samples`` builder (the reference's sample folders).

Usage: python benchmarks/bench_reference_samples.py [--clips 4] [--frames 81] [--height 352]
    [--width 640] [--workers 1] [--keep DIR]

Writes ``--clips`` sample folders as the reference's pipeline leaves them (libx264 yuv420p
clip.mp4, half-float EXR depth with holes, {inds, data} poses and intrinsics, PNG masks, a
caption), then times ``data_pipelines.build`` of the ``reference_samples`` dataset on Beam's
DirectRunner with ``--workers`` processes (1: in process) and the reader alone
(``read_sample_folder``, one process). Prints seconds per clip and clips per second per worker.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from data_pipelines import build, sample_folders
from mirage_jax import geometry
from mirage_jax.errors import InputError, run_cli


def synthetic_folder_clip(seed: int, t: int, h: int, w: int) -> dict:
  """A smooth moving picture (compresses like video), depth 1..5 m with a sky hole on top."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  frames = np.stack([np.stack([128 + 100 * np.sin((xx + 3 * i) / 17.0 + c) * np.cos(yy / 23.0)
                               for c in (0.0, 1.0, 2.0)], -1) for i in range(t)]).astype(np.uint8)
  depths = np.broadcast_to(1.0 + 4.0 * yy / h, (t, h, w)).astype(np.float16).astype(np.float32)
  valid = np.ones((t, h, w), np.uint8)
  valid[:, : h // 5] = 0  # sky
  dyn = np.zeros((t, h, w), np.uint8)
  dyn[:, h // 2: h // 2 + h // 8, w // 3: w // 3 + w // 8] = 1
  c2w = np.stack([geometry.look_at([0.05 * i, 0, 0], [0.05 * i + 0.1 * rng.normal(), 0, 1],
                                   up=(0, -1, 0)) for i in range(t)])
  K = np.broadcast_to(geometry.intrinsics_from_fov(60.0, h, w), (t, 3, 3))
  return dict(frames=frames, depths=depths, depth_valid=valid, dynamic_masks=dyn,
              intrinsics=K, poses_c2w=c2w, fps=np.float32(16.0), caption=f"clip {seed}")


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--clips", type=int, default=4)
  parser.add_argument("--frames", type=int, default=81)
  parser.add_argument("--height", type=int, default=352)
  parser.add_argument("--width", type=int, default=640)
  parser.add_argument("--workers", type=int, default=1)
  parser.add_argument("--keep", default="", help="Folder to build in (default: a temporary one).")
  args = parser.parse_args()
  if min(args.clips, args.frames, args.height, args.width, args.workers) < 1:
    raise InputError("command line", "sizes", "every size must be >= 1")
  root = args.keep or tempfile.mkdtemp(prefix="bench_reference_samples.")
  source = os.path.join(root, "samples")
  start = time.perf_counter()
  for i in range(args.clips):
    sample_folders.write_sample_folder(
        os.path.join(source, f"{i:08d}"), synthetic_folder_clip(i, args.frames, args.height, args.width),
        lossless=False)
  print(f"wrote {args.clips} folders of {args.frames}x{args.height}x{args.width} in "
        f"{time.perf_counter() - start:.1f} s under {source}")
  start = time.perf_counter()
  sample_folders.read_sample_folder(os.path.join(source, "00000000"))
  read = time.perf_counter() - start
  print(f"read_sample_folder: {read:.2f} s per clip")
  runner = dict(beam_runner="DirectRunner", beam_options=[
      f"direct_num_workers={args.workers}", "direct_running_mode=multi_processing"]) if args.workers > 1 else {}
  start = time.perf_counter()
  build.build("reference_samples", os.path.join(root, "data"), source_dir=source, num_clips=0, **runner)
  seconds = time.perf_counter() - start
  print(f"build: {args.clips} clips in {seconds:.1f} s on {args.workers} worker(s): "
        f"{seconds * args.workers / args.clips:.2f} worker-seconds per clip, "
        f"{args.clips / seconds / args.workers:.3f} clips/s per worker")
  return 0


if __name__ == "__main__":
  raise SystemExit(run_cli(main))
