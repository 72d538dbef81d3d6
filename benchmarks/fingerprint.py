"""Behaviour fingerprint: hashes of everything a reduced run of both families produces.

A refactor that claims "behaviour unchanged" runs this before and after and compares:

  python benchmarks/fingerprint.py --workdir=/tmp/fp_before > before.txt
  ... change the code ...
  python benchmarks/fingerprint.py --workdir=/tmp/fp_after > after.txt
  diff before.txt after.txt

It drives only the command-line tools (``mirage_jax.main_job`` for both families, then
``mirage_jax.evaluate`` with a trajectory batch and ``mirage_jax.generate``), so it runs
unchanged on either side of a change to the library's modules. Printed, one line each: a
SHA-256 of every exported parameter tree, of every training run's per-step losses, of every
evaluation's numbers (timings and paths left out) and of the frames of every generated video.
Same seeds, same machine: equal hashes mean bit-identical outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Fields that measure time or name files: they differ between any two runs.
_VOLATILE = ("second", "time", "wall", "path", "command", "date", "eta", "tflops", "mfu",
             "data_wait", "step_s", "hbm", "host", "dir", "config")


def _run(*args: str) -> None:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  print("+", " ".join(args), file=sys.stderr, flush=True)
  subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, check=True,
                 stdout=sys.stderr)


def _numbers(node, prefix="", workdir=""):
  """(key path, value) of every number and string leaf not named volatile; strings with
  ``workdir`` in them hold it as ``<workdir>`` (two runs differ only in where they ran)."""
  if isinstance(node, dict):
    for k in sorted(node):
      if not any(v in k.lower() for v in _VOLATILE):
        yield from _numbers(node[k], f"{prefix}/{k}", workdir)
  elif isinstance(node, (list, tuple)):
    for i, x in enumerate(node):
      yield from _numbers(x, f"{prefix}[{i}]", workdir)
  elif isinstance(node, str):
    yield prefix, node.replace(workdir, "<workdir>") if workdir else node
  elif isinstance(node, (int, float, bool)) or node is None:
    yield prefix, node


def _digest(items) -> str:
  h = hashlib.sha256()
  for item in items:
    h.update(repr(item).encode() if not isinstance(item, np.ndarray) else
             (str(item.dtype) + str(item.shape)).encode() + np.ascontiguousarray(item).tobytes())
  return h.hexdigest()[:16]


def _params(export_dir: str) -> str:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.restore(os.path.abspath(os.path.join(export_dir, "params")))
  flat = []

  def walk(prefix, node):
    if isinstance(node, dict):
      for k in sorted(node):
        walk(f"{prefix}/{k}", node[k])
    else:
      flat.append((prefix, np.asarray(node)))
  walk("", tree)
  return _digest([x for kv in flat for x in kv])


def _losses(metrics_jsonl: str) -> str:
  rows = [json.loads(line) for line in open(metrics_jsonl)]
  keep = [(r["step"], sorted((k, v) for k, v in r.items()
                             if "loss" in k and not any(x in k for x in _VOLATILE)))
          for r in rows]
  return _digest(keep)


def _video(path: str) -> str:
  import imageio.v2 as imageio  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  with imageio.get_reader(path, format="FFMPEG") as reader:
    for frame in reader:
      h.update(np.ascontiguousarray(frame).tobytes())
  return h.hexdigest()[:16]


def fingerprint(workdir: str) -> list[str]:
  """One ``name hash`` line per output under ``workdir``, sorted."""
  lines = []
  for d, _, files in os.walk(workdir):
    rel = os.path.relpath(d, workdir)
    for f in files:
      p = os.path.join(d, f)
      if f == "config.json" and os.path.isdir(os.path.join(d, "params")):
        lines.append(f"params {rel} {_params(d)}")
      elif f == "metrics.jsonl":
        lines.append(f"losses {rel} {_losses(p)}")
      elif f.endswith(".json") and f != "config.json" and "eval" in rel or f == "metrics.json":
        with open(p) as fh:
          try:
            data = json.load(fh)
          except ValueError:
            continue
        lines.append(f"numbers {os.path.join(rel, f)} {_digest(list(_numbers(data, workdir=workdir)))}")
      elif f.endswith(".npz") and ("generate" in rel or "eval" in rel):
        with np.load(p) as z:
          lines.append(f"arrays {os.path.join(rel, f)} "
                       f"{_digest([x for k in sorted(z.files) for x in (k, z[k])])}")
      elif f.endswith(".mp4"):
        lines.append(f"video {os.path.join(rel, f)} {_video(p)}")
  return sorted(set(lines))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--skip_runs", action="store_true", help="only hash what is there")
  args = parser.parse_args()
  w = os.path.abspath(args.workdir)
  small, wan = os.path.join(w, "small"), os.path.join(w, "wan")
  if not args.skip_runs:
    _run("mirage_jax.main_job", f"--workdir={small}", "--autoencoder_steps=20",
         "--denoiser_steps=20", "--num_trajectories=2", "--num_frames=20", "--lengths=20",
         "--object_trajectories=1", "--backends=none,mirage,voxel,frame_bank,rgb_points")
    dn = os.path.join(small, "denoiser_export")
    _run("mirage_jax.evaluate", f"--output_dir={os.path.join(small, 'eval_batched')}",
         "--benchmark=revisit", f"--checkpoint={dn}", "--backends=mirage,voxel",
         "--procedural_seeds=100000:100002", "--num_frames=20", "--trajectory_batch=2")
    geometry = os.path.join(w, "geometry.npz")
    if not os.path.exists(geometry):
      sys.path.insert(0, ROOT)
      from data_pipelines import files, procedural  # pylint: disable=g-import-not-at-top
      files.save_geometry_npz(geometry, procedural.render_clip(7, 37, 64, 64, trajectory="loop"))
    _run("mirage_jax.generate", f"--checkpoint={dn}", f"--geometry_path={geometry}",
         f"--output_dir={os.path.join(small, 'generate')}", "--memory=voxel")
    _run("mirage_jax.main_job", "--family=wan", f"--workdir={wan}", "--denoiser_steps=4",
         "--wan_clips=4", "--num_trajectories=2", "--num_frames=37", "--wan_sampler_steps=2",
         "--backends=none,mirage,voxel")
    wdn = os.path.join(wan, "denoiser_export")
    _run("mirage_jax.evaluate", f"--output_dir={os.path.join(wan, 'eval_batched')}",
         "--benchmark=revisit", f"--checkpoint={wdn}", "--backends=mirage,voxel",
         "--procedural_seeds=100000:100002", "--num_frames=37", "--trajectory_batch=2")
    _run("mirage_jax.generate", f"--checkpoint={wdn}", f"--geometry_path={geometry}",
         f"--output_dir={os.path.join(wan, 'generate')}", "--memory=mirage")
  print("\n".join(fingerprint(w)))


if __name__ == "__main__":
  main()
