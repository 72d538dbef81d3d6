r"""Clips per second per worker of data_pipelines.cut_clips at the reference's clip size.

  python benchmarks/bench_cut_clips.py [--videos=4 --seconds=11 --fps=60 --size=720x1280]

Makes ``--videos`` synthetic sources (ffmpeg's ``testsrc2``: moving colour patterns, H.264,
``--size`` at ``--fps`` for ``--seconds``; the defaults are SpatialVID-HQ's typical clip:
720p, median 59.94 fps, mean ~11.5 s), then cuts each into one 81-frame 704x1280 16 fps clip
in this process (one worker: ``raw_videos.process_video``, as a Beam worker runs it) and prints
the time per clip, its parts (probe, decode, encode of clip.mp4 and train_target_rgb.mp4) and
the CPU time of the ffmpeg processes per clip (the figure to scale by on a loaded machine).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipelines import raw_videos  # pylint: disable=wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--videos", type=int, default=4)
  parser.add_argument("--seconds", type=float, default=11.0)
  parser.add_argument("--fps", type=float, default=60.0)
  parser.add_argument("--size", default="720x1280")
  args = parser.parse_args()
  h, w = raw_videos.parse_size(args.size)
  root = tempfile.mkdtemp(prefix="bench_cut_")
  try:
    src, out = os.path.join(root, "videos"), os.path.join(root, "clips")
    os.makedirs(src)
    os.makedirs(out)
    for i in range(args.videos):
      subprocess.run([raw_videos._ffmpeg(), "-v", "error", "-f", "lavfi", "-i",  # pylint: disable=protected-access
                      f"testsrc2=size={w}x{h}:rate={args.fps}", "-t", str(args.seconds),
                      "-vf", f"hue=h={37 * i}", "-c:v", "libx264", "-preset", "veryfast",
                      "-pix_fmt", "yuv420p", os.path.join(src, f"v{i}.mp4")], check=True)
    s = raw_videos.CutSettings()
    parts = {"probe": 0.0, "decode": 0.0, "encode": 0.0}
    cpu_parts = dict.fromkeys(parts, 0.0)

    def children_cpu() -> float:
      r = resource.getrusage(resource.RUSAGE_CHILDREN)
      return r.ru_utime + r.ru_stime

    timed = {name: getattr(raw_videos, name) for name in parts}

    def timer(name):
      def run(*a, **k):
        t, c = time.perf_counter(), children_cpu()
        try:
          return timed[name](*a, **k)
        finally:
          parts[name] += time.perf_counter() - t
          cpu_parts[name] += children_cpu() - c
      return run

    for name in parts:
      setattr(raw_videos, name, timer(name))
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    outcomes = [raw_videos.process_video((f"{i:08d}", f"v{i}.mp4"), src, out, s)
                for i in range(args.videos)]
    total = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)  # the ffmpeg processes
    assert all(o["status"] == "written" for o in outcomes), outcomes
    n = args.videos
    print(f"{n} clips of {s.frames}x{s.height}x{s.width} at {s.fps} fps from {args.size} "
          f"{args.fps:g} fps {args.seconds:g} s sources: {total / n:.2f} s per clip, "
          f"{n / total:.3f} clips/s/worker; per clip: " +
          ", ".join(f"{k} {v / n:.2f} s" for k, v in parts.items()) +
          f"; ffmpeg CPU time per clip {cpu / n:.2f} s (" +
          ", ".join(f"{k} {v / n:.2f} s" for k, v in cpu_parts.items()) + ")")
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
