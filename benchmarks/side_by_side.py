"""Re-measure every side-by-side row of BENCHMARKS.md, one benchmark after another.

  python benchmarks/side_by_side.py --list            # the commands, with the section each feeds
  python benchmarks/side_by_side.py --all             # run them all (about an hour on 2 cores)
  python benchmarks/side_by_side.py --only=wan_dit,wan_vae [--log=side_by_side.log]

Each benchmark compares its sides interleaved in one process (``benchmarks/timing.py``) and
prints the median per-pair ratio with its IQR, the load average, the cores, the commit and the
date. Run it on a quiet machine: before each command the load average and the cores busy
with other work over 3 s (``/proc/stat``; the load average still counts the previous
benchmark for a minute after it ends) are printed, with a warning when other work keeps more
than a quarter of a core busy (the numbers then say more about the other processes than
about the code). The output of every command is also appended to
``--log``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, BENCHMARKS.md section it feeds, command). Order: cheapest first.
COMMANDS = (
    ("wan_dit", "CPU forward time against diffusers (DiT, tiny: 576 tokens)",
     "python benchmarks/bench_wan_dit.py"),
    ("wan_dit_medium", "CPU forward time against diffusers (DiT, medium: 2,304 tokens)",
     "python benchmarks/bench_wan_dit.py --height 32 --width 32"),
    ("wan_dit_vace", "CPU forward time against diffusers (DiT + VACE)",
     "python benchmarks/bench_wan_dit.py --vace"),
    ("wan_vae", "CPU forward time against diffusers (VAE 9 x 64 x 96)",
     "python benchmarks/bench_wan_vae.py"),
    ("wan_vae_medium", "CPU forward time against diffusers (VAE 9 x 128 x 192)",
     "python benchmarks/bench_wan_vae.py --height 128 --width 192"),
    ("memory", "Latent spatial memory (mirage vs voxel time per chunk)",
     "python benchmarks/bench_memory.py"),
    ("eval_batched", "Batched evaluation (small family)",
     "python -m benchmarks.bench_eval_batched"),
    ("eval_batched_equal", "Batched evaluation (small family, 8 x 33)",
     "python -m benchmarks.bench_eval_batched --lengths=33,33,33,33,33,33,33,33"),
    ("eval_batched_short", "Batched evaluation (small family, 5 ... 12, 2 steps)",
     "python -m benchmarks.bench_eval_batched --steps=2 --lengths=5,6,7,8,9,10,11,12"),
    ("wan_batched", "Wan rollout batched",
     "python -m benchmarks.bench_eval_batched --family=wan --backend=mirage --steps=2 "
     "--lengths=9,14,18,21,25,29,33,40"),
    ("wan_batched_equal", "Wan rollout batched (8 x 33)",
     "python -m benchmarks.bench_eval_batched --family=wan --backend=mirage --steps=2 "
     "--lengths=33,33,33,33,33,33,33,33"),
    ("wan_batched_20", "Wan rollout batched (20 sampler steps)",
     "python -m benchmarks.bench_eval_batched --family=wan --backend=mirage --steps=20 "
     "--lengths=9,14,18,21,25,29,33,40"),
    ("train_knobs", "Training step knobs", "python benchmarks/bench_train_knobs.py --steps=30"),
    ("wan_precision", "Training step: Wan precision",
     "python benchmarks/bench_wan_precision.py --steps=30"),
    ("prefetch", "uint8 frames and device prefetch",
     "python benchmarks/bench_prefetch.py --steps=30"),
)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  what = parser.add_mutually_exclusive_group(required=True)
  what.add_argument("--list", action="store_true", help="print the commands and exit")
  what.add_argument("--all", action="store_true", help="run every command")
  what.add_argument("--only", help="comma-separated names (see --list)")
  parser.add_argument("--log", default="side_by_side.log", help="output appended here")
  args = parser.parse_args()
  names = [n for n, _, _ in COMMANDS]
  if args.list:
    for name, section, command in COMMANDS:
      print(f"{name:20s} {command}\n{'':20s}   -> BENCHMARKS.md: {section}")
    return 0
  chosen = names if args.all else [n.strip() for n in args.only.split(",") if n.strip()]
  unknown = sorted(set(chosen) - set(names))
  if unknown or not chosen:
    parser.error(f"unknown names {unknown}; known: {', '.join(names)}")
  # This checkout's mirage_jax first (a script run as benchmarks/x.py would otherwise import
  # whichever checkout is installed).
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
             PYTHONPATH=os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH")))))
  failed = []
  with open(args.log, "a", encoding="utf-8") as log:
    for name, section, command in COMMANDS:
      if name not in chosen:
        continue
      busy = timing.busy_cores()
      m = timing.machine()
      busy_text = "unknown" if busy is None else f"{busy:.2f}"
      head = (f"\n=== {name}: {command}\n    (BENCHMARKS.md: {section}; load "
              f"{'/'.join(f'{x:.2f}' for x in m['load'])}, cores busy with other work "
              f"{busy_text} of {m['cores']}, commit {m['commit']}, {m['date']})")
      if busy is not None and busy > 0.25:
        head += "\n    WARNING: the machine is not quiet; these numbers are measured under load"
      print(head, flush=True)
      log.write(head + "\n")
      t0 = time.perf_counter()
      argv = shlex.split(command)
      argv[0] = sys.executable  # the interpreter running this script
      proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
      for line in proc.stdout:
        sys.stdout.write(line)
        log.write(line)
      rc = proc.wait()
      tail = f"=== {name}: exit {rc}, {time.perf_counter() - t0:.0f} s"
      print(tail, flush=True)
      log.write(tail + "\n")
      if rc:
        failed.append(name)
  if failed:
    print(f"failed: {', '.join(failed)}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
