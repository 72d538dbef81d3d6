"""What ``generate`` makes of a geometry file: the depth it must hold, and its first frame and
cameras at the model's resolution (``data_pipelines.files.load_inference_geometry`` reads it)."""

from __future__ import annotations

import numpy as np

from mirage_jax.errors import InputError
from mirage_jax.evaluation import revisit


# How a user gets the depth a family needs and the file lacks.
DEPTH_HOW = ("give the depth of frame 0 (and, for the Wan family with --depth_estimator=given, "
             "of every frame), or estimate it")


def require_depth(path: str, geo: dict, family: str, needs_every: bool,
                  needs_first: bool = True) -> None:
  """Refuses a geometry file without the depth the family writes into its memory.

  Args:
    geo: ``files.load_inference_geometry``'s dict (``first_depth`` / ``depths`` None when the
      file lacks them). needs_every: the rollout writes every frame with its given depth.
    needs_first: frame 0's depth is not estimated.
  """
  if needs_first and geo["first_depth"] is None:
    raise InputError(path, "depth", f"none for frame 0, which the {family} rollout writes into "
                     f"its memory first: {DEPTH_HOW}")
  if needs_every and geo["depths"] is None:
    raise InputError(path, "depth", f"frame 0's only, and the {family} rollout writes every "
                     f"generated frame with its frame's given depth: {DEPTH_HOW}")


def fit_inputs(geo: dict, resolution, num_frames: int | None = None) -> dict:
  """A loaded geometry file's first ``num_frames`` cameras at the model's resolution.

  Frame 0 (and the depth there is) resized to cover ``resolution`` and centre-cropped, the
  intrinsics following (``revisit.fit_clip``: the input pipeline's resize).

  Args:
    geo: ``files.load_inference_geometry``'s dict. resolution: (H, W) of the model.
  Returns:
    first_frame (H, W, 3) uint8; first_depth (H, W) or None; depths (T', H, W) or None (as
    in ``geo``); depth_valid (T', H, W) bool or None (as in ``geo``); intrinsics (T', 3, 3);
    poses_c2w (T', 4, 4).
  """
  t = len(geo["poses_c2w"]) if num_frames is None else min(num_frames, len(geo["poses_c2w"]))
  valid = geo.get("depth_valid")
  if geo["depths"] is not None:
    depth = geo["depths"][:t]
  elif geo["first_depth"] is not None:
    depth = geo["first_depth"][None]
  else:  # resized and dropped: fit_clip resizes RGB beside depth
    depth, valid = np.ones((1, *geo["frames"].shape[1:3]), np.float32), None
  # Frame 0 beside every depth map (a view, not a copy): fit_clip resizes them together.
  frames = np.broadcast_to(geo["frames"][:1], (len(depth), *geo["frames"].shape[1:]))
  fitted = revisit.fit_clip(dict(frames=frames, depths=depth, intrinsics=geo["intrinsics"],
                                 poses_c2w=geo["poses_c2w"],
                                 depth_valid=None if valid is None else valid[:len(depth)]),
                            resolution, t)
  depth_valid = None
  if valid is not None:  # every camera's row; those without their own depth map all True
    depth_valid = np.ones((len(fitted["poses_c2w"]),) + fitted["depth_valid"].shape[1:], bool)
    depth_valid[:len(fitted["depth_valid"])] = fitted["depth_valid"] != 0
  return dict(first_frame=fitted["frames"][0],
              first_depth=None if geo["first_depth"] is None else fitted["depths"][0],
              depths=None if geo["depths"] is None else fitted["depths"],
              depth_valid=depth_valid,
              intrinsics=fitted["intrinsics"], poses_c2w=fitted["poses_c2w"])
