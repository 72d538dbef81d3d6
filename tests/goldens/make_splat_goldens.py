"""Writes ``tests/goldens/mirage_splat.npz``: the reference's LatentPointCloud on one of our clips.

The oracle for the ``mirage`` memory backend is the reference's ``LatentPointCloud``
(``src/mirage/latent_point_cloud.py`` of microsoft/LatentSpatialMemory). This script is run BY
HAND (never at test time) against a local checkout, on CPU, in float32:

  git clone https://github.com/microsoft/LatentSpatialMemory /tmp/lsm_ref_splat
  git -C /tmp/lsm_ref_splat checkout b2cd7383140ca0e11cbb0bc9594a7c8286b6a427  # the goldens' reference_commit
  .venv/bin/python tests/goldens/make_splat_goldens.py \\
      --reference=/tmp/lsm_ref_splat --output=tests/goldens/mirage_splat.npz

It imports (never copies) ``mirage.latent_point_cloud`` (module-level imports: numpy, torch,
PIL only; nothing is stubbed) and calls it the way the reference's callers do:
``LatentPointCloud.from_geometry`` for the first written frame (as training and the start of
inference do), ``update`` for the others (as inference does after each chunk), then
``project`` per target camera with intrinsics rescaled to the latent grid by multiplying
fx, cx by w/W and fy, cy by h/H (``scale_intrinsics_to_hw`` / ``scale_intrinsics`` in the
callers; done here in float32 with the same four multiplications).

Inputs: a held-out posed clip in OUR format (``data_pipelines/clip.py``), rendered by the
procedural generator (seed 7, loop trajectory: ~1.75 m of translation and ~22 degrees of yaw
out and back, 2 moving objects), at 192x256 with a 12x16 latent grid (stride 16, as Wan2.2's
VAE), and random latents (16 channels). Written frames 0, 4, 8, 12, 16 (the reference's
latent-to-frame pairing for a 17-frame chunk); read at 8 target frames, one of them written
(8), two between written ones (2, 14) and five on the way back, never written (18..32), plus
4 poses off the trajectory (``EXTRA_TARGETS``: turned 20-30 degrees away, stepped 1 m in,
stepped 1.5 m back, so coverage is partial, holey, or decided by the z-buffer). The
exclusion mask of a written frame is its moving objects (``dynamic_masks > 0``, as the
reference's ``build_scene_exclusion_mask``). Depth is stored as float16 to keep the file
small; both sides get the same values (float16 -> float32 is exact).

npz layout (ONE file, < 1 MB, regenerated only by this script, never edited by hand):
  ``config``               JSON: sizes, frames, seed, reference commit, torch version.
  ``inputs/latents``       (F, h, w, C) float32 written latents, channels-last (our layout).
  ``inputs/depths``        (F, H, W) float16 z-depth of the written frames.
  ``inputs/exclusion``     (F, H, W) bool, True = excluded (moving object).
  ``inputs/intrinsics``    (F, 3, 3) float32, image resolution (H, W).
  ``inputs/poses_c2w``     (F, 4, 4) float32.
  ``targets/intrinsics``   (T, 3, 3) float32, image resolution. ``targets/poses_c2w`` (T, 4, 4)
                           (the 8 clip frames, then the 4 extra poses).
  ``reference/points``     (N, 3) float32 the cloud's valid world points, in append order.
  ``reference/latents``    (T, h, w, C) float32 ``project`` output, channels-last.
  ``reference/coverage``   (T, h, w) bool ``project`` mask.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys

import numpy as np

SEED = 7  # clip seed (layout, trajectory, objects)
LATENT_SEED = 20250521
IMAGE_HW = (192, 256)
LATENT_HW = (12, 16)
CHANNELS = 16
NUM_FRAMES = 33
MOVING_OBJECTS = 2
WRITE_FRAMES = (0, 4, 8, 12, 16)
TARGET_FRAMES = (2, 8, 14, 18, 21, 25, 30, 32)
# Off-trajectory targets: (clip frame, yaw in degrees about the camera's y axis, metres along
# the camera's z, metres along its x): turned away (partial coverage), stepped in (holes),
# stepped back (many points per cell, so the z-buffer decides).
EXTRA_TARGETS = ((16, 30.0, 0.0, 0.0), (8, -20.0, 0.0, 0.3), (4, 0.0, 1.0, 0.0),
                 (12, 8.0, -1.5, -0.2))


def _reference_commit(reference: str) -> str:
  try:
    return subprocess.run(["git", "-C", reference, "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _latent_intrinsics(K: np.ndarray) -> np.ndarray:
  """K (3, 3) of the image rescaled to the latent grid, as the reference's callers do."""
  out = K.astype(np.float32).copy()
  sx = np.float32(LATENT_HW[1] / IMAGE_HW[1])
  sy = np.float32(LATENT_HW[0] / IMAGE_HW[0])
  out[0, 0] *= sx
  out[0, 2] *= sx
  out[1, 1] *= sy
  out[1, 2] *= sy
  return out


def _moved(c2w: np.ndarray, yaw_deg: float, forward: float, right: float) -> np.ndarray:
  """c2w (4, 4) moved in its own camera frame: translated, then turned about its y axis."""
  a = np.deg2rad(yaw_deg)
  local = np.eye(4)
  local[:3, :3] = [[np.cos(a), 0.0, np.sin(a)], [0.0, 1.0, 0.0], [-np.sin(a), 0.0, np.cos(a)]]
  local[:3, 3] = [right, 0.0, forward]
  return (c2w.astype(np.float64) @ local).astype(np.float32)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reference", required=True,
                      help="local checkout of microsoft/LatentSpatialMemory")
  parser.add_argument("--output", default="tests/goldens/mirage_splat.npz")
  args = parser.parse_args(argv)

  src = os.path.join(args.reference, "src")
  if not os.path.isfile(os.path.join(src, "mirage", "latent_point_cloud.py")):
    raise SystemExit(f"--reference={args.reference}: no src/mirage/latent_point_cloud.py there")
  import torch
  torch.set_grad_enabled(False)
  # One thread: the duplicate-index scatters in ``project`` then run serially (last write
  # wins), which is the tie behaviour the backend reproduces.
  torch.set_num_threads(1)
  sys.path.insert(0, src)
  lpc_mod = importlib.import_module("mirage.latent_point_cloud")

  sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
  from data_pipelines.procedural import render_clip

  clip = render_clip(SEED, NUM_FRAMES, *IMAGE_HW, trajectory="loop",
                     moving_objects=MOVING_OBJECTS)
  w_idx, t_idx = np.array(WRITE_FRAMES), np.array(TARGET_FRAMES)
  depths16 = clip["depths"][w_idx].astype(np.float16)
  depths = depths16.astype(np.float32)
  exclusion = clip["dynamic_masks"][w_idx] > 0
  K = clip["intrinsics"][w_idx].astype(np.float32)
  poses = clip["poses_c2w"][w_idx].astype(np.float32)
  rng = np.random.default_rng(LATENT_SEED)
  latents = rng.standard_normal((len(w_idx), *LATENT_HW, CHANNELS)).astype(np.float32)
  lat_t = torch.from_numpy(latents).permute(0, 3, 1, 2).contiguous()  # (F, C, h, w)

  lpc = lpc_mod.LatentPointCloud.from_geometry(
      depth=depths[0], intrinsics=K[0], cam2world=poses[0], latent=lat_t[0].unsqueeze(1),
      mask=exclusion[0], device="cpu")
  lpc.update(depths=depths[1:], intrinsics=K[1:], cam2worlds=poses[1:], latents=lat_t[1:],
             masks=exclusion[1:])
  valid = lpc.valid_mask.bool()
  points = lpc.points_world[valid].numpy().astype(np.float32)

  t_K = clip["intrinsics"][np.concatenate([t_idx, [e[0] for e in EXTRA_TARGETS]])]
  t_K = t_K.astype(np.float32)
  t_poses = np.concatenate([clip["poses_c2w"][t_idx].astype(np.float32),
                            [_moved(clip["poses_c2w"][f], *e) for f, *e in EXTRA_TARGETS]])
  out_lat, out_cov = [], []
  for Ki, pose in zip(t_K, t_poses):
    lat, cov = lpc.project(cam2world=pose, intrinsics=_latent_intrinsics(Ki))
    out_lat.append(lat.permute(1, 2, 0).numpy().astype(np.float32))
    out_cov.append(cov.numpy().astype(bool))
  out_lat, out_cov = np.stack(out_lat), np.stack(out_cov)

  config = {
      "seed": SEED, "latent_seed": LATENT_SEED, "image_hw": list(IMAGE_HW),
      "latent_hw": list(LATENT_HW), "channels": CHANNELS, "num_frames": NUM_FRAMES,
      "moving_objects": MOVING_OBJECTS, "trajectory": "loop",
      "write_frames": list(WRITE_FRAMES), "target_frames": list(TARGET_FRAMES),
      "extra_targets": [list(e) for e in EXTRA_TARGETS],
      "reference_commit": _reference_commit(args.reference), "torch": torch.__version__,
      "torch_threads": 1, "layout": "channels-last (F, h, w, C)",
  }
  out = {
      "config": np.asarray(json.dumps(config, sort_keys=True)),
      "inputs/latents": latents, "inputs/depths": depths16, "inputs/exclusion": exclusion,
      "inputs/intrinsics": K, "inputs/poses_c2w": poses,
      "targets/intrinsics": t_K, "targets/poses_c2w": t_poses,
      "reference/points": points, "reference/latents": out_lat, "reference/coverage": out_cov,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  np.savez_compressed(args.output, **out)
  print(f"points {len(points)} of {len(w_idx) * LATENT_HW[0] * LATENT_HW[1]}, "
        f"coverage per target {np.round(out_cov.mean(axis=(1, 2)), 3).tolist()}, "
        f"excluded pixels {exclusion.mean():.4f}")
  print(f"wrote {args.output}: {len(out)} arrays, {os.path.getsize(args.output)} bytes")


if __name__ == "__main__":
  main()
