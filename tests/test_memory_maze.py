"""Memory Maze clips: format, geometric consistency of depth + pose + intrinsics, determinism,
the retrace policy, and argument/availability errors.

Rollouts need the optional extra (pip install -e '.[memory_maze]', apt-get install libosmesa6,
MUJOCO_GL=osmesa); those tests are skipped without it. The argument checks run regardless.
"""

import sys

import numpy as np
import pytest

from data_pipelines import clip as clip_lib
from data_pipelines import memory_maze
from mirage_jax import geometry
from mirage_jax.errors import InputError

needs_maze = pytest.mark.skipif(
    not memory_maze.is_available(),
    reason="memory_maze extra not importable: pip install -e '.[memory_maze]' and "
           "apt-get install -y libosmesa6 (rendering uses MUJOCO_GL=osmesa)")

T, H, W = 16, 32, 32
# Relative z-depth tolerance for "this pixel sees the same surface in the other frame".
DEPTH_TOL = 0.02
# Mean absolute RGB difference (0..255) under which two observations of a point match.
COLOUR_TOL = 16.0
SKY_DEPTH = 50.0  # the maze is ~20 m across; farther pixels are the skybox


@pytest.fixture(scope="module")
def explore():
  return memory_maze.rollout_episode(1, T, H, W)


@pytest.fixture(scope="module")
def retrace():
  return memory_maze.rollout_episode(2, 64, 16, 16, policy="retrace")


def _bilinear(image, uv):
  """Samples image (H, W) or (H, W, C) at continuous pixel coordinates uv (N, 2)."""
  h, w = image.shape[:2]
  x, y = uv[:, 0] - 0.5, uv[:, 1] - 0.5  # pixel (u, v) has its centre at (u + 0.5, v + 0.5)
  x0 = np.clip(np.floor(x).astype(int), 0, w - 2)
  y0 = np.clip(np.floor(y).astype(int), 0, h - 2)
  fx, fy = np.clip(x - x0, 0, 1), np.clip(y - y0, 0, 1)
  if image.ndim == 3:
    fx, fy = fx[:, None], fy[:, None]
  return (image[y0, x0] * (1 - fx) * (1 - fy) + image[y0, x0 + 1] * fx * (1 - fy)
          + image[y0 + 1, x0] * (1 - fx) * fy + image[y0 + 1, x0 + 1] * fx * fy)


def _reprojection_counts(clip, i, j):
  """Pixels of frame i that land inside frame j, that agree in depth there, and also in colour."""
  depths, K, poses = clip["depths"], clip["intrinsics"], clip["poses_c2w"]
  frames = clip["frames"].astype(np.float32)
  h, w = depths.shape[1:]
  points = np.asarray(geometry.unproject_depth(depths[i], K[i], poses[i])).reshape(-1, 3)
  uv, z = geometry.project_points(points, K[j], poses[j])
  uv, z = np.asarray(uv), np.asarray(z)
  inside = ((z > 0) & (uv[:, 0] >= 0.5) & (uv[:, 0] <= w - 0.5) & (uv[:, 1] >= 0.5)
            & (uv[:, 1] <= h - 0.5) & (depths[i].reshape(-1) < SKY_DEPTH))
  same_surface = inside & (np.abs(z - _bilinear(depths[j], uv)) < DEPTH_TOL * z)
  colour_diff = np.abs(frames[i].reshape(-1, 3) - _bilinear(frames[j], uv)).mean(-1)
  return np.array([inside.sum(), same_surface.sum(), (same_surface & (colour_diff < COLOUR_TOL)).sum()])


def _consistency(clip, pairs):
  """(fraction of in-view pixels on the same surface, fraction of those with matching colour)."""
  n_inside, n_same, n_colour = sum(_reprojection_counts(clip, i, j) for i, j in pairs)
  return n_same / n_inside, n_colour / n_same


NEAR_PAIRS = [(i, j) for i in range(T) for j in (i + 1, i + 2) if j < T]


@needs_maze
def test_clip_is_valid(explore):
  clip, agent = explore
  again = clip_lib.validate_clip(clip, "test")
  assert again["frames"].shape == (T, H, W, 3) and again["frames"].dtype == np.uint8
  assert again["depths"].shape == (T, H, W)
  assert float(clip["fps"]) == 4.0
  assert not clip["dynamic_masks"].any()
  np.testing.assert_allclose(clip["intrinsics"][0], geometry.intrinsics_from_fov(80.0, H, W))
  # Walls are within the 18 m maze; the camera is never inside one.
  assert 0.05 < np.median(clip["depths"]) < 18.0
  assert clip["frames"].std() > 10  # an actual image, not a blank buffer
  assert agent["maze_layout"].shape == (9, 9)


@needs_maze
def test_depth_pose_intrinsics_reproject_consistently(explore):
  clip, _ = explore
  same_surface, colour = _consistency(clip, NEAR_PAIRS)
  assert same_surface > 0.85, same_surface
  assert colour > 0.7, colour
  # The same check rejects the usual convention mistakes, so it has the power to fail.
  mujoco_axes = dict(clip, poses_c2w=clip["poses_c2w"] * np.array([1, -1, -1, 1], np.float32))
  wrong_fov = dict(clip, intrinsics=np.broadcast_to(geometry.intrinsics_from_fov(70.0, H, W), (T, 3, 3)))
  ray_norm = np.linalg.norm(np.asarray(geometry.camera_rays(clip["intrinsics"][0], H, W)), axis=-1)
  ray_length = dict(clip, depths=clip["depths"] * ray_norm)
  for wrong in (mujoco_axes, wrong_fov, ray_length):
    assert _consistency(wrong, NEAR_PAIRS)[0] < same_surface - 0.2


@needs_maze
def test_camera_agrees_with_agent_state(explore):
  clip, agent = explore
  c2w = clip["poses_c2w"]
  # memory_maze's grid coordinates: xy / 2 m + maze_size / 2.
  agent_xy = (agent["agent_pos"] - 9 / 2.0) * 2.0
  forward = c2w[:, :3, 2]
  heading = forward[:, :2] / np.linalg.norm(forward[:, :2], axis=-1, keepdims=True)
  np.testing.assert_allclose(heading, agent["agent_dir"], atol=1e-3)
  # The eye sits a little ahead of the rolling ball's centre, at a fixed height, no roll.
  offset = c2w[:, :2, 3] - agent_xy
  assert np.all(np.linalg.norm(offset, axis=-1) < 0.25)
  assert np.all(np.sum(offset * agent["agent_dir"], axis=-1) > 0)
  np.testing.assert_allclose(c2w[:, 2, 3], c2w[0, 2, 3], atol=0.01)
  np.testing.assert_allclose(c2w[:, 2, 0], 0.0, atol=1e-3)  # camera x axis stays horizontal
  assert np.linalg.norm(np.diff(c2w[:, :3, 3], axis=0), axis=-1).sum() > 1.0  # it did move


@needs_maze
def test_deterministic_for_a_seed(explore):
  clip, _ = explore
  again = memory_maze.rollout_clip(1, T, H, W)
  for key in clip:
    np.testing.assert_array_equal(again[key], clip[key], err_msg=key)
  other = memory_maze.rollout_clip(3, 1, H, W)  # another maze and spawn
  assert not np.array_equal(other["frames"][0], clip["frames"][0])


@needs_maze
def test_retrace_comes_back_to_the_start(retrace):
  clip, agent = retrace
  pos = agent["agent_pos"]
  assert np.linalg.norm(pos - pos[0], axis=-1).max() > 1.0  # went at least a cell away
  assert np.linalg.norm(pos[-1] - pos[0]) < 0.3
  _, angle = geometry.pose_distance(clip["poses_c2w"][0], clip["poses_c2w"][-1])
  assert float(angle) < 0.3
  # A true revisit: the last view reprojects onto the first.
  same_surface, colour = _consistency(clip, [(len(pos) - 1, 0)])
  assert same_surface > 0.8 and colour > 0.7, (same_surface, colour)


@pytest.mark.parametrize("kwargs, field", [
    (dict(maze_size=10), "maze_size"),
    (dict(policy="wander"), "policy"),
    (dict(num_frames=0), "num_frames"),
    (dict(num_frames=1001), "num_frames"),
    (dict(height=0), "height"),
    (dict(seed=-1), "seed"),
])
def test_bad_arguments_name_the_field(kwargs, field):
  args = dict(seed=0, num_frames=4, height=8, width=8)
  args.update(kwargs)
  with pytest.raises(InputError, match=f"'{field}'"):
    memory_maze.rollout_clip(**args)


def test_missing_extra_gives_install_hint(monkeypatch):
  monkeypatch.setitem(sys.modules, "memory_maze", None)  # makes `import memory_maze` fail
  assert not memory_maze.is_available()
  with pytest.raises(ImportError, match=r"\[memory_maze\].*MUJOCO_GL=osmesa"):
    memory_maze.rollout_clip(0, 4, 8, 8)
