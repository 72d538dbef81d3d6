"""RealEstate10K reconstruction: generate each clip's frames from its first frame and cameras,
score them against the real frames.

  python -m mirage_jax.evaluate_re10k --checkpoint=EXPORT --depth_model=DEPTH_EXPORT \\
      --clips=re10k/test --output_dir=out/re10k [--num_frames=25] [--stride=1] [--num_clips=N] \\
      [--lpips_backbone=alexnet-owt-7be5be79.pth]

``--clips``: a RealEstate10K camera file (``<id>.txt``, frames in ``<id>/<timestamp>.png`` or a
video beside it; ``data_pipelines.files.load_re10k``) or a folder searched for them. The
protocol is ``evaluation/reconstruction.py``: frame 0 given, frames 1..T-1 generated along
the clip's cameras and scored by PSNR / SSIM (and LPIPS with ``--lpips_backbone``: README,
"LPIPS"). RealEstate10K has no depth: frame 0's (and, for the Wan family, every new
frame's) comes from the Depth Anything export ``--depth_model``.

Outputs in ``--output_dir`` (refused if non-empty unless ``--overwrite``):

  metrics.json       per clip: psnr, ssim, lpips (null without weights), frames, per-frame
                     lists; summary: means over clips; the protocol's settings;
  metrics.md         the same as a table (one row per clip, then the mean);
  videos/<clip>.mp4  generated | real, side by side.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from absl import flags

from mirage_jax import depth, paths
from mirage_jax.evaluation import lpips
from mirage_jax.errors import InputError, run_app

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Denoiser export (python -m mirage_jax.export).")
_AUTOENCODER = flags.DEFINE_string("autoencoder", None,
                                   "Autoencoder export (default: the one the denoiser was trained with).")
_CLIPS = flags.DEFINE_string("clips", None, "A RealEstate10K camera file or a folder of them.")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where the scores go.")
_NUM_FRAMES = flags.DEFINE_integer("num_frames", 25, "Frames per clip, frame 0 included.")
_STRIDE = flags.DEFINE_integer("stride", 1, "Take every stride-th frame of the clip.")
_NUM_CLIPS = flags.DEFINE_integer("num_clips", None, "Clips to evaluate (default all).")
_MEMORY = flags.DEFINE_string("memory", None, "Memory backend (default: the training config's).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (every clip).")
_VIDEOS = flags.DEFINE_bool("videos", True, "Write generated | real videos.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the outputs in a non-empty --output_dir.")
_DEPTH_OPTIONS = depth.define_flags()
_LPIPS = lpips.define_flags()


def _main() -> int:
  for flag in (_CHECKPOINT, _CLIPS, _OUTPUT):
    if not flag.value:
      raise InputError(f"--{flag.name}", flag.name, "required")
  for flag in (_CLIPS, _OUTPUT):
    paths.require_local(flag.value, f"--{flag.name}", "copy it to a local disk first")
  if _NUM_FRAMES.value < 2:
    raise InputError("--num_frames", "num_frames", f"need at least 2, got {_NUM_FRAMES.value}")
  from data_pipelines import files  # pylint: disable=g-import-not-at-top
  from mirage_jax import checkpoint, families, memory, rollout  # pylint: disable=g-import-not-at-top
  from mirage_jax.evaluation import reconstruction, report, revisit, video  # pylint: disable=g-import-not-at-top

  source = Path(_CLIPS.value)
  found = [source] if source.is_file() else [p for p in files.find_clips(source) if p.suffix == ".txt"]
  found = found[:_NUM_CLIPS.value]
  if not found:
    raise InputError(_CLIPS.value, "clips", "no RealEstate10K camera file (*.txt) there")
  if _STRIDE.value < 1:
    raise InputError("--stride", "stride", f"must be >= 1, got {_STRIDE.value}")
  lpips_scorer = _LPIPS.load()  # bad weight files are refused before the model loads
  paths.check_reachable(_CHECKPOINT.value, "--checkpoint")
  config = families.upgrade(checkpoint.export_config(_CHECKPOINT.value))
  wm = families.world_model(config)
  if _MEMORY.value is not None and _MEMORY.value not in memory.BACKEND_NAMES:
    raise InputError("--memory", "memory", f"unknown backend {_MEMORY.value!r}")
  depth_opts = _DEPTH_OPTIONS(wm)
  if depth_opts.estimator != "depth_anything":
    raise InputError("--depth_model", "depth_model", "RealEstate10K carries no depth: give a "
                     "Depth Anything V2 export (python -m mirage_jax.convert_depth)")
  paths.check_reachable(depth_opts.model, "--depth_model")
  revisit.prepare_output_dir(_OUTPUT.value, _OVERWRITE.value)

  config, ae, dn = rollout.load_world_model(_CHECKPOINT.value, _AUTOENCODER.value)
  backend = _MEMORY.value or config.memory.backend
  rollouts = {}  # trajectory length -> Rollout (compiled once per length)
  results = {}
  root = source if source.is_dir() else source.parent
  for path in found:
    name = str(Path(files.clip_name(path, root)).with_suffix(""))
    clip = reconstruction.select_frames(files.load_re10k(path), _NUM_FRAMES.value, _STRIDE.value)
    fitted = revisit.fit_clip(clip, config.data.resolution)
    t = len(fitted["poses_c2w"])
    if t < 2:
      raise InputError(path, "frames", f"{t} frame(s) after --stride={_STRIDE.value}; need 2")
    if t not in rollouts:
      rollouts[t] = rollout.make_rollout(config, ae, dn, backend=backend, depth=depth_opts,
                                         **memory.capacity_for(backend, t, wm.memory_config(config)))
    out = rollouts[t].generate(fitted["frames"][0], None, fitted["intrinsics"],
                               fitted["poses_c2w"], seed=_SEED.value, progress=False)
    generated = np.asarray(out["frames"])
    results[name] = dict(frames=t, **reconstruction.score_clip(generated, fitted["frames"],
                                                               lpips_scorer))
    if _VIDEOS.value:
      os.makedirs(os.path.join(_OUTPUT.value, "videos"), exist_ok=True)
      video.write_mp4(os.path.join(_OUTPUT.value, "videos", f"{name.replace('/', '_')}.mp4"),
                      video.side_by_side([generated, fitted["frames"]]), fps=8.0)
    print(f"{name}: psnr {results[name]['psnr']:.2f} ssim {results[name]['ssim']:.3f}", flush=True)
  summary = reconstruction.summarize(results)
  report.write_metrics_json(os.path.join(_OUTPUT.value, "metrics.json"), dict(
      benchmark="re10k_reconstruction", checkpoint=_CHECKPOINT.value, clips_source=_CLIPS.value,
      backend=backend, num_frames=_NUM_FRAMES.value, stride=_STRIDE.value, seed=_SEED.value,
      resolution=list(config.data.resolution), depth_model=depth_opts.model,
      lpips=lpips_scorer.describe() if lpips_scorer else None, scored="frames 1..T-1 (frame 0 given)",
      summary=summary, clips=results))
  table = report.format_table(lpips.table_rows(reconstruction.table_rows(results, summary),
                                              reconstruction.TABLE_COLUMNS, lpips_scorer),
                              reconstruction.TABLE_COLUMNS, ".3f")
  with report.atomic_output(os.path.join(_OUTPUT.value, "metrics.md")) as tmp:
    with open(tmp, "w") as f:
      f.write(table + "\n")
  print(table)
  return 0


if __name__ == "__main__":
  run_app(_main)
