"""Synthetic posed clips for tests: random frames and depths, valid cameras on a circle."""

from __future__ import annotations

import numpy as np

from mirage_jax import geometry


def synthetic_clip(seed: int, num_frames: int = 4, height: int = 8, width: int = 8,
                   moving_objects: int = 0) -> dict[str, np.ndarray]:
  """A random clip in the format of ``data_pipelines/clip.py``, a function of ``seed`` only.

  Returns:
    frames (T,H,W,3) uint8, depths (T,H,W) float32 in [0.5, 5], intrinsics (T,3,3),
    poses_c2w (T,4,4) looking at the origin from a circle, fps (), dynamic_masks (T,H,W)
    uint8 with ids up to ``moving_objects``, object_tracks (K,T,3).
  """
  rng = np.random.default_rng(seed)
  angles = np.linspace(0, np.pi / 2, num_frames) + rng.uniform(0, 2 * np.pi)
  poses = np.stack([geometry.look_at((3 * np.cos(a), 1.0, 3 * np.sin(a)), (0, 0, 0), up=(0, 1, 0))
                    for a in angles])
  K = geometry.intrinsics_from_fov(75.0, height, width)
  return {
      "frames": rng.integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8),
      "depths": rng.uniform(0.5, 5.0, (num_frames, height, width)).astype(np.float32),
      "intrinsics": np.broadcast_to(K, (num_frames, 3, 3)).copy(),
      "poses_c2w": poses,
      "fps": np.float32(10.0),
      "dynamic_masks": rng.integers(0, moving_objects + 1, (num_frames, height, width), dtype=np.uint8),
      "object_tracks": rng.normal(size=(moving_objects, num_frames, 3)).astype(np.float32),
  }


def made_once(tmp_path_factory, name: str, make) -> "pathlib.Path":
  """A folder ``make(folder)`` fills once per test run, shared by every pytest-xdist worker.

  Test files that need the same built thing (a dataset, a converted model) call this from
  their fixtures: the first caller builds it under a file lock while the others wait, then
  all read it. A build that failed part way (no completion marker) is built again.
  """
  import os  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import filelock  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the workers' basetemps are siblings: share their parent
  folder = root / f"made-once-{name}"
  with filelock.FileLock(str(folder) + ".lock"):
    if not (folder / ".complete").exists():
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
      make(folder)
      (folder / ".complete").touch()
  return folder


def write_random_lpips_weights(folder: str, net: str = "alex") -> tuple[str, str]:
  """A random LPIPS backbone and linear layers as safetensors, for plumbing tests only (their
  distances mean nothing). He-initialised so every layer's features are alive.

  Returns:
    (backbone path, linear path).
  """
  import os  # pylint: disable=g-import-not-at-top
  from mirage_jax import weight_files  # pylint: disable=g-import-not-at-top
  from mirage_jax.evaluation import lpips  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  backbone = {}
  for key, shape in lpips.backbone_shapes(net).items():
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    backbone[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in) if len(shape) > 1
                     else np.full(shape, 0.01)).astype(np.float32)
  linear = {k: rng.random(s).astype(np.float32) for k, s in lpips.linear_shapes(net).items()}
  paths = os.path.join(folder, f"{net}_backbone.safetensors"), os.path.join(folder, f"{net}_linear.safetensors")
  for path, tensors in zip(paths, (backbone, linear)):
    weight_files.write_safetensors(path, tensors)
  return paths
