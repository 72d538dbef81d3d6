"""The posed video clip: the one record format every source produces and every consumer reads.

A clip is a plain ``dict`` of NumPy arrays (so it crosses process boundaries, TFDS and Grain
without wrappers):

  frames         (T, H, W, 3) uint8    RGB.
  depths         (T, H, W)    float32  metric z-depth in metres, > 0 and finite everywhere
                                       (sources clamp "infinitely far" pixels to their far plane).
  intrinsics     (T, 3, 3)    float32  pixels, OpenCV, pixel centres at (u + 0.5, v + 0.5).
  poses_c2w      (T, 4, 4)    float32  OpenCV camera-to-world (x right, y down, z forward).
  fps            ()           float32
  dynamic_masks  (T, H, W)    uint8    0 = static scene, k > 0 = moving object with id k.
                                       All zeros when the source has no moving objects.

Optional (sources that have them):
  object_tracks  (K, T, 3)    float32  world-space centre of object id k+1 at each frame.
  caption        python str            what the clip shows, in words (the text the Wan
                                       family's umT5 encodes); "" = no caption, the default
                                       (validate_clip always sets it). Posed files read it
                                       from the npz or a caption file beside it
                                       (data_pipelines/files.py), procedural rooms describe
                                       their own scene; datasets built before the field
                                       read back as "" (builders.record_to_clip).

World frame of the procedural scenes: y up, floor at y = 0 (other sources: their own).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mirage_jax import geometry
from mirage_jax.errors import InputError

Clip = dict[str, np.ndarray]

REQUIRED_FIELDS = ("frames", "depths", "intrinsics", "poses_c2w", "fps")


def check_depths(depths: np.ndarray, where: str, field: str = "depths") -> None:
  """Raise InputError unless ``depths`` (any shape) is float, finite and > 0 (metric z-depth)."""
  if not np.issubdtype(depths.dtype, np.floating):
    raise InputError(where, field, f"expected a float dtype, got {depths.dtype}")
  if not np.all(np.isfinite(depths)):
    raise InputError(where, field, f"{int(np.sum(~np.isfinite(depths)))} non-finite values")
  if np.any(depths <= 0):
    raise InputError(where, field, f"{int(np.sum(depths <= 0))} values <= 0")


def validate_clip(clip: Mapping[str, Any], where: str) -> Clip:
  """Checks a clip and returns it with canonical dtypes.

  Raises InputError naming ``where`` (a file path or dataset record) and the bad field:
  missing keys, wrong dtypes or ranks, mismatched frame counts or sizes, non-finite or
  non-orthonormal poses, bad intrinsics, depth <= 0 or non-finite.
  """
  for key in REQUIRED_FIELDS:
    if key not in clip:
      raise InputError(where, key, "missing")
  frames = np.asarray(clip["frames"])
  if frames.dtype != np.uint8:
    raise InputError(where, "frames", f"expected dtype uint8, got {frames.dtype}")
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise InputError(where, "frames", f"expected shape (T, H, W, 3), got {frames.shape}")
  t, h, w, _ = frames.shape
  if t < 1 or h < 1 or w < 1:
    raise InputError(where, "frames", f"empty clip, shape {frames.shape}")

  depths = np.asarray(clip["depths"])
  if depths.shape != (t, h, w):
    raise InputError(where, "depths", f"expected shape {(t, h, w)} to match frames, got {depths.shape}")
  check_depths(depths, where)

  intrinsics = np.asarray(clip["intrinsics"])
  if intrinsics.shape[:1] != (t,):
    raise InputError(where, "intrinsics", f"expected {t} frames to match frames, got shape {intrinsics.shape}")
  geometry.check_intrinsics(intrinsics, where)
  poses = np.asarray(clip["poses_c2w"])
  if poses.shape[:1] != (t,):
    raise InputError(where, "poses_c2w", f"expected {t} frames to match frames, got shape {poses.shape}")
  geometry.check_poses(poses, where)

  fps = np.asarray(clip["fps"])
  if fps.size != 1 or not np.isfinite(fps).all() or float(fps.reshape(())) <= 0:
    raise InputError(where, "fps", f"expected one positive number, got {fps!r}")

  out: Clip = {
      "frames": frames,
      "depths": depths.astype(np.float32),
      "intrinsics": intrinsics.astype(np.float32),
      "poses_c2w": poses.astype(np.float32),
      "fps": np.float32(fps.reshape(())),
  }
  if clip.get("dynamic_masks") is not None:
    masks = np.asarray(clip["dynamic_masks"])
    if masks.shape != (t, h, w):
      raise InputError(where, "dynamic_masks", f"expected shape {(t, h, w)}, got {masks.shape}")
    if masks.dtype == bool:
      masks = masks.astype(np.uint8)
    if not np.issubdtype(masks.dtype, np.integer) or masks.min() < 0 or masks.max() > 255:
      raise InputError(where, "dynamic_masks", f"expected integer object ids in [0, 255], got dtype {masks.dtype}")
    out["dynamic_masks"] = masks.astype(np.uint8)
  else:
    out["dynamic_masks"] = np.zeros((t, h, w), np.uint8)
  if clip.get("object_tracks") is not None:
    tracks = np.asarray(clip["object_tracks"], np.float32)
    if tracks.ndim != 3 or tracks.shape[1:] != (t, 3):
      raise InputError(where, "object_tracks", f"expected shape (K, {t}, 3), got {tracks.shape}")
    out["object_tracks"] = tracks
  # Every validated clip has one: "" when the source gives none.
  out["caption"] = "" if clip.get("caption") is None else check_caption(clip["caption"], where)
  return out


def check_caption(caption: Any, where: str) -> str:
  """A clip's ``caption`` as a python str (bytes and 0-d string arrays, as npz files and
  TFDS give them, are decoded); InputError for anything else or text with NUL bytes."""
  if isinstance(caption, np.ndarray) and caption.ndim == 0 and caption.dtype.kind in "US":
    caption = caption.item()
  if isinstance(caption, bytes):
    try:
      caption = caption.decode("utf-8")
    except UnicodeDecodeError as e:
      raise InputError(where, "caption", f"not UTF-8 text ({e})") from None
  if not isinstance(caption, str):
    raise InputError(where, "caption", f"expected a string, got {type(caption).__name__}")
  if "\x00" in caption:
    raise InputError(where, "caption", "holds NUL bytes: not text")
  return caption.strip()
