"""The posed video clip: the one record format every source produces and every consumer reads.

A clip is a plain ``dict`` of NumPy arrays (so it crosses process boundaries, TFDS and Grain
without wrappers):

  frames         (T, H, W, 3) uint8    RGB.
  depths         (T, H, W)    float32  metric z-depth in metres, > 0 and finite everywhere
                                       (sources clamp "infinitely far" pixels to their far plane;
                                       holes hold PLACEHOLDER_DEPTH, see depth_valid).
  intrinsics     (T, 3, 3)    float32  pixels, OpenCV, pixel centres at (u + 0.5, v + 0.5).
  poses_c2w      (T, 4, 4)    float32  OpenCV camera-to-world (x right, y down, z forward).
  fps            ()           float32
  dynamic_masks  (T, H, W)    uint8    0 = static scene, k > 0 = moving object with id k.
                                       All zeros when the source has no moving objects.
  depth_valid    (T, H, W)    uint8    1 = the depth there is observed, 0 = a hole (sky, edges,
                                       an undecodable depth map). All ones when the source has
                                       dense depth.
  caption        str                   what the clip shows ("" when the source has none).

Optional (sources that have them):
  object_tracks  (K, T, 3)    float32  world-space centre of object id k+1 at each frame.
  caption        python str            what the clip shows, in words (the text the Wan
                                       family's umT5 encodes); "" = no caption, the default
                                       (validate_clip always sets it). Posed files read it
                                       from the npz or a caption file beside it
                                       (data_pipelines/files.py), procedural rooms describe
                                       their own scene; datasets built before the field
                                       read back as "" (builders.record_to_clip).

Depth holes: a source whose depth has holes passes ``depth_valid`` (0 at the holes); there,
and only there, ``validate_clip`` accepts depth <= 0 or non-finite and replaces it with
``PLACEHOLDER_DEPTH``, so the arrays stay finite. Without ``depth_valid`` every depth value
must be finite and > 0: a source that claims dense depth and delivers NaN is refused, not
silently masked. Consumers never lift a hole to 3D: ``liftable`` is the one rule (depth
observed and the pixel static) for whatever writes memory from a clip.

World frame of the procedural scenes: y up, floor at y = 0 (other sources: their own).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mirage_jax import geometry
from mirage_jax.errors import InputError

Clip = dict[str, np.ndarray]

REQUIRED_FIELDS = ("frames", "depths", "intrinsics", "poses_c2w", "fps")
# Depth stored where a clip has none (holes; whole clips of sources without depth, flagged by
# has_depth = False): finite and > 0, so every depth array passes the same checks.
PLACEHOLDER_DEPTH = 1.0
# A clip is no training data when fewer of its depth pixels than this are observed
# (``check_depth_coverage``; the sample-folder reader skips such clips).
MIN_VALID_DEPTH_FRACTION = 0.1


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
  non-orthonormal poses, bad intrinsics, depth <= 0 or non-finite where ``depth_valid`` (if
  given) does not mark a hole. The result always has ``dynamic_masks``, ``depth_valid`` and
  ``caption``.
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
  if clip.get("depth_valid") is not None:
    valid = np.asarray(clip["depth_valid"])
    if valid.shape != (t, h, w):
      raise InputError(where, "depth_valid", f"expected shape {(t, h, w)}, got {valid.shape}")
    if valid.dtype != bool and (not np.issubdtype(valid.dtype, np.integer) or valid.min() < 0
                                or valid.max() > 1):  # (np.isin would sort: seconds per clip)
      raise InputError(where, "depth_valid", f"expected 0/1 (bool or integer), got dtype {valid.dtype}")
    valid = valid.astype(bool)
    if not np.issubdtype(depths.dtype, np.floating):
      raise InputError(where, "depths", f"expected a float dtype, got {depths.dtype}")
    check_depths(depths[valid], where)  # holes are excused, observed depth is not
    depths = np.where(valid, depths, np.float32(PLACEHOLDER_DEPTH))
  else:
    check_depths(depths, where)
    valid = np.ones((t, h, w), bool)

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
  out["depth_valid"] = valid.astype(np.uint8)
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


def check_depth_coverage(depth_valid: np.ndarray, where: str,
                         min_fraction: float = MIN_VALID_DEPTH_FRACTION) -> None:
  """Raise InputError when fewer than ``min_fraction`` of a clip's depth pixels are observed.

  Over the whole clip, not per frame: a frame without depth (the reference reads an
  undecodable depth map as all-NaN and keeps the clip) writes nothing to memory but is still
  a frame to train on; a clip that is nearly all holes has no geometry to learn from.

  Args:
    depth_valid: (T, H, W) 0/1.
  """
  fraction = float(np.mean(np.asarray(depth_valid, bool))) if np.size(depth_valid) else 0.0
  if fraction < min_fraction:
    raise InputError(where, "depth_valid", f"only {fraction:.1%} of the depth is valid (at least "
                     f"{min_fraction:.0%} needed): no geometry to train on")


def liftable(dynamic_masks, depth_valid=None):
  """Where a pixel may be lifted to 3D and written to memory: static and its depth observed.

  NumPy or JAX arrays alike (the data pipelines and the training stages share this rule).

  Args:
    dynamic_masks: (..., H, W) object ids, 0 = static.
    depth_valid: (..., H, W) 0/1, or None (dense depth).
  Returns:
    (..., H, W) bool.
  """
  static = dynamic_masks == 0
  return static if depth_valid is None else static & (depth_valid != 0)
