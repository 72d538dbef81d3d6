r"""Makes the ``geometry.npz`` that ``python -m mirage_jax.generate --geometry_path`` reads.

From a clip of a built dataset (``python -m data_pipelines.build``; ``make main`` builds one
in ``runs/tiny/data``):

  python -m data_pipelines.make_geometry --data_dir=runs/tiny/data --clip=0 \
      --output=clip/geometry.npz [--dataset=procedural_rooms --config_name=default \
      --split=test --frame_range=0:24]

From your own frames, depth and cameras:

  python -m data_pipelines.make_geometry --frames=first_frame.png --depth=depth.npy \
      --cameras=cameras.txt --output=mine/geometry.npz [--fps=30]

* ``--frames``: one image (``.png/.jpg``: the first frame, where only it is known), a video
  (``.mp4/.gif/.avi``) or a folder of images (sorted by name): K frames, RGB.
* ``--depth``: metric z-depth in metres (> 0 and finite), ``.npy`` of shape (H, W) (the first
  frame's) or (K', H, W), or an ``.npz`` holding one such array (``depth`` or ``depths``); the
  frames' size.
* ``--cameras``: T >= K cameras, either a RealEstate10K camera file (``.txt``: a URL line,
  then per frame ``timestamp fx fy cx cy k1 k2`` + the 3x4 world-to-camera matrix row-major,
  intrinsics normalised by the image size; the format of ``--dataset=posed_files``) or an
  ``.npz`` with ``poses_c2w (T, 4, 4)`` OpenCV camera-to-world (x right, y down, z forward)
  and ``intrinsics (T, 3, 3)`` or ``(3, 3)`` in pixels of the frames, optionally ``fps``.

Frames and depth maps beyond the known ones repeat the last known one, and the file records
``known_frames`` and ``known_depths`` (``data_pipelines/files.py``): ``generate`` of the small
family reads only frame 0 (RGB and depth) and every camera, so one frame is enough; the Wan
family writes every frame's depth into its memory and refuses a file with fewer depth maps
than frames to generate. Such a file is not training data (``posed_files`` builds refuse it).

``--first_frame_only`` writes frame 0 alone (RGB, and depth where the source has it) with
every camera (``--depth`` may then be left out: a file without depth, for a model that
estimates it): ``frames (1, H, W, 3)``, ``depths (1, H, W)``, ``intrinsics (T, 3, 3)``,
``poses_c2w (T, 4, 4)``, ``fps`` (the reference's first-frame inference input; read by
``files.load_inference_geometry``, refused by the ``posed_files`` builds).

Every bad input is one line naming the file and the field (exit 2); an existing ``--output``
is never replaced without ``--overwrite``. The file is written atomically (temp, then rename).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from absl import flags

from mirage_jax import paths
from mirage_jax.errors import InputError, run_app

# The command's flags are defined only when it runs as a script (tests import this module
# beside other commands that define flags of the same names).
_OUTPUT = _OVERWRITE = _DATA_DIR = _DATASET = _CONFIG_NAME = _SPLIT = _CLIP = _RANGE = None
_FRAMES = _DEPTH = _CAMERAS = _FPS = _FIRST_ONLY = None
_OWN_FLAGS = ()


def _define_flags() -> None:
  global _OUTPUT, _OVERWRITE, _DATA_DIR, _DATASET, _CONFIG_NAME, _SPLIT, _CLIP, _RANGE  # pylint: disable=global-statement
  global _FRAMES, _DEPTH, _CAMERAS, _FPS, _OWN_FLAGS, _FIRST_ONLY  # pylint: disable=global-statement
  _OUTPUT = flags.DEFINE_string("output", None, "The geometry.npz to write.")
  _OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")
  _FIRST_ONLY = flags.DEFINE_bool("first_frame_only", False, "Write frame 0's RGB and depth "
                                  "with every camera only (an input of generate).")
  # From a built dataset.
  _DATA_DIR = flags.DEFINE_string("data_dir", None, "Built datasets (python -m data_pipelines.build).")
  _DATASET = flags.DEFINE_string("dataset", "procedural_rooms", "Dataset name under --data_dir.")
  _CONFIG_NAME = flags.DEFINE_string("config_name", "default", "Dataset config name.")
  _SPLIT = flags.DEFINE_string("split", "test", "Dataset split (train, validation, test).")
  _CLIP = flags.DEFINE_integer("clip", 0, "Index of the clip in --split.")
  _RANGE = flags.DEFINE_string("frame_range", None, "a:b keeps frames a..b-1 of the clip (default all).")
  # From your own files.
  _FRAMES = flags.DEFINE_string("frames", None, "An image (the first frame), a video or a folder of images.")
  _DEPTH = flags.DEFINE_string("depth", None, "Depth in metres: .npy (H, W) or (K, H, W), or an .npz of one.")
  _CAMERAS = flags.DEFINE_string("cameras", None, "RealEstate10K camera .txt, or .npz with poses_c2w "
                                 "(T, 4, 4) and intrinsics (T, 3, 3) or (3, 3) in pixels.")
  _FPS = flags.DEFINE_float("fps", None, "Frame rate (default: the cameras file's, else 30).")

  _OWN_FLAGS = (_FRAMES, _DEPTH, _CAMERAS)


# ----------------------------------------------------------------------------- a built dataset


def parse_range(text: str | None, length: int, where: str) -> slice:
  """``'a:b'`` (either side may be empty) -> a slice of at least 2 frames within ``length``."""
  if not text:
    return slice(0, length)
  a, sep, b = text.partition(":")
  try:
    start, stop = int(a) if a else 0, int(b) if b else length
  except ValueError:
    start = stop = -1
  if not sep or not 0 <= start < stop <= length or stop - start < 2:
    raise InputError(where, "frame_range", f"need a:b with 0 <= a, a + 2 <= b <= {length} "
                     f"(the clip's frames), got {text!r}")
  return slice(start, stop)


def from_dataset(data_dir: str, dataset: str, config_name: str, split: str, index: int,
                 frame_range: str | None = None) -> dict[str, np.ndarray]:
  """Clip ``index`` of a built dataset's ``split``, frames ``frame_range``, as a clip dict."""
  from data_pipelines import builders  # pylint: disable=g-import-not-at-top
  builder = builders.load(data_dir, dataset, config_name)
  if split not in builder.info.splits:
    raise InputError(builder.data_dir, "split", f"no split {split!r} (the dataset has "
                     f"{', '.join(builder.info.splits)})")
  source = builder.as_data_source(split)
  if not 0 <= index < len(source):
    raise InputError(builder.data_dir, "clip", f"index {index} not in the {split} split's "
                     f"{len(source)} clips")
  clip = builders.record_to_clip(source[index])
  where = f"{builder.data_dir} {split}[{index}]"
  keep = parse_range(frame_range, len(clip["frames"]), where)
  out = {k: clip[k][keep] for k in ("frames", "depths", "intrinsics", "poses_c2w", "dynamic_masks",
                                    "depth_valid")}  # its holes: generate lifts nothing there
  out.update(fps=clip["fps"], has_depth=clip["has_depth"],
             object_tracks=clip["object_tracks"][:, keep])
  return out


# ----------------------------------------------------------------------------- your own files


def read_frames(path: str) -> np.ndarray:
  """An image, a video or a folder of images -> (K, H, W, 3) uint8."""
  from data_pipelines import files  # pylint: disable=g-import-not-at-top
  p = Path(path)
  if p.is_dir():
    images = sorted(q for q in p.iterdir() if q.suffix.lower() in files.IMAGE_SUFFIXES)
    if not images:
      raise InputError(p, "frames", "a folder without .png/.jpg images")
    frames = [files.read_image(q) for q in images]
    for q, f in zip(images, frames):
      if f.shape != frames[0].shape:
        raise InputError(q, "frames", f"size {f.shape[:2]} differs from {images[0].name}'s "
                         f"{frames[0].shape[:2]}")
    return np.stack(frames)
  if not p.is_file():
    raise InputError(p, "frames", "does not exist")
  if p.suffix.lower() in files.IMAGE_SUFFIXES:
    return files.read_image(p)[None]
  if p.suffix.lower() in files.VIDEO_SUFFIXES:
    return files.read_video(p)
  raise InputError(p, "frames", f"expected an image ({', '.join(files.IMAGE_SUFFIXES)}), a video "
                   f"({', '.join(files.VIDEO_SUFFIXES)}) or a folder of images")


def read_depth(path: str) -> np.ndarray:
  """``.npy`` (H, W) / (K, H, W), or an ``.npz`` of one such array -> (K, H, W) float32."""
  p = Path(path)
  if not p.is_file():
    raise InputError(p, "depth", "does not exist")
  try:
    loaded = np.load(p, allow_pickle=False)
  except (OSError, EOFError, ValueError) as e:
    raise InputError(p, "depth", f"not a readable .npy/.npz ({type(e).__name__}: {e})".splitlines()[0]) from e
  if isinstance(loaded, np.lib.npyio.NpzFile):
    with loaded:
      keys = [k for k in ("depth", "depths") if k in loaded.files]
      if not keys and len(loaded.files) != 1:
        raise InputError(p, "depth", f"expected an array named depth or depths (the file has "
                         f"{sorted(loaded.files)})")
      depth = loaded[keys[0] if keys else loaded.files[0]]
  else:
    depth = loaded
  if not np.issubdtype(depth.dtype, np.floating) and not np.issubdtype(depth.dtype, np.integer):
    raise InputError(p, "depth", f"expected numbers, got dtype {depth.dtype}")
  if depth.ndim == 2:
    depth = depth[None]
  if depth.ndim != 3:
    raise InputError(p, "depth", f"expected shape (H, W) or (K, H, W), got {depth.shape}")
  if not np.all(np.isfinite(depth)) or np.any(depth <= 0):
    bad = int(np.sum(~np.isfinite(depth) | (depth <= 0)))
    raise InputError(p, "depth", f"{bad} values not finite and > 0 (metric z-depth in metres)")
  return depth.astype(np.float32)


def read_cameras(path: str, height: int, width: int) -> tuple[np.ndarray, np.ndarray, float | None]:
  """Cameras for frames of ``height`` x ``width``: intrinsics (T, 3, 3), poses_c2w (T, 4, 4), fps."""
  from data_pipelines import files  # pylint: disable=g-import-not-at-top
  p = Path(path)
  if not p.is_file():
    raise InputError(p, "cameras", "does not exist")
  if p.suffix == ".txt":
    return files.re10k_cameras(p, height, width)
  if p.suffix != ".npz":
    raise InputError(p, "cameras", "expected a RealEstate10K camera .txt or an .npz")
  try:
    with np.load(p, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except (OSError, EOFError, ValueError, AttributeError) as e:
    raise InputError(p, "cameras", f"not a readable npz ({type(e).__name__}: {e})".splitlines()[0]) from e
  for key in ("poses_c2w", "intrinsics"):
    if key not in arrays:
      raise InputError(p, key, f"missing (the file has {sorted(arrays)})")
  poses, intrinsics = arrays["poses_c2w"], arrays["intrinsics"]
  if poses.ndim != 3 or poses.shape[1:] != (4, 4):
    raise InputError(p, "poses_c2w", f"expected shape (T, 4, 4), got {poses.shape}")
  if intrinsics.shape == (3, 3):
    intrinsics = np.broadcast_to(intrinsics, (len(poses), 3, 3))
  if intrinsics.shape != (len(poses), 3, 3):
    raise InputError(p, "intrinsics", f"expected shape (3, 3) or ({len(poses)}, 3, 3), got "
                     f"{intrinsics.shape}")
  fps = float(np.asarray(arrays["fps"]).reshape(())) if "fps" in arrays else None
  return intrinsics, poses, fps


def from_files(frames_path: str, depth_path: str | None, cameras_path: str,
               fps: float | None = None) -> dict[str, np.ndarray]:
  """Your own frames, depth and cameras (module docstring) as a clip dict.

  Without ``depth_path`` (``--first_frame_only``) the depth is a placeholder and the clip
  says ``has_depth`` False.
  """
  from data_pipelines import files  # pylint: disable=g-import-not-at-top
  frames = read_frames(frames_path)
  k, h, w, _ = frames.shape
  depth = (read_depth(depth_path) if depth_path
           else np.full((1, h, w), files.PLACEHOLDER_DEPTH, np.float32))
  if depth.shape[1:] != (h, w):
    raise InputError(depth_path, "depth", f"size {depth.shape[1]}x{depth.shape[2]} differs from "
                     f"the frames' {h}x{w}")
  intrinsics, poses, file_fps = read_cameras(cameras_path, h, w)
  t = len(poses)
  if t < 2:
    raise InputError(cameras_path, "poses_c2w", f"need at least 2 cameras to generate along, got {t}")
  for path, field, n in ((frames_path, "frames", k), (depth_path, "depth", len(depth))):
    if n > t:
      raise InputError(path, field, f"{n} frames but {cameras_path} has only {t} cameras")

  def fill(x: np.ndarray) -> np.ndarray:  # repeat the last known frame up to T
    return np.concatenate([x, np.repeat(x[-1:], t - len(x), axis=0)])

  from data_pipelines.clip import validate_clip  # pylint: disable=g-import-not-at-top
  # Validated here so that a bad camera (intrinsics, a non-rigid pose) names the cameras file.
  clip = validate_clip(dict(frames=fill(frames), depths=fill(depth), intrinsics=intrinsics,
                            poses_c2w=poses, fps=np.float32(fps or file_fps or files.DEFAULT_FPS)),
                       cameras_path)
  return dict(clip, has_depth=np.bool_(bool(depth_path)), known_frames=np.int64(k),
              known_depths=np.int64(len(depth)))


# ----------------------------------------------------------------------------- CLI


def _main() -> int:
  from data_pipelines import files  # pylint: disable=g-import-not-at-top
  for flag in (_OUTPUT, _DATA_DIR, *_OWN_FLAGS):
    paths.require_local(flag.value, f"--{flag.name}", "copy it to a local disk first")
  if not _OUTPUT.value:
    raise InputError("--output", "output", "required (the geometry.npz to write)")
  own = [f for f in _OWN_FLAGS if f.value]
  if _DATA_DIR.value and own:
    raise InputError(f"--{own[0].name}", own[0].name, "give either --data_dir (a built dataset's "
                     "clip) or --frames/--depth/--cameras (your own files), not both")
  needed = [f for f in _OWN_FLAGS if not (f is _DEPTH and _FIRST_ONLY.value)]  # depth optional there
  if not _DATA_DIR.value and any(not f.value for f in needed):
    missing = [f for f in needed if not f.value]
    raise InputError(f"--{missing[0].name}", missing[0].name, "required with --frames/--depth/"
                     "--cameras (or give --data_dir and --clip for a built dataset's clip)")
  if os.path.isdir(_OUTPUT.value):
    raise InputError(_OUTPUT.value, "output", "is a folder (name the .npz file to write)")
  if os.path.exists(_OUTPUT.value) and not _OVERWRITE.value:
    raise InputError(_OUTPUT.value, "output", "exists (pass --overwrite to replace it)")
  if _DATA_DIR.value:
    clip = from_dataset(_DATA_DIR.value, _DATASET.value, _CONFIG_NAME.value, _SPLIT.value,
                        _CLIP.value, _RANGE.value)
    source = f"{_DATA_DIR.value} {_DATASET.value} {_SPLIT.value}[{_CLIP.value}]"
  else:
    clip = from_files(_FRAMES.value, _DEPTH.value, _CAMERAS.value, _FPS.value)
    source = ", ".join(f.value for f in _OWN_FLAGS if f.value)
  t, h, w = clip["depths"].shape
  if _FIRST_ONLY.value:
    files.save_first_frame_geometry(_OUTPUT.value, clip)  # validates the clip
    print(f"wrote {_OUTPUT.value}: {t} cameras, frame 0 of {h}x{w} "
          f"{'with' if clip.get('has_depth', True) else 'without'} its depth (from {source})")
    return 0
  files.save_geometry_npz(_OUTPUT.value, clip)  # validates the clip (one line per bad field)
  print(f"wrote {_OUTPUT.value}: {t} cameras, {h}x{w} frames, {int(clip.get('known_frames', t))} "
        f"with their own RGB, {int(clip.get('known_depths', t))} with their own depth "
        f"(from {source})")
  return 0


if __name__ == "__main__":
  _define_flags()
  run_app(_main)
