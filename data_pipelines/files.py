"""Posed clips from files on disk, read into the clip format of ``data_pipelines/clip.py``.

Two layouts are read:

* ``geometry.npz`` (the reference's layout): ``depths (T,H,W)``, ``poses_c2w (T,4,4)``,
  ``intrinsics (T,3,3)`` or one ``(3,3)`` shared by all frames, ``fps``; the frames either as
  ``frames (T,H,W,3) uint8`` inside the npz or as a video beside it (``<stem>.mp4/.gif/.avi``,
  else the only video in the folder); optional ``dynamic_masks (T,H,W)``, ``object_tracks
  (K,T,3)``, ``depth_valid (T,H,W)`` (0 = a depth hole), ``caption ()`` and ``has_depth ()``.
* RealEstate10K camera files (``<name>.txt``): the first line is the video URL, then one line
  per frame ``timestamp fx fy cx cy k1 k2 w2c`` with the intrinsics normalised by the image
  width/height and ``w2c`` the 3x4 world-to-camera matrix, row-major (12 numbers). The frames
  come from a folder ``<name>/`` of images named by timestamp (``<timestamp>.png/.jpg``) or
  from a video ``<name>.mp4/.gif/.avi`` beside the file, one frame per line.

``known_frames ()`` and ``known_depths ()`` (optional ints in a ``geometry.npz``, default T):
frames 0..known_frames-1 have their own RGB and 0..known_depths-1 their own depth; later
ones repeat the last known one. ``python -m data_pipelines.make_geometry`` writes them for
a file made from fewer frames than cameras (e.g. only ``first_frame.png``): such a file is
input for ``generate`` (which reads frame 0 and the cameras; the Wan family every depth),
not training data (``posed_files`` builds refuse it).

Captions (optional; the text the Wan family's umT5 encodes, ``clip["caption"]``): a
non-empty ``caption`` string inside a ``geometry.npz``, else a UTF-8 text file beside the clip file:
``<stem>.caption.txt`` (e.g. ``room0.caption.txt`` for ``room0.npz`` or ``room0.txt``), else
``caption.txt`` in the same folder (the reference's one-folder-per-clip layout: ``geometry.npz``,
``clip.mp4``, ``caption.txt``). Its lines are joined by spaces; none of these: no caption.
Caption files are not ``.txt`` camera files: ``find_clips`` skips them. (``<stem>.txt`` is
not used for captions, as ``.txt`` beside the clips already means a RealEstate10K camera file.)

Missing depth: RealEstate10K has none. Its clips get ``depths`` filled with the constant
``PLACEHOLDER_DEPTH`` (so they pass the clip format's depth > 0 check) and the extra field
``has_depth = False``; every clip read here carries ``has_depth`` (() bool), and consumers
must not supervise depth or write to a 3D memory from clips where it is False.

Every problem with an input file raises one ``InputError`` naming the file and the field.
Frames are never resized: a video whose size differs from the depth maps is an error.
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np

from data_pipelines.clip import PLACEHOLDER_DEPTH, Clip, check_depths, validate_clip
from mirage_jax import geometry, paths
from mirage_jax.atomic import atomic_output
from mirage_jax.errors import InputError

# imageio-ffmpeg starts ffmpeg with preexec_fn=os.setpgrp, which is unsafe in a process with
# threads (a Beam worker: gRPC threads): there the child died at random and a readable video
# read as "Could not load meta information". Its documented switch turns that off (the one
# thing lost: ffmpeg then also gets a Ctrl-C sent to our process group).
os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")

VIDEO_SUFFIXES = (".mp4", ".gif", ".avi")
# The reference's names for the frames of a geometry.npz without them, in its folder.
REFERENCE_VIDEO, REFERENCE_FIRST_FRAME = "clip.mp4", "first_frame.png"
CAPTION_FILE, CAPTION_SUFFIX = "caption.txt", ".caption.txt"
# Frame rate of a file that gives none (the reference's inference files have no fps).
DEFAULT_FPS = 30.0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_NPZ_REQUIRED = ("depths", "poses_c2w", "intrinsics", "fps")
# How many leading frames have their own RGB / depth (module docstring); default: all.
KNOWN_FIELDS = ("known_frames", "known_depths")
_RE10K_COLUMNS = 19  # timestamp, fx, fy, cx, cy, k1, k2, 12 numbers of w2c.


# ----------------------------------------------------------------------------- frames


def read_video(path: str | os.PathLike) -> np.ndarray:
  """Reads every frame of a video (mp4/gif/avi) as RGB.

  Returns:
    (T, H, W, 3) uint8.
  """
  try:
    frames = np.asarray(iio.imread(path, index=None))
  except Exception as e:  # imageio raises OSError, ValueError or plugin-specific errors.
    raise InputError(path, "frames", f"unreadable video ({type(e).__name__}: {e})".splitlines()[0]) from e
  return _to_rgb(frames, path, video=True)


def read_image(path: Path) -> np.ndarray:
  """Reads one image as RGB.  Returns (H, W, 3) uint8."""
  try:
    image = np.asarray(iio.imread(path))
  except Exception as e:
    raise InputError(path, "frames", f"unreadable image ({type(e).__name__}: {e})".splitlines()[0]) from e
  return _to_rgb(image[None], path, video=False)[0]


def _to_rgb(frames: np.ndarray, path, video: bool) -> np.ndarray:
  """(T, H, W[, C]) grey/RGB/RGBA frames -> (T, H, W, 3) uint8."""
  if video and frames.ndim == 3 and frames.shape[-1] not in (3, 4):
    frames = frames[..., None]  # A greyscale GIF: (T, H, W).
  if frames.ndim == 3:
    frames = frames[..., None]
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4):
    raise InputError(path, "frames", f"expected 8-bit grey/RGB/RGBA frames, got {frames.dtype} {frames.shape}")
  if frames.shape[-1] == 1:
    frames = np.repeat(frames, 3, axis=-1)
  return np.ascontiguousarray(frames[..., :3])


def _video_beside(path: Path) -> Path | None:
  """The video for ``path``: ``<stem>.<video suffix>``, else ``clip.mp4`` (the reference's
  name), else the only video in its folder."""
  for suffix in VIDEO_SUFFIXES:
    if path.with_suffix(suffix).is_file():
      return path.with_suffix(suffix)
  if (path.parent / REFERENCE_VIDEO).is_file():
    return path.parent / REFERENCE_VIDEO
  videos = sorted(p for p in path.parent.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
  if len(videos) > 1:
    raise InputError(path, "frames", f"no frames in the file and {len(videos)} videos beside it, "
                     f"none named {path.stem}.mp4/.gif/.avi")
  return videos[0] if videos else None


# ----------------------------------------------------------------------------- geometry.npz


def _load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads every array of an npz eagerly, so a corrupt member fails here, named.

  ``path`` may be a URL (``gs://``): the file is downloaded whole first.
  """
  try:
    source = io.BytesIO(paths.read_bytes(path)) if paths.is_remote(path) else path
    archive = np.load(source, allow_pickle=False)
  except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
    raise InputError(path, "file", f"not a readable npz archive ({type(e).__name__}: {e})") from e
  if not isinstance(archive, np.lib.npyio.NpzFile):  # np.load gives a bare array for .npy data
    raise InputError(path, "file", "a single .npy array, expected an npz archive")
  arrays = {}
  with archive:
    for key in archive.files:
      try:
        arrays[key] = archive[key]
      except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
        raise InputError(path, key, f"unreadable array, truncated or corrupt file "
                         f"({type(e).__name__}: {e})") from e
  return arrays


def _check_numeric(arrays: dict[str, np.ndarray], path: Path, keys) -> None:
  for key in keys:
    if key in arrays and not (np.issubdtype(arrays[key].dtype, np.number) or arrays[key].dtype == bool):
      raise InputError(path, key, f"expected a numeric array, got dtype {arrays[key].dtype}")


def load_geometry_npz(path: str | os.PathLike) -> Clip:
  """Reads a reference-style ``geometry.npz`` (and its video, if the frames are not inside).

  Returns:
    A validated clip (see ``data_pipelines/clip.py``) plus ``has_depth`` (() bool), True
    unless the file itself says otherwise (files written by ``save_geometry_npz`` from a
    clip without depth), and ``known_frames``, ``known_depths`` (() int64, module docstring).
  """
  path = Path(path)
  if not path.is_file():
    raise InputError(path, "file", "does not exist")
  arrays = _load_npz(path)
  for key in _NPZ_REQUIRED:
    if key not in arrays:
      raise InputError(path, key, f"missing (the file has {sorted(arrays)})")
  _check_numeric(arrays, path, ("depths", "poses_c2w", "intrinsics", "fps", "dynamic_masks", "object_tracks",
                                "depth_valid", "has_depth", *KNOWN_FIELDS))
  caption = arrays.get("caption")  # an empty one (a clip saved without) defers to a file
  if caption is None or (caption.dtype.kind in "US" and not str(caption.item()).strip()):
    caption = read_caption_beside(path)
  depths = arrays["depths"]
  if depths.ndim != 3:
    raise InputError(path, "depths", f"expected shape (T, H, W), got {depths.shape}")
  t, h, w = depths.shape
  cameras = len(arrays["poses_c2w"]) if arrays["poses_c2w"].ndim == 3 else t
  if "frames" in arrays and len(arrays["frames"]) == 1 < cameras:
    raise InputError(path, "frames", f"frame 0 only, for {cameras} cameras: an input of "
                     "generate (load_inference_geometry), not a clip with every frame")

  if "frames" in arrays:
    frames = arrays["frames"]
  else:
    video = _video_beside(path)
    if video is None:
      raise InputError(path, "frames", "not in the file and no video (.mp4/.gif/.avi) beside it")
    frames = read_video(video)
    if frames.shape[:3] != (t, h, w):
      raise InputError(video, "frames", f"video has {frames.shape[0]} frames of {frames.shape[1]}x"
                       f"{frames.shape[2]}, but {path.name} has {t} depth maps of {h}x{w}")

  intrinsics = arrays["intrinsics"]
  if intrinsics.shape == (3, 3):
    intrinsics = np.broadcast_to(intrinsics, (t, 3, 3))
  clip = dict(frames=frames, depths=depths, intrinsics=intrinsics, poses_c2w=arrays["poses_c2w"],
              fps=arrays["fps"], dynamic_masks=arrays.get("dynamic_masks"),
              object_tracks=arrays.get("object_tracks"), depth_valid=arrays.get("depth_valid"),
              caption=caption)
  clip = validate_clip(clip, str(path))
  clip["has_depth"] = np.bool_(arrays.get("has_depth", True))
  for key in KNOWN_FIELDS:
    n = np.asarray(arrays.get(key, t))
    if n.size != 1 or not np.issubdtype(n.dtype, np.integer) or not 1 <= int(n.reshape(())) <= t:
      raise InputError(path, key, f"expected one integer in [1, {t}] (frames with their own data), "
                       f"got {n!r}")
    clip[key] = np.int64(n.reshape(()))
  return clip


def load_inference_geometry(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a ``geometry.npz`` as ``generate`` takes it: every camera, frame 0 at least.

  What the reference's ``load_video_geometry_for_inference`` reads, plus ours:

  * ``poses_c2w (T, 4, 4)`` and ``intrinsics (T, 3, 3)`` or ``(3, 3)`` (pixels of the
    frames): required. ``fps`` optional (default ``DEFAULT_FPS``; the reference stores none).
  * frames: ``frames (N, H, W, 3) uint8`` in the file, else the video ``<stem>.mp4/.gif/.avi``
    or ``clip.mp4`` (or the only video) beside it, else ``first_frame.png`` beside it. N is 1
    (frame 0 only) or T, as the reference accepts (0 < N < T other than 1 is refused: the
    frames of a camera path cannot be part-known). Never resized: a frame whose size differs
    from the depth (or, without depth, the file's ``processed_size (2,)``) is refused.
  * depth: ``depths (N, H, W)`` metric z-depth, N = T (every frame), 1 or an ``(H, W)`` array
    (frame 0 only; so is frame 0's map repeated T times beside one frame, as the reference's
    first-frame files store it),
    or absent. ``has_depth`` False (placeholder depth) reads as absent; ``known_frames`` /
    ``known_depths`` < T (``make_geometry`` from fewer frames) read as frame 0 only.
  * ``depth_valid``: optional 0/1 of the depth's shape, 0 at a depth hole (a placeholder
    value; ``make_geometry`` keeps a dataset clip's): nothing is lifted into memory there.
  * ``masks``, ``frame_indices``, ``original_size`` and other keys are not used.

  Returns:
    dict: frames (1 or T, H, W, 3) uint8; first_depth (H, W) float32 or None; depths (T, H,
    W) float32 or None (None unless the file has every frame's own depth); depth_valid (T,
    H, W) bool or None (no ``depth_valid`` or no depth: all observed; rows without a depth
    map of their own are True); intrinsics (T, 3, 3) float32; poses_c2w (T, 4, 4) float32;
    fps float; frames_path (the file the frames came from). Every problem is one
    ``InputError`` naming the file and the field.
  """
  path = Path(path)
  if not path.is_file():
    raise InputError(path, "file", "does not exist")
  arrays = _load_npz(path)
  for key in ("poses_c2w", "intrinsics"):
    if key not in arrays:
      raise InputError(path, key, f"missing (the file has {sorted(arrays)})")
  _check_numeric(arrays, path, ("depths", "poses_c2w", "intrinsics", "fps", "has_depth",
                                "processed_size", "depth_valid", *KNOWN_FIELDS))
  poses = arrays["poses_c2w"]
  geometry.check_poses(poses, str(path))
  t = len(poses)
  intrinsics = arrays["intrinsics"]
  if intrinsics.shape == (3, 3):
    intrinsics = np.broadcast_to(intrinsics, (t, 3, 3))
  if intrinsics.ndim == 3 and intrinsics.shape[1:] == (3, 3) and len(intrinsics) != t:
    raise InputError(path, "poses_c2w", f"{t} cameras, but intrinsics holds {len(intrinsics)} "
                     "(one per frame, or one (3, 3) shared)")
  geometry.check_intrinsics(intrinsics, str(path))
  known = {}
  for key in KNOWN_FIELDS:
    n = np.asarray(arrays.get(key, t))
    if n.size != 1 or not np.issubdtype(n.dtype, np.integer) or not 1 <= int(n.reshape(())) <= t:
      raise InputError(path, key, f"expected one integer in [1, {t}] (frames with their own data), "
                       f"got {n!r}")
    known[key] = int(n.reshape(()))

  depths = first_depth = valid = None
  if "depths" in arrays and bool(np.asarray(arrays.get("has_depth", True)).reshape(-1)[0]):
    d = arrays["depths"]
    d = d[None] if d.ndim == 2 else d
    if d.ndim != 3 or len(d) not in (1, t):
      raise InputError(path, "depths", f"expected (T={t}, H, W) (every frame), (1, H, W) or "
                       f"(H, W) (frame 0 only), got {arrays['depths'].shape}")
    check_depths(d, str(path))
    if "depth_valid" in arrays:
      v = arrays["depth_valid"]
      v = v[None] if v.ndim == 2 else v
      if v.shape != d.shape or not ((v == 0) | (v == 1)).all():
        raise InputError(path, "depth_valid", f"expected 0/1 of the depths' shape {d.shape}, "
                         f"got {v.dtype} {v.shape}")
      valid = v != 0
    first_depth = d[0].astype(np.float32)
    if len(d) == t and known["known_depths"] == t:
      depths = d.astype(np.float32)
  hw = None if first_depth is None else first_depth.shape
  if hw is None and "processed_size" in arrays:  # the reference's size of its frames
    size = np.asarray(arrays["processed_size"]).reshape(-1)
    if size.size == 2 and np.all(size > 0):
      hw = tuple(int(x) for x in size)

  frames_path = path
  if "frames" in arrays:
    frames = arrays["frames"]
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
      raise InputError(path, "frames", f"expected (N, H, W, 3) uint8, got {frames.dtype} {frames.shape}")
  else:
    video = _video_beside(path)
    first = path.parent / REFERENCE_FIRST_FRAME
    if video is not None:
      frames_path, frames = video, read_video(video)
    elif first.is_file():
      frames_path, frames = first, read_image(first)[None]
    else:
      raise InputError(path, "frames", f"not in the file, and no video (.mp4/.gif/.avi) or "
                       f"{REFERENCE_FIRST_FRAME} beside it")
  if len(frames) not in (1, t):
    raise InputError(frames_path, "frames", f"{len(frames)} frames; expected 1 (frame 0 only) or "
                     f"{t} (one per camera of {path.name})")
  if hw is not None and frames.shape[1:3] != hw:
    raise InputError(frames_path, "frames", f"size {frames.shape[1]}x{frames.shape[2]}, but "
                     f"{path.name}'s {'depth' if first_depth is not None else 'processed_size'} is "
                     f"{hw[0]}x{hw[1]} (frames are not resized: resize the image to match)")
  if len(frames) > 1 and known["known_frames"] < t:
    frames = frames[:1]  # the later ones repeat the last known frame
  if depths is not None and len(frames) == 1 < t and np.all(depths == depths[:1]):
    depths = None  # frame 0's depth repeated for every camera, as the reference stores it
  depth_valid = None
  if valid is not None:  # rows for every camera: frame 0's, and the others' when known
    known = len(valid) if depths is not None else 1
    depth_valid = np.ones((t,) + valid.shape[1:], bool)
    depth_valid[:known] = valid[:known]
  fps = np.asarray(arrays.get("fps", DEFAULT_FPS), np.float64).reshape(-1)
  if fps.size != 1 or not np.isfinite(fps[0]) or fps[0] <= 0:
    raise InputError(path, "fps", f"expected one positive number, got {arrays['fps']!r}")
  return dict(frames=np.ascontiguousarray(frames), first_depth=first_depth, depths=depths,
              depth_valid=depth_valid, intrinsics=np.asarray(intrinsics, np.float32),
              poses_c2w=np.asarray(poses, np.float32), fps=float(fps[0]),
              frames_path=str(frames_path))


def save_geometry_npz(path: str | os.PathLike, clip: Clip) -> None:
  """Writes a clip as ``geometry.npz`` with the frames inside; atomic (temp file, then rename).

  Args:
    path: destination file.
    clip: a clip in the format of ``data_pipelines/clip.py`` (validated here first);
      ``has_depth``, ``known_frames`` and ``known_depths`` are kept when present.
  """
  path = Path(path)
  checked = validate_clip(clip, str(path))
  if "has_depth" in clip:
    checked["has_depth"] = np.bool_(clip["has_depth"])
  for key in KNOWN_FIELDS:
    if key in clip:
      checked[key] = np.int64(clip[key])
  path.parent.mkdir(parents=True, exist_ok=True)
  with atomic_output(path) as tmp:
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
      np.savez_compressed(f, **checked)


def save_first_frame_geometry(path: str | os.PathLike, clip: Clip) -> None:
  """Writes a clip as a frame-0-only ``geometry.npz`` (``load_inference_geometry``): every
  camera, frame 0's RGB and (when the clip has depth) its depth; atomic.

  Arrays: ``frames (1, H, W, 3)``, ``depths (1, H, W)`` and ``depth_valid (1, H, W)``
  (absent when ``has_depth`` is False), ``intrinsics (T, 3, 3)``, ``poses_c2w (T, 4, 4)``,
  ``fps ()``.
  """
  path = Path(path)
  checked = validate_clip(clip, str(path))
  out = dict(frames=checked["frames"][:1], intrinsics=checked["intrinsics"],
             poses_c2w=checked["poses_c2w"], fps=checked["fps"])
  if bool(clip.get("has_depth", True)):
    out["depths"] = checked["depths"][:1]
    out["depth_valid"] = checked["depth_valid"][:1]  # frame 0's holes
  path.parent.mkdir(parents=True, exist_ok=True)
  with atomic_output(path) as tmp:
    with open(tmp, "wb") as f:
      np.savez_compressed(f, **out)


# ----------------------------------------------------------------------------- RealEstate10K


def _parse_re10k(path: Path) -> tuple[np.ndarray, np.ndarray]:
  """Parses a camera file.

  Returns:
    timestamps (T,) int64 (microseconds) and rows (T, 18) float64 (fx fy cx cy k1 k2 w2c).
  """
  try:
    lines = path.read_text().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(path, "file", f"unreadable text file ({type(e).__name__}: {e})") from e
  lines = [line for line in lines[1:] if line.strip()]  # Line 1 is the video URL.
  if len(lines) < 2:
    raise InputError(path, "cameras", f"expected at least 2 camera lines after the URL line, got {len(lines)}")
  stamps, rows = [], []
  for n, line in enumerate(lines, start=2):
    parts = line.split()
    if len(parts) != _RE10K_COLUMNS:
      raise InputError(path, f"line {n}", f"expected {_RE10K_COLUMNS} numbers "
                       f"(timestamp fx fy cx cy k1 k2 + 3x4 w2c), got {len(parts)}")
    try:
      stamps.append(int(parts[0]))
      rows.append([float(x) for x in parts[1:]])
    except ValueError as e:
      raise InputError(path, f"line {n}", f"not a number ({e})") from e
  stamps, rows = np.array(stamps, np.int64), np.array(rows, np.float64)
  if not np.all(np.isfinite(rows)):
    n = int(np.argwhere(~np.isfinite(rows).all(axis=1))[0, 0]) + 2
    raise InputError(path, f"line {n}", "non-finite values")
  if np.any(np.diff(stamps) <= 0):
    n = int(np.argwhere(np.diff(stamps) <= 0)[0, 0]) + 3
    raise InputError(path, f"line {n}", "timestamps must increase strictly")
  return stamps, rows


def _re10k_frames(path: Path, stamps: np.ndarray) -> np.ndarray:
  """Frames for a camera file: ``<stem>/<timestamp>.<image>`` or a video beside it.

  Returns:
    (T, H, W, 3) uint8.
  """
  folder = path.with_suffix("")
  if folder.is_dir():
    images = []
    for stamp in stamps:
      found = [folder / f"{stamp}{s}" for s in IMAGE_SUFFIXES if (folder / f"{stamp}{s}").is_file()]
      if not found:
        raise InputError(folder, "frames", f"no image named {stamp}.png/.jpg for timestamp {stamp}")
      images.append(read_image(found[0]))
      if images[-1].shape != images[0].shape:
        raise InputError(found[0], "frames", f"size {images[-1].shape[:2]} differs from the first "
                         f"frame's {images[0].shape[:2]}")
    return np.stack(images)
  video = _video_beside(path)
  if video is None:
    raise InputError(path, "frames", f"no image folder {folder.name}/ and no video beside the file")
  frames = read_video(video)
  if len(frames) != len(stamps):
    raise InputError(video, "frames", f"video has {len(frames)} frames, {path.name} has {len(stamps)} cameras")
  return frames


def re10k_cameras(path: str | os.PathLike, height: int, width: int
                  ) -> tuple[np.ndarray, np.ndarray, float]:
  """The cameras of a RealEstate10K camera file, for frames of ``height`` x ``width`` pixels.

  Returns:
    intrinsics (T, 3, 3) float64 in pixels, poses_c2w (T, 4, 4) float64 (OpenCV), and fps
    from the median timestamp step.
  """
  path = Path(path)
  if not path.is_file():
    raise InputError(path, "file", "does not exist")
  stamps, rows = _parse_re10k(path)
  return (*_re10k_geometry(path, rows, height, width), 1e6 / float(np.median(np.diff(stamps))))


def _re10k_geometry(path: Path, rows: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  """Parsed camera rows (T, 18) -> intrinsics (T, 3, 3) in pixels and poses_c2w (T, 4, 4)."""
  t = len(rows)
  intrinsics = np.zeros((t, 3, 3), np.float64)
  intrinsics[:, 0, 0], intrinsics[:, 1, 1] = rows[:, 0] * w, rows[:, 1] * h
  intrinsics[:, 0, 2], intrinsics[:, 1, 2], intrinsics[:, 2, 2] = rows[:, 2] * w, rows[:, 3] * h, 1.0
  w2c = np.tile(np.eye(4), (t, 1, 1))
  w2c[:, :3, :4] = rows[:, 6:].reshape(t, 3, 4)
  R = w2c[:, :3, :3]
  # Check before inverting: a singular matrix would otherwise fail inside the inversion.
  err = np.abs(R @ np.swapaxes(R, 1, 2) - np.eye(3)).max(axis=(1, 2))
  if np.any(err > 1e-3) or np.any(np.linalg.det(R) < 0):
    n = int(np.argwhere((err > 1e-3) | (np.linalg.det(R) < 0))[0, 0]) + 2
    raise InputError(path, f"line {n}", f"w2c rotation is not orthonormal with det +1 (|RR^T - I| = {err[n - 2]:.2g})")
  c2w = np.tile(np.eye(4), (t, 1, 1))
  c2w[:, :3, :3] = np.swapaxes(R, 1, 2)
  c2w[:, :3, 3] = -np.einsum("tji,tj->ti", R, w2c[:, :3, 3])
  return intrinsics, c2w


def load_re10k(path: str | os.PathLike) -> Clip:
  """Reads a RealEstate10K camera file and its frames.

  Returns:
    A validated clip with ``depths`` = PLACEHOLDER_DEPTH everywhere and ``has_depth`` False;
    ``fps`` from the median timestamp step.
  """
  path = Path(path)
  if not path.is_file():
    raise InputError(path, "file", "does not exist")
  stamps, rows = _parse_re10k(path)
  frames = _re10k_frames(path, stamps)
  t, h, w, _ = frames.shape
  intrinsics, c2w = _re10k_geometry(path, rows, h, w)
  fps = 1e6 / float(np.median(np.diff(stamps)))
  clip = validate_clip(dict(frames=frames, depths=np.full((t, h, w), PLACEHOLDER_DEPTH, np.float32),
                            intrinsics=intrinsics, poses_c2w=c2w, fps=fps,
                            caption=read_caption_beside(path)), str(path))
  clip["has_depth"] = np.bool_(False)
  return clip


# ----------------------------------------------------------------------------- folders


def is_caption_file(path: Path) -> bool:
  return path.name == CAPTION_FILE or path.name.endswith(CAPTION_SUFFIX)


def read_caption_beside(path: Path) -> str | None:
  """The caption of clip file ``path`` from ``<stem>.caption.txt`` or ``caption.txt`` beside
  it (module docstring), lines joined by spaces; None without either. InputError (naming the
  caption file) for one that is not UTF-8 text."""
  for name in (path.stem + CAPTION_SUFFIX, CAPTION_FILE):
    caption = path.parent / name
    if caption.is_file():
      try:
        text = caption.read_bytes().decode("utf-8")
      except (OSError, UnicodeDecodeError) as e:
        raise InputError(caption, "caption", f"not a readable UTF-8 text file ({e})") from None
      if "\x00" in text:
        raise InputError(caption, "caption", "holds NUL bytes: not a text file")
      return " ".join(line.strip() for line in text.splitlines() if line.strip())
  return None



def load_clip(path: str | os.PathLike) -> Clip:
  """Reads one clip: ``.npz`` as geometry.npz, ``.txt`` as a RealEstate10K camera file."""
  path = Path(path)
  if path.suffix == ".npz":
    return load_geometry_npz(path)
  if path.suffix == ".txt":
    return load_re10k(path)
  raise InputError(path, "file", "expected a geometry .npz or a RealEstate10K .txt camera file")


def find_clips(directory: str | os.PathLike) -> list[Path]:
  """All clip files (``*.npz``, ``*.txt`` but caption files) under ``directory``,
  recursively, in sorted order."""
  directory = Path(directory)
  if not directory.is_dir():
    raise InputError(directory, "source_dir", "is not a directory")
  found = sorted(p for p in directory.rglob("*")
                 if p.suffix in (".npz", ".txt") and p.is_file() and not p.name.startswith(".")
                 and not is_caption_file(p))
  if not found:
    raise InputError(directory, "source_dir", "holds no .npz or .txt clip files")
  return found


def clip_name(path: Path, root: Path) -> str:
  """A stable id for a clip file: its path relative to the source folder, '/'-separated."""
  return path.relative_to(root).as_posix()
