"""What estimated depth costs the memory: revisit quality with four sources of written depth.

One memory model (a small-family export), one memory backend, the same held-out loops and
seeds; only where the depth written into the memory comes from changes:

  (a) given         the dataset's true depth of every frame (the upper bound);
  (b) decoder       the model's own RGB-D decoder (the small family's default);
  (c) aligned       a Depth Anything V2 export, fitted to the memory's depth (and to frame
                    0's given depth) inside the chunk step;
  (d) unaligned     the same export's raw metric output.

Each row is one ``python -m mirage_jax.evaluate --benchmark=revisit`` run (the command line a
user runs), sequentially on the same machine. Printed per row: revisit PSNR (mean and the
per-loop difference to (a), min..max over loops) and the abs-rel of the written depth
against the truth (frames after the first). The loss from (a) to (c) is what a user of real
depth weights pays for not having the future's depth.

  python benchmarks/bench_depth_alignment.py --checkpoint=runs/tiny/denoiser_export \\
      --depth_model=runs/depth/export --procedural_seeds=100000:100008 --num_trajectories=8
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Small-family denoiser export.", required=True)
_DEPTH_MODEL = flags.DEFINE_string("depth_model", None, "Depth Anything V2 export (metric).",
                                   required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Built datasets (held-out split: --split).")
_SEEDS = flags.DEFINE_string("procedural_seeds", None, "Held-out procedural loops a:b instead "
                             "of a dataset (what make main's revisit table runs).")
_SPLIT = flags.DEFINE_string("split", "test", "Dataset split.")
_NUM = flags.DEFINE_integer("num_trajectories", 8, "Held-out loops.")
_FRAMES = flags.DEFINE_integer("num_frames", 48, "Frames per procedural loop (make main's 48).")
_BACKEND = flags.DEFINE_string("backend", "voxel", "Memory backend.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUT = flags.DEFINE_string("output_dir", None, "Keep each row's report here (default: temp).")

ROWS = (("(a) given", ["--depth_estimator=given"]),
        ("(b) decoder", ["--depth_estimator=decoder"]),
        ("(c) aligned", ["--depth_estimator=depth_anything", "--depth_align"]),
        ("(d) unaligned", ["--depth_estimator=depth_anything", "--nodepth_align"]))


def _run(row_flags: list[str], out: str) -> dict:
  args = [sys.executable, "-m", "mirage_jax.evaluate", "--benchmark=revisit",
          f"--checkpoint={_CHECKPOINT.value}", f"--num_trajectories={_NUM.value}",
          *([f"--procedural_seeds={_SEEDS.value}", f"--num_frames={_FRAMES.value}"] if _SEEDS.value else
            [f"--data_dir={_DATA_DIR.value}", f"--split={_SPLIT.value}"]),
          f"--backends={_BACKEND.value}", "--nooracle", "--nocomposite", "--novideos",
          f"--seed={_SEED.value}", f"--output_dir={out}", *row_flags]
  if any("depth_anything" in f for f in row_flags):
    args.append(f"--depth_model={_DEPTH_MODEL.value}")
  subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
  with open(os.path.join(out, "metrics.json")) as f:
    return json.load(f)["revisit"]


def _per_loop(result: dict, key: str) -> np.ndarray:
  return np.array([np.nan if t["rows"][_BACKEND.value].get(key) is None
                   else t["rows"][_BACKEND.value][key]
                   for _, t in sorted(result["trajectories"].items())], np.float64)


def main(argv) -> None:
  del argv
  if not (_DATA_DIR.value or _SEEDS.value):
    raise app.UsageError("give --data_dir or --procedural_seeds")
  root = _OUT.value or tempfile.mkdtemp(prefix="bench_depth_alignment_")
  results, seconds = {}, {}
  for name, row_flags in ROWS:
    t0 = time.perf_counter()
    results[name] = _run(row_flags, os.path.join(root, name.split()[0].strip("()")))
    seconds[name] = time.perf_counter() - t0
    print(f"{name}: done in {seconds[name]:.0f} s", flush=True)
  base = _per_loop(results[ROWS[0][0]], "psnr_revisit")
  print(f"\n{_NUM.value} held-out loops, backend {_BACKEND.value}, seed {_SEED.value}\n")
  print("| depth written | revisit PSNR (dB) | minus (a), per loop: mean [min, max] | "
        "depth abs-rel |")
  print("|---|---|---|---|")
  for name, _ in ROWS:
    psnr = _per_loop(results[name], "psnr_revisit")
    diff = psnr - base
    ok = np.isfinite(diff)
    absrel = np.nanmean(_per_loop(results[name], "depth_abs_rel"))
    spread = (f"{np.mean(diff[ok]):+.2f} [{np.min(diff[ok]):+.2f}, {np.max(diff[ok]):+.2f}]"
              if ok.any() else "n/a")
    print(f"| {name} | {np.nanmean(psnr):.2f} | {spread} | {absrel:.3f} |")
  print(f"\nreports under {root}")


if __name__ == "__main__":
  app.run(main)
