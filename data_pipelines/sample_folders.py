"""The reference's sample folders (its ``data_process/``, annotated by ViPE) as posed clips.

One folder per clip (the reference numbers them ``00000000/``, ``00000001/``, ...):

  clip.mp4           the video: every frame, RGB (fps from the file; 16 when it gives none,
                     as the reference's ``video_io.get_video_fps``).
  depth.zip          one OpenEXR image per frame, named ``<frame index>.exr`` (any zero
                     padding), channel ``Z`` (half float as ViPE writes it; float accepted):
                     metric z-depth, the same size as the video. Depth that is not > 0 or
                     not finite is a hole. An EXR that does not decode is a frame without
                     depth (the reference reads it as all-NaN and keeps the clip).
  pose.npz           ``inds (N,)`` frame indices and ``data (N, 4, 4)`` OpenCV camera-to-world
                     poses; the entries may come in any order, but every frame needs exactly
                     one (the reference refuses a clip whose ``inds`` are not 0..T-1).
  intrinsics.npz     ``inds (N,)`` and ``data (N, 4)`` = fx, fy, cx, cy in pixels of the video;
                     the same rules as pose.npz.
  mask.zip           one PNG per frame (member names in sorted order = frame order), > 0 where
                     content moves; the same size as the video. A clip with a frame that is
                     >= 95% moving is skipped (the reference's ``check_dynamic_mask_quality``).
  train_sample.json  the reference's window (t0, P_idx, T_idx, C_idx, scene_idx, ...):
                     checked when present (indices inside the clip), not carried (training
                     picks its own windows).
  clip.txt           caption of clip.mp4 (``run_video_captioning``); else
                     ``train_target_rgb.txt`` (the caption the reference trains with).

Read into the clip format of ``data_pipelines/clip.py``: ``dynamic_masks`` 1 where the mask
is set (the reference's masks have no object ids), ``depth_valid`` 0 at the depth holes (the
depth there is the placeholder), ``caption``, ``has_depth`` True. The intrinsics are kept as
the files give them, as ``files.load_geometry_npz`` keeps the reference's ``geometry.npz``
(which ``run_pipeline`` writes from these same files).

The folders may be local or on Cloud Storage (``gs://bucket/prefix``, through
``mirage_jax.paths``): each file is read whole into memory (the video through a temporary
local copy: ffmpeg reads files), so a folder reads the same from either place.

Every problem with a folder raises one ``InputError`` naming the file (and the zip member)
and what is wrong, the same words wherever the folder is; the ``reference_samples`` builder
skips such folders with that line. ``write_sample_folder`` writes a clip in this layout
(tests, round trips; local folders only); it never reads.
"""

from __future__ import annotations

import io
import json
import logging
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import imageio.v3 as iio
import numpy as np

from data_pipelines import files
from data_pipelines.clip import Clip, check_depth_coverage, validate_clip
from mirage_jax import paths
from mirage_jax.atomic import atomic_output
from mirage_jax.errors import InputError

VIDEO, DEPTH_ZIP, MASK_ZIP = "clip.mp4", "depth.zip", "mask.zip"
POSE_NPZ, INTRINSICS_NPZ, SAMPLE_JSON = "pose.npz", "intrinsics.npz", "train_sample.json"
CAPTION_FILES = ("clip.txt", "train_target_rgb.txt")
DEPTH_CHANNEL = "Z"  # the reference reads exr.channels(["Z"]) as float16
DEFAULT_FPS = 16.0
MAX_DYNAMIC_FRACTION = 0.95
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, KeyError)


def _exr():
  try:
    import OpenEXR  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise InputError("depth.zip", "OpenEXR", "reading the reference's EXR depth needs pip "
                     "install -e '.[samples]' (the openexr package)") from e
  return OpenEXR


def _normal(path: str | os.PathLike) -> str:
  """A local path as ``pathlib`` spells it (so messages name files one way); URLs as given."""
  path = os.fspath(path)
  return path.rstrip("/") if paths.is_remote(path) else str(Path(path))


def find_sample_folders(root: str | os.PathLike) -> list[str]:
  """Every folder under ``root`` (itself included; local or ``gs://``) holding a ``clip.mp4``,
  in sorted order (by path components, so a local and a ``gs://`` copy list the same)."""
  root = _normal(root)
  if not paths.isdir(root):
    raise InputError(root, "source_dir", "is not a directory")
  found = {rel.rpartition("/")[0] for rel in paths.list_files(root)
           if rel.rpartition("/")[2] == VIDEO}
  if not found:
    raise InputError(root, "source_dir", f"holds no sample folders (folders with {VIDEO})")
  return [paths.join(root, *rel.split("/")) if rel else root
          for rel in sorted(found, key=lambda rel: rel.split("/"))]


def folder_id(folder: str, root: str | os.PathLike) -> str:
  """A folder's id: its path relative to ``root``, ``/``-separated ("." for root itself)."""
  root = _normal(root)
  if paths.is_remote(root):
    return folder[len(root):].strip("/") or "."
  return Path(folder).relative_to(root).as_posix()


# ----------------------------------------------------------------------------- reading


def _zip_members(path: str) -> list[tuple[str, bytes]]:
  """(name, bytes) of every file in a zip, names sorted; a corrupt archive is refused."""
  if not paths.isfile(path):
    raise InputError(path, "file", "missing")
  try:
    with zipfile.ZipFile(io.BytesIO(paths.read_bytes(path))) as archive:
      names = sorted(n for n in archive.namelist() if n and not n.endswith("/"))
      return [(n, archive.read(n)) for n in names]
  except _ZIP_ERRORS as e:
    raise InputError(path, "file", f"unreadable zip, truncated or corrupt ({type(e).__name__}: "
                     f"{e})".splitlines()[0]) from e


def _decode_exr(data: bytes) -> np.ndarray | None:
  """One EXR's ``Z`` channel as (H, W) float32; None if the file does not decode."""
  OpenEXR = _exr()  # pylint: disable=invalid-name
  try:
    image = OpenEXR.File(io.BytesIO(data))
    channels = image.channels()
  except (RuntimeError, OSError, ValueError):
    return None
  if DEPTH_CHANNEL not in channels:
    raise KeyError(sorted(channels))
  return np.asarray(channels[DEPTH_CHANNEL].pixels, np.float32)


def read_depths(path: str, t: int, h: int, w: int) -> np.ndarray:
  """``depth.zip`` -> (T, H, W) float32 with NaN for a frame whose EXR does not decode."""
  members = _zip_members(path)
  if len(members) != t:
    raise InputError(path, "members", f"{len(members)} depth maps for the {t} frames of {VIDEO}")
  depths = np.full((t, h, w), np.nan, np.float32)
  seen = set()
  for name, data in members:
    try:
      i = int(Path(name).stem)
    except ValueError:
      raise InputError(path, name, "not named by its frame index (<index>.exr)") from None
    if not 0 <= i < t or i in seen:
      raise InputError(path, name, f"frame index {i} repeated or outside 0..{t - 1}")
    seen.add(i)
    try:
      z = _decode_exr(data)
    except KeyError as e:
      raise InputError(path, name, f"no channel {DEPTH_CHANNEL!r} (has {e.args[0]})") from None
    if z is None:
      logging.warning("%s: %s does not decode as EXR; frame %d has no depth (as the reference "
                      "reads it)", path, name, i)
      continue
    if z.shape != (h, w):
      raise InputError(path, name, f"depth map is {z.shape[1]}x{z.shape[0]}, the video {w}x{h}")
    depths[i] = z
  return depths


def read_masks(path: str, t: int, h: int, w: int) -> np.ndarray:
  """``mask.zip`` -> (T, H, W) uint8, 1 where content moves."""
  members = _zip_members(path)
  if len(members) != t:
    raise InputError(path, "members", f"{len(members)} masks for the {t} frames of {VIDEO}")
  masks = np.zeros((t, h, w), np.uint8)
  for i, (name, data) in enumerate(members):
    try:
      mask = np.asarray(iio.imread(data))
    except Exception as e:  # pylint: disable=broad-except  # each image plugin fails its own way
      raise InputError(path, name, f"unreadable image ({type(e).__name__})") from e
    if mask.ndim == 3:
      mask = mask[..., 0]  # as the reference: the first channel
    if mask.shape != (h, w):
      raise InputError(path, name, f"mask is {mask.shape[1:2] + mask.shape[:1]} (w, h), the "
                       f"video {(w, h)}")
    masks[i] = mask > 0
  return masks


def read_indexed(path: str, t: int, row_shape: tuple[int, ...]) -> np.ndarray:
  """``{inds, data}`` npz -> data (T, *row_shape) float64 in frame order.

  Entries may come in any order; every frame 0..T-1 needs exactly one (the reference's
  ``_load_poses_from_npz`` / ``_load_intrinsics_from_npz`` refuse anything else).
  """
  if not paths.isfile(path):
    raise InputError(path, "file", "missing")
  arrays = files._load_npz(path)  # pylint: disable=protected-access
  for key in ("inds", "data"):
    if key not in arrays:
      raise InputError(path, key, f"missing (the file has {sorted(arrays)})")
  inds, data = np.asarray(arrays["inds"]), np.asarray(arrays["data"])
  if inds.ndim != 1 or not np.issubdtype(inds.dtype, np.integer):
    raise InputError(path, "inds", f"expected a 1-D integer array, got {inds.dtype} {inds.shape}")
  if data.shape != (len(inds),) + row_shape or not np.issubdtype(data.dtype, np.number):
    raise InputError(path, "data", f"expected shape {(len(inds),) + row_shape} numbers, got "
                     f"{data.dtype} {data.shape}")
  missing = sorted(set(range(t)) - set(inds.tolist()))
  if len(inds) != t or missing:
    shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
    raise InputError(path, "inds", f"{len(inds)} entries for the {t} frames of {VIDEO}"
                     + (f"; frames without one: {shown}" if missing else "; duplicates or "
                        "indices outside the clip"))
  return data[np.argsort(inds, kind="stable")].astype(np.float64)


def _check_sample_json(path: str, t: int) -> None:
  try:
    meta = json.loads(paths.read_bytes(path).decode("utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise InputError(path, "file", f"not readable JSON ({type(e).__name__}: {e})") from e
  if not isinstance(meta, dict):
    raise InputError(path, "file", f"expected a JSON object, got {type(meta).__name__}")
  for key in ("P_idx", "T_idx", "C_idx", "R_idx"):
    idx = meta.get(key, [])
    if not isinstance(idx, list) or not all(isinstance(i, int) and 0 <= i < t for i in idx):
      raise InputError(path, key, f"expected frame indices in 0..{t - 1}, got {str(idx)[:80]}")
  for key in ("t0", "scene_idx"):
    if key in meta and not (isinstance(meta[key], int) and 0 <= meta[key] < t):
      raise InputError(path, key, f"expected a frame index in 0..{t - 1}, got {meta[key]!r}")


def read_caption(folder: str | os.PathLike) -> str:
  """The folder's caption (``CAPTION_FILES``, first found), stripped; "" without one."""
  for name in CAPTION_FILES:
    path = paths.join(_normal(folder), name)
    if paths.isfile(path):
      try:
        text = paths.read_bytes(path).decode("utf-8")
        return text.replace("\r\n", "\n").replace("\r", "\n").strip()  # as text mode reads it
      except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, "caption", f"unreadable text ({type(e).__name__})") from e
  return ""


def read_video(video: str | os.PathLike) -> tuple[np.ndarray, float]:
  """``clip.mp4`` -> frames (T, H, W, 3) uint8 RGB and fps (16 when the file gives none).

  One ffmpeg pass for both: its header gives the fps and size, then the frames stream.
  """
  import imageio_ffmpeg  # pylint: disable=g-import-not-at-top
  video = _normal(video)
  try:
    with paths.local_file(video) as local:
      try:
        reader = imageio_ffmpeg.read_frames(local, pix_fmt="rgb24")
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]
      except Exception as e:  # pylint: disable=broad-except  # ffmpeg fails many ways on bad files
        # ffmpeg names the file it read: the copy's name would differ from a local read's.
        problem = f"unreadable video ({type(e).__name__}: {e})".splitlines()[0].replace(local, video)
        raise InputError(video, "frames", problem) from e
  except OSError as e:  # the copy down failed
    raise InputError(video, "frames", f"unreadable video ({type(e).__name__}: {e})".splitlines()[0]) from e
  if not frames:
    raise InputError(video, "frames", "no frames")
  fps = float(meta.get("fps") or 0.0)
  return np.stack(frames), (fps if np.isfinite(fps) and fps > 0 else DEFAULT_FPS)


def read_sample_folder(folder: str | os.PathLike) -> Clip:
  """One sample folder (module docstring) -> a validated clip.

  Returns:
    The clip of ``data_pipelines/clip.py`` with ``depth_valid``, ``caption`` and ``has_depth``.
  Raises:
    InputError: naming the file (and member) at fault; also for a clip with under
      ``clip.MIN_VALID_DEPTH_FRACTION`` valid depth or a frame >= 95% moving.
  """
  folder = _normal(folder)
  video = paths.join(folder, VIDEO)
  if not paths.isfile(video):
    raise InputError(video, "file", "missing")
  frames, fps = read_video(video)
  t, h, w, _ = frames.shape
  depths = read_depths(paths.join(folder, DEPTH_ZIP), t, h, w)
  masks = read_masks(paths.join(folder, MASK_ZIP), t, h, w)
  poses = read_indexed(paths.join(folder, POSE_NPZ), t, (4, 4))
  fxfycxcy = read_indexed(paths.join(folder, INTRINSICS_NPZ), t, (4,))
  if paths.isfile(paths.join(folder, SAMPLE_JSON)):
    _check_sample_json(paths.join(folder, SAMPLE_JSON), t)
  intrinsics = np.zeros((t, 3, 3))
  intrinsics[:, 0, 0], intrinsics[:, 1, 1] = fxfycxcy[:, 0], fxfycxcy[:, 1]
  intrinsics[:, 0, 2], intrinsics[:, 1, 2], intrinsics[:, 2, 2] = fxfycxcy[:, 2], fxfycxcy[:, 3], 1.0
  moving = masks.reshape(t, -1).mean(axis=1)
  if moving.max() >= MAX_DYNAMIC_FRACTION:
    raise InputError(paths.join(folder, MASK_ZIP), "masks", f"frame {int(moving.argmax())} is "
                     f"{moving.max():.0%} moving (the reference skips clips from 95%)")
  with np.errstate(invalid="ignore"):
    valid = np.isfinite(depths) & (depths > 0)
  check_depth_coverage(valid, paths.join(folder, DEPTH_ZIP))
  clip = validate_clip(dict(frames=frames, depths=depths, depth_valid=valid, intrinsics=intrinsics,
                            poses_c2w=poses, fps=fps, dynamic_masks=masks,
                            caption=read_caption(folder)), folder)
  clip["has_depth"] = np.bool_(True)
  return clip


# ----------------------------------------------------------------------------- writing


def _encode_exr(depth: np.ndarray) -> bytes:
  """(H, W) depth -> EXR bytes, one half-float ``Z`` channel (what the reference reads)."""
  OpenEXR = _exr()  # pylint: disable=invalid-name
  header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
  image = OpenEXR.File(header, {DEPTH_CHANNEL: np.ascontiguousarray(depth, np.float16)})
  buffer = io.BytesIO()
  image.write(buffer)
  return buffer.getvalue()


def _encode_png(image: np.ndarray) -> bytes:
  return iio.imwrite("<bytes>", image, extension=".png")


def write_sample_folder(folder: str | os.PathLike, clip: Mapping[str, Any], *,
                        sample_meta: Mapping[str, Any] | None = None,
                        entry_order: np.ndarray | None = None, lossless: bool = True) -> None:
  """Writes a clip as a sample folder (module docstring); each file atomically.

  Depth holes (``depth_valid`` 0) are written as 0 (not > 0: a hole for the reference too);
  depth is stored as half floats, as ViPE writes it, so depth round-trips exactly only when it
  is representable in float16. The video is lossless RGB (libx264rgb, qp 0), so frames
  round-trip exactly; ``lossless=False`` writes it as the reference's clips are (libx264,
  yuv420p).

  Args:
    folder: created if needed.
    clip: a clip of ``data_pipelines/clip.py`` (validated here first); ``caption`` goes to
      clip.txt when not empty.
    sample_meta: train_sample.json's content (default: the whole clip as targets).
    entry_order: (T,) permutation: the order of the pose/intrinsics entries (``inds``).
  """
  folder = Path(folder)
  c = validate_clip(clip, str(folder))
  t, h, w = c["depths"].shape
  folder.mkdir(parents=True, exist_ok=True)
  with atomic_output(folder / VIDEO) as tmp:
    if lossless:
      iio.imwrite(tmp, c["frames"], extension=".mp4", fps=float(c["fps"]), codec="libx264rgb",
                  output_params=["-qp", "0"], pixelformat="rgb24", macro_block_size=1)
    else:
      iio.imwrite(tmp, c["frames"], extension=".mp4", fps=float(c["fps"]), codec="libx264",
                  pixelformat="yuv420p", macro_block_size=1)
  depths = np.where(c["depth_valid"] > 0, c["depths"], 0.0)
  for name, entries in ((DEPTH_ZIP, [(f"{i:05d}.exr", _encode_exr(depths[i])) for i in range(t)]),
                        (MASK_ZIP, [(f"{i:05d}.png", _encode_png(np.where(c["dynamic_masks"][i] > 0, 255, 0)
                                                                 .astype(np.uint8))) for i in range(t)])):
    with atomic_output(folder / name) as tmp:
      with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for member, data in entries:
          archive.writestr(member, data)
  order = np.arange(t) if entry_order is None else np.asarray(entry_order)
  K = c["intrinsics"].astype(np.float64)
  fxfycxcy = np.stack([K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2]], -1)
  for name, data in ((POSE_NPZ, c["poses_c2w"].astype(np.float64)), (INTRINSICS_NPZ, fxfycxcy)):
    with atomic_output(folder / name) as tmp:
      with open(tmp, "wb") as f:
        np.savez(f, inds=order.astype(np.int64), data=data[order])
  meta = dict(sample_meta) if sample_meta is not None else dict(
      t0=0, P_idx=[], T_idx=list(range(t)), C_idx=[], scene_idx=0, output_size=[h, w],
      naming="figure")
  with atomic_output(folder / SAMPLE_JSON) as tmp:
    Path(tmp).write_text(json.dumps(meta, indent=2), encoding="utf-8")
  if c["caption"]:
    with atomic_output(folder / CAPTION_FILES[0]) as tmp:
      Path(tmp).write_text(c["caption"], encoding="utf-8")
