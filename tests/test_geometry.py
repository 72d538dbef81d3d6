import numpy as np
import pytest

from mirage_jax import geometry
from mirage_jax.errors import InputError


def _random_pose(rng):
  q = rng.normal(size=4)
  q /= np.linalg.norm(q)
  w, x, y, z = q
  R = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
  c2w = np.eye(4)
  c2w[:3, :3], c2w[:3, 3] = R, rng.normal(size=3)
  return c2w.astype(np.float32)


def test_unproject_then_project_is_identity():
  rng = np.random.default_rng(0)
  K = geometry.intrinsics_from_fov(70, 12, 16)
  c2w = _random_pose(rng)
  depth = rng.uniform(0.5, 5.0, size=(12, 16)).astype(np.float32)
  pts = geometry.unproject_depth(depth, K, c2w)
  uv, z = geometry.project_points(pts.reshape(-1, 3), K, c2w)
  np.testing.assert_allclose(np.asarray(z), depth.reshape(-1), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(uv), np.asarray(geometry.pixel_grid(12, 16)).reshape(-1, 2), atol=1e-3)


def test_scale_intrinsics_maps_pixel_centres():
  K = geometry.intrinsics_from_fov(60, 32, 48)
  K2 = np.asarray(geometry.scale_intrinsics(K, 0.25, 0.25))
  # A point seen at the centre of high-res pixel block (4u..4u+3) lands in low-res pixel u.
  p = np.array([[0.3, -0.2, 2.0]], np.float32)
  uv_hi, _ = geometry.project_points(p, K, np.eye(4, dtype=np.float32))
  uv_lo, _ = geometry.project_points(p, K2, np.eye(4, dtype=np.float32))
  np.testing.assert_allclose(np.asarray(uv_lo), np.asarray(uv_hi) * 0.25, atol=1e-5)


def test_crop_intrinsics_shifts_principal_point():
  K = geometry.intrinsics_from_fov(60, 32, 48)
  p = np.array([[0.3, -0.2, 2.0]], np.float32)
  uv, _ = geometry.project_points(p, K, np.eye(4, dtype=np.float32))
  uv_c, _ = geometry.project_points(p, geometry.crop_intrinsics(K, 3, 5), np.eye(4, dtype=np.float32))
  np.testing.assert_allclose(np.asarray(uv_c), np.asarray(uv) - np.array([5, 3]), atol=1e-5)


def test_invert_pose_and_distance():
  rng = np.random.default_rng(1)
  c2w = _random_pose(rng)
  np.testing.assert_allclose(np.asarray(geometry.invert_pose(c2w)) @ c2w, np.eye(4), atol=1e-5)
  dt, ang = geometry.pose_distance(c2w, c2w)
  assert float(dt) < 1e-6 and float(ang) < 1e-3


def test_look_at_faces_target():
  c2w = geometry.look_at([1, 2, 3], [4, 2, 3], up=(0, 1, 0))
  np.testing.assert_allclose(c2w[:3, 2], [1, 0, 0], atol=1e-6)   # z forward
  np.testing.assert_allclose(c2w[:3, 1], [0, -1, 0], atol=1e-6)  # image y down = world down


def test_plucker_rays_are_unit_and_moment_orthogonal():
  K = geometry.intrinsics_from_fov(60, 4, 5)
  c2w = _random_pose(np.random.default_rng(2))
  r = np.asarray(geometry.plucker_rays(K, c2w, 4, 5))
  assert r.shape == (4, 5, 6)
  np.testing.assert_allclose(np.linalg.norm(r[..., :3], axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.sum(r[..., :3] * r[..., 3:], -1), 0.0, atol=1e-5)


@pytest.mark.parametrize("mutate, msg", [
    (lambda p: p.__setitem__((0, 0, 0), np.nan), "non-finite"),
    (lambda p: p.__setitem__((1, 0, 0), 2.0), "orthonormal"),
    (lambda p: p.__setitem__((0, 3, 0), 1.0), "last row"),
])
def test_check_poses_rejects(mutate, msg):
  poses = np.stack([np.eye(4, dtype=np.float32)] * 3)
  mutate(poses)
  with pytest.raises(InputError, match=msg) as e:
    geometry.check_poses(poses, "clip.npz")
  assert "clip.npz" in str(e.value) and "poses_c2w" in str(e.value)


def test_check_poses_rejects_reflection():
  p = np.eye(4, dtype=np.float32)[None].copy()
  p[0, 0, 0] = -1
  with pytest.raises(InputError, match="det"):
    geometry.check_poses(p, "x")
