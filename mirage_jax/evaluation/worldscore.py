"""WorldScore's cases read, and our generations written where its evaluator reads them.

WorldScore (github haoyi-duan/WorldScore) ships no cameras: each case (one entry of
``<WorldScore-Dataset>/<static|dynamic>/<static|dynamic>.json``) names an input image, its
prompts and a ``camera_path`` of layout words ("push_in", "orbit_left", ...), and its
``CameraGen`` turns those words into a camera trajectory. This module re-derives that
trajectory in numpy (the moves and their sizes as documented in docs/DESIGN.md, "WorldScore",
with the file and line each is read from), converts it to our OpenCV camera-to-world poses
and intrinsics, and writes one case's outputs in the layout WorldScore's evaluator
(``worldscore/benchmark/helpers/evaluator.py``) scans:

  <output_dir>/static/<visual_style>/<scene_type>/<category>/<name>/
      frames/000.png ...          every generated frame, at WorldScore's resolution
      videos/output.mp4           the same frames
      input_image.png             the centre-cropped, resized input image
      camera_data.json            focal_length, scale, cameras (keyframes), cameras_interp
                                  (one per frame), Blender camera-to-world 4x4
      image_data.json             the case's entry + num_scenes, total_frames,
                                  anchor_frame_idx (static)
      time.txt                    generate_time: seconds
  <output_dir>/dynamic/<visual_style>/<motion_type>/<name>/   (the same files)

No torch, no WorldScore import: only its file formats.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from scipy.spatial.transform import Rotation, Slerp

from mirage_jax.errors import InputError
from mirage_jax.evaluation import report, video

MOVEMENTS = ("static", "dynamic")
# WorldScore's defaults: config/base_config.yaml (focal_length 500, frames 50) and
# camera_generator.py (camera_speed 1 when a model config sets none; 30-degree turns).
DEFAULT_FOCAL = 500.0
DEFAULT_FRAMES = 50
DEFAULT_SPEED = 1.0
TURN_DEG = 30.0
# Camera axes: WorldScore's generator works in PyTorch3D camera axes (x left, y up, z forward)
# and saves Blender ones (x right, y up, z back); ours are OpenCV (x right, y down, z forward).
PT3D_TO_BLENDER = np.diag([-1.0, 1.0, -1.0, 1.0])
BLENDER_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])
# Layout word -> the move of one keyframe ("fixed", in WorldScore's layout table for dynamic
# cases but not in its generator, is the camera standing still).
LAYOUTS = ("push_in", "pull_out", "move_left", "move_right", "orbit_left", "orbit_right",
           "pan_left", "pan_right", "fixed")


def _turn(theta_deg: float) -> np.ndarray:
  """WorldScore's 3x3 turn about the camera's y axis (R @ this turns the camera)."""
  t = np.deg2rad(theta_deg)
  c, s = np.cos(t), np.sin(t)
  return np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])


def _rt(rotation: np.ndarray, translation) -> np.ndarray:
  out = np.eye(4)
  out[:3, :3], out[:3, 3] = rotation, translation
  return out


def _keyframe(w2c: np.ndarray, layout: str, speed: float) -> np.ndarray:
  """The next keyframe's w2c (PyTorch3D camera axes, x_cam = R x_world + T) after ``layout``
  from the camera ``w2c`` (4, 4)."""
  R, T = w2c[:3, :3].copy(), w2c[:3, 3].copy()
  step = {"push_in": (2, -1.0), "pull_out": (2, 1.0), "move_left": (0, -0.5),
          "move_right": (0, 0.5)}
  if layout in step:
    axis, amount = step[layout]
    T[axis] += speed * amount
    return _rt(R, T)
  if layout in ("pan_left", "pan_right"):
    return _rt(R @ _turn(TURN_DEG if layout == "pan_left" else -TURN_DEG), T)
  if layout in ("orbit_left", "orbit_right"):
    # About a pivot ``speed`` in front of the camera: shift the pivot to the origin, turn,
    # shift back (the turn sign is opposite to the pan's: the camera circles the pivot).
    theta = -TURN_DEG if layout == "orbit_left" else TURN_DEG
    there = _rt(R, [T[0], T[1], speed - T[2]])
    back = _rt(R, [T[0], T[1], T[2] - speed])
    return there @ _rt(_turn(theta), np.zeros(3)) @ back
  if layout == "fixed":
    return w2c.copy()
  raise InputError("camera_path", "layout", f"unknown {layout!r} (known: {', '.join(LAYOUTS)})")


def camera_path_w2c(camera_path: Sequence[str], frames: int, speed: float = DEFAULT_SPEED
                    ) -> tuple[np.ndarray, np.ndarray]:
  """WorldScore's keyframes and per-frame cameras of a layout list, as w2c in PyTorch3D axes.

  Each layout adds one keyframe, made in the frame of the previous one; the first keyframe is
  the identity. Between keyframes, ``frames - 2`` cameras: rotation slerped, translation of
  the w2c interpolated linearly.

  Returns:
    keyframes (S + 1, 4, 4) and per-frame cameras (S * (frames - 1) + 1, 4, 4), S =
    len(camera_path).
  """
  if frames < 2:
    raise InputError("--frames", "frames", f"need at least 2 per scene, got {frames}")
  keys = [np.eye(4)]
  for layout in camera_path:
    last = np.linalg.inv(keys[-1])  # each move is made in the current camera's frame
    keys = [k @ last for k in keys]
    keys.append(_keyframe(keys[-1], layout, speed))
  first = np.linalg.inv(keys[0])
  keys = np.stack([k @ first for k in keys])
  steps = frames - 1
  cameras = [keys[0]]
  for a, b in zip(keys[:-1], keys[1:]):
    t = np.arange(1, steps + 1) / steps
    rotations = Slerp([0.0, 1.0], Rotation.from_matrix(np.stack([a[:3, :3], b[:3, :3]])))(t[:-1])
    for i, rot in enumerate(rotations.as_matrix()):
      cameras.append(_rt(rot, a[:3, 3] + t[i] * (b[:3, 3] - a[:3, 3])))
    cameras.append(b)
  return keys, np.stack(cameras)


def blender_c2w(w2c: np.ndarray) -> np.ndarray:
  """(..., 4, 4) PyTorch3D-axes w2c -> Blender camera-to-world (what camera_data.json holds)."""
  return np.linalg.inv(PT3D_TO_BLENDER @ w2c)


def opencv_c2w(c2w_blender: np.ndarray) -> np.ndarray:
  """(..., 4, 4) Blender camera-to-world -> OpenCV camera-to-world (our poses_c2w)."""
  return c2w_blender @ BLENDER_TO_OPENCV


def intrinsics(num_frames: int, width: int, height: int, focal: float = DEFAULT_FOCAL) -> np.ndarray:
  """(T, 3, 3): WorldScore's pinhole at its resolution (fx = fy = focal, principal point at
  the image centre; the reference's eval/run_worldscore.py build_intrinsics)."""
  K = np.array([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]])
  return np.repeat(K[None], num_frames, axis=0).astype(np.float32)


def center_crop(image: Image.Image, width: int, height: int) -> np.ndarray:
  """WorldScore's ``center_crop``: the largest centred crop of the target aspect, resized to
  width x height. Returns (height, width, 3) uint8."""
  w, h = image.size
  if w / h > width / height:
    cw, ch = int(h * width / height), h
  else:
    cw, ch = w, int(w * height / width)
  left, top = (w - cw) // 2, (h - ch) // 2
  crop = image.convert("RGB").crop((left, top, left + cw, top + ch)).resize((width, height))
  return np.asarray(crop, np.uint8)


def styled_prompts(prompts: Sequence[str], style: str) -> list[str]:
  """WorldScore's prompt list: each prompt followed by the case's style sentence."""
  return [p + (" " if p.endswith(".") else ". ") + style for p in prompts]


@dataclasses.dataclass(frozen=True)
class Case:
  """One WorldScore case.

  Attributes:
    entry: the case's JSON entry as the dataset gives it.
    image_path: its input image. relative_dir: its output folder under --output_dir.
    prompts: WorldScore's prompt list (styled); ``prompts[0]`` is what we generate with.
    camera_path: the layout words.
  """
  entry: dict
  image_path: Path
  relative_dir: str
  prompts: list
  camera_path: list

  @property
  def visual_movement(self) -> str:
    return self.entry["visual_movement"]


def _field(entry: dict, key: str, where: str, kind=str):
  if key not in entry:
    raise InputError(where, key, "missing")
  if not isinstance(entry[key], kind):
    raise InputError(where, key, f"expected {kind.__name__}, got {type(entry[key]).__name__}")
  return entry[key]


def load_cases(dataset_root: str | os.PathLike, visual_movement: str, json_file: str = ""
               ) -> list[Case]:
  """The cases of ``<dataset_root>/<visual_movement>/<json_file or visual_movement.json>``.

  ``dataset_root`` is WorldScore's ``$DATA_PATH/WorldScore-Dataset``; each entry's ``image``
  is relative to it.
  """
  root = Path(dataset_root)
  if visual_movement not in MOVEMENTS:
    raise InputError("--visual_movement", "visual_movement",
                     f"unknown {visual_movement!r} (known: {', '.join(MOVEMENTS)})")
  path = root / visual_movement / (json_file or f"{visual_movement}.json")
  if not path.is_file():
    raise InputError(path, "file", "does not exist (--cases is WorldScore's "
                     "$DATA_PATH/WorldScore-Dataset)")
  try:
    entries = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise InputError(path, "file", f"not a JSON file ({type(e).__name__}: {e})") from e
  if not isinstance(entries, list):
    raise InputError(path, "file", "expected a JSON list of cases")
  cases = []
  for i, entry in enumerate(entries):
    where = f"{path}[{i}]"
    if not isinstance(entry, dict):
      raise InputError(where, "entry", "expected an object")
    image = _field(entry, "image", where)
    camera_path = _field(entry, "camera_path", where, list)
    if not camera_path:
      raise InputError(where, "camera_path", "empty")
    for layout in camera_path:
      if layout not in LAYOUTS:
        raise InputError(where, "camera_path", f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    movement = _field(entry, "visual_movement", where)
    if movement != visual_movement:
      raise InputError(where, "visual_movement", f"{movement!r} in the {visual_movement} list")
    style = _field(entry, "visual_style", where)
    name = Path(image).stem
    if movement == "static":
      prompts = _field(entry, "prompt_list", where, list)
      relative = f"static/{style}/{_field(entry, 'scene_type', where)}/{Path(image).parent.name}/{name}"
    else:
      prompts = [_field(entry, "prompt", where)]
      relative = f"dynamic/{style}/{_field(entry, 'motion_type', where)}/{name}"
    image_path = root / image
    if not image_path.is_file():
      raise InputError(where, "image", f"{image_path} does not exist")
    cases.append(Case(entry, image_path, relative,
                      styled_prompts(prompts, _field(entry, "style", where)), list(camera_path)))
  return cases


def total_frames(case: Case, frames: int) -> int:
  """Frames of a case: ``frames`` per layout, consecutive scenes sharing their keyframe."""
  return len(case.camera_path) * (frames - 1) + 1


def is_complete(case_dir: str | os.PathLike, num_frames: int) -> bool:
  """The case's outputs are there as WorldScore's evaluator checks (``data_exists``)."""
  case_dir = Path(case_dir)
  needed = ["image_data.json", "input_image.png", "camera_data.json"]
  if not all((case_dir / n).is_file() for n in needed) or not (case_dir / "frames").is_dir():
    return False
  pngs = [p for p in os.listdir(case_dir / "frames") if p.endswith((".png", ".jpg"))]
  return len(pngs) >= num_frames


def resize_frames(frames: np.ndarray, width: int, height: int) -> np.ndarray:
  """(T, h, w, 3) uint8 -> (T, height, width, 3) uint8 (bicubic)."""
  if frames.shape[1:3] == (height, width):
    return frames
  return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC))
                   for f in frames])


def write_case(case_dir: str | os.PathLike, case: Case, frames: np.ndarray, input_image: np.ndarray,
               keyframes_c2w: np.ndarray, cameras_c2w: np.ndarray, *, frames_per_scene: int,
               focal: float, speed: float, fps: float, seconds: float, extra: dict[str, Any]
               ) -> None:
  """Writes one case's outputs (module docstring) into ``case_dir``.

  Args:
    frames: (T, H, W, 3) uint8 at WorldScore's resolution. input_image: (H, W, 3) uint8.
    keyframes_c2w, cameras_c2w: Blender camera-to-world (S + 1, 4, 4), (T, 4, 4).
    extra: what we record of the run (``mirage.json``; the evaluator ignores it).
  """
  case_dir = Path(case_dir)
  (case_dir / "frames").mkdir(parents=True, exist_ok=True)
  (case_dir / "videos").mkdir(exist_ok=True)
  Image.fromarray(input_image).save(case_dir / "input_image.png")
  for i, frame in enumerate(frames):
    Image.fromarray(frame).save(case_dir / "frames" / f"{i:03d}.png")
  video.write_mp4(str(case_dir / "videos" / "output.mp4"), frames, fps=fps)
  scenes = len(case.camera_path)
  data = dict(case.entry, num_scenes=scenes, total_frames=len(frames))
  if case.visual_movement == "static":
    data["anchor_frame_idx"] = [i * (frames_per_scene - 1) for i in range(scenes + 1)]
  (case_dir / "image_data.json").write_text(json.dumps(data, indent=4))
  (case_dir / "camera_data.json").write_text(json.dumps(dict(
      focal_length=focal, scale=speed, cameras=keyframes_c2w.tolist(),
      cameras_interp=cameras_c2w.tolist()), indent=4))
  (case_dir / "time.txt").write_text(f"generate_time: {seconds}\n")
  report.write_metrics_json(str(case_dir / "mirage.json"), extra)
