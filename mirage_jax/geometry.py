"""Camera geometry, OpenCV convention.

Conventions used everywhere in mirage_jax:
  * camera frame: x right, y down, z forward (OpenCV).
  * ``c2w``: 4x4 camera-to-world matrix, ``[R | t]`` with ``R`` orthonormal, det +1.
  * intrinsics ``K``: 3x3 in pixels, ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]``; pixel
    ``(u, v)`` has its *centre* at ``(u + 0.5, v + 0.5)`` in the continuous image plane,
    so an image of width W spans ``[0, W)`` and ``cx = W / 2`` for a centred camera.
  * depth: metric z-depth (distance along the optical axis), not ray length.

The array functions are written with ``jax.numpy`` and accept NumPy or JAX arrays with any
leading batch dimensions. The ``check_*`` functions run on host NumPy at input boundaries.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from mirage_jax.errors import InputError


# ----------------------------------------------------------------------------- intrinsics


def intrinsics_from_fov(fov_y_deg: float, height: int, width: int) -> np.ndarray:
  """Pinhole intrinsics (3, 3) for a vertical field of view, square pixels, centred."""
  fy = 0.5 * height / np.tan(np.deg2rad(fov_y_deg) / 2.0)
  return np.array([[fy, 0.0, width / 2.0], [0.0, fy, height / 2.0], [0.0, 0.0, 1.0]],
                  dtype=np.float32)


def scale_intrinsics(K, sx, sy):
  """Intrinsics after resizing the image by (sx, sy) = (new_w / old_w, new_h / old_h).

  Args:
    K: (..., 3, 3).
  Returns:
    (..., 3, 3) with fx, cx scaled by sx and fy, cy by sy (pixel-centre convention above).
  """
  # With pixel centres at (u + 0.5, v + 0.5), resizing maps continuous image coordinates
  # x -> sx * x exactly, so K' = diag(sx, sy, 1) @ K.
  K = jnp.asarray(K)
  S = jnp.diag(jnp.array([sx, sy, 1.0], dtype=K.dtype))
  return S @ K


def crop_intrinsics(K, top, left):
  """Intrinsics after cropping ``top`` rows and ``left`` columns off the image.  K: (..., 3, 3)."""
  shift = jnp.zeros((3, 3), dtype=jnp.asarray(K).dtype)
  shift = shift.at[0, 2].set(-left).at[1, 2].set(-top)
  return K + shift


# ----------------------------------------------------------------------------- poses


def invert_pose(c2w):
  """Rigid inverse of (..., 4, 4) poses (w2c from c2w and back)."""
  R = c2w[..., :3, :3]
  t = c2w[..., :3, 3:]
  Rt = jnp.swapaxes(R, -1, -2)
  top = jnp.concatenate([Rt, -Rt @ t], axis=-1)
  bottom = jnp.broadcast_to(jnp.array([0.0, 0.0, 0.0, 1.0], dtype=c2w.dtype),
                            top.shape[:-2] + (1, 4))
  return jnp.concatenate([top, bottom], axis=-2)


def look_at(eye, target, up=(0.0, -1.0, 0.0)) -> np.ndarray:
  """OpenCV c2w (4, 4) for a camera at ``eye`` looking at ``target``.

  ``up`` is the world direction that should appear *up* in the image; with the default the
  world is y-down like the camera (so a y-up world passes ``up=(0, 1, 0)``).
  """
  eye = np.asarray(eye, np.float64)
  z = np.asarray(target, np.float64) - eye
  z /= np.linalg.norm(z)
  down = -np.asarray(up, np.float64)
  x = np.cross(down, z)
  if np.linalg.norm(x) < 1e-8:
    raise ValueError("look_at: viewing direction is parallel to `up`")
  x /= np.linalg.norm(x)
  y = np.cross(z, x)
  c2w = np.eye(4)
  c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, y, z, eye
  return c2w.astype(np.float32)


def pose_distance(a, b):
  """(translation distance, rotation angle in radians) between (..., 4, 4) poses."""
  dt = jnp.linalg.norm(a[..., :3, 3] - b[..., :3, 3], axis=-1)
  R = jnp.swapaxes(a[..., :3, :3], -1, -2) @ b[..., :3, :3]
  cos = (jnp.trace(R, axis1=-2, axis2=-1) - 1.0) / 2.0
  return dt, jnp.arccos(jnp.clip(cos, -1.0, 1.0))


# ----------------------------------------------------------------------------- rays & points


def pixel_grid(height: int, width: int, dtype=jnp.float32):
  """(H, W, 2) pixel-centre coordinates (u + 0.5, v + 0.5)."""
  v, u = jnp.meshgrid(jnp.arange(height, dtype=dtype) + 0.5,
                      jnp.arange(width, dtype=dtype) + 0.5, indexing="ij")
  return jnp.stack([u, v], axis=-1)


def camera_rays(K, height: int, width: int):
  """Camera-frame ray directions with z = 1, (..., H, W, 3), for intrinsics K (..., 3, 3)."""
  uv = pixel_grid(height, width, jnp.asarray(K).dtype)
  fx, fy = K[..., 0, 0, None, None], K[..., 1, 1, None, None]
  cx, cy = K[..., 0, 2, None, None], K[..., 1, 2, None, None]
  x = (uv[..., 0] - cx) / fx
  y = (uv[..., 1] - cy) / fy
  return jnp.stack([x, y, jnp.ones_like(x)], axis=-1)


def unproject_depth(depth, K, c2w):
  """World points of every pixel.

  Args:
    depth: (..., H, W) z-depth.
    K: (..., 3, 3) intrinsics of this depth map's resolution.
    c2w: (..., 4, 4).
  Returns:
    (..., H, W, 3) world-space points.
  """
  h, w = depth.shape[-2:]
  pts_cam = camera_rays(K, h, w) * depth[..., None]
  R = c2w[..., None, None, :3, :3]
  t = c2w[..., None, None, :3, 3]
  return jnp.einsum("...ij,...j->...i", R, pts_cam) + t


def project_points(points, K, c2w):
  """Project world points into a camera.

  Args:
    points: (..., N, 3) world points.
    K: (..., 3, 3). c2w: (..., 4, 4).
  Returns:
    uv: (..., N, 2) continuous pixel coordinates (pixel (u, v) covers [u, u+1) x [v, v+1)).
    z: (..., N) camera z-depth (<= 0 means behind the camera).
  """
  w2c = invert_pose(c2w)
  R = w2c[..., None, :3, :3]
  t = w2c[..., None, :3, 3]
  pc = jnp.einsum("...ij,...j->...i", R, points) + t
  z = pc[..., 2]
  safe_z = jnp.where(jnp.abs(z) < 1e-6, 1e-6, z)
  u = K[..., None, 0, 0] * pc[..., 0] / safe_z + K[..., None, 0, 2]
  v = K[..., None, 1, 1] * pc[..., 1] / safe_z + K[..., None, 1, 2]
  return jnp.stack([u, v], axis=-1), z


def plucker_rays(K, c2w, height: int, width: int):
  """Plücker ray embedding per pixel: (direction, origin x direction), (..., H, W, 6).

  Directions are unit-norm and in world space.
  """
  d_cam = camera_rays(K, height, width)
  d = jnp.einsum("...ij,...hwj->...hwi", c2w[..., :3, :3], d_cam)
  d = d / jnp.linalg.norm(d, axis=-1, keepdims=True)
  o = jnp.broadcast_to(c2w[..., None, None, :3, 3], d.shape)
  return jnp.concatenate([d, jnp.cross(o, d)], axis=-1)


# ----------------------------------------------------------------------------- validation


def check_poses(c2w: np.ndarray, where: str, field: str = "poses_c2w", tol: float = 1e-3) -> None:
  """Raise InputError unless ``c2w`` is (T, 4, 4), finite, with orthonormal det+1 rotations."""
  c2w = np.asarray(c2w)
  if c2w.ndim != 3 or c2w.shape[1:] != (4, 4):
    raise InputError(where, field, f"expected shape (T, 4, 4), got {c2w.shape}")
  if not np.all(np.isfinite(c2w)):
    bad = int(np.argwhere(~np.isfinite(c2w).all(axis=(1, 2)))[0, 0])
    raise InputError(where, field, f"non-finite values (first at frame {bad})")
  if not np.allclose(c2w[:, 3], [0, 0, 0, 1], atol=tol):
    bad = int(np.argwhere(~np.isclose(c2w[:, 3], [0, 0, 0, 1], atol=tol).all(-1))[0, 0])
    raise InputError(where, field, f"last row must be [0, 0, 0, 1] (frame {bad})")
  R = c2w[:, :3, :3].astype(np.float64)
  err = np.abs(R @ np.swapaxes(R, 1, 2) - np.eye(3)).max(axis=(1, 2))
  det = np.linalg.det(R)
  bad_frames = np.flatnonzero((err > tol) | (det < 0))
  if bad_frames.size:
    f = int(bad_frames[0])
    raise InputError(where, field, f"rotation is not orthonormal with det +1 at frame {f} "
                     f"(|RR^T - I| = {err[f]:.2g}, det = {det[f]:.3f})")


def check_intrinsics(K: np.ndarray, where: str, field: str = "intrinsics") -> None:
  """Raise InputError unless ``K`` is (T, 3, 3), finite, positive focal lengths, [0,0,1] last row."""
  K = np.asarray(K)
  if K.ndim != 3 or K.shape[1:] != (3, 3):
    raise InputError(where, field, f"expected shape (T, 3, 3), got {K.shape}")
  if not np.all(np.isfinite(K)):
    raise InputError(where, field, "non-finite values")
  if np.any(K[:, 0, 0] <= 0) or np.any(K[:, 1, 1] <= 0):
    raise InputError(where, field, "focal lengths fx, fy must be > 0")
  if not np.allclose(K[:, 2], [0, 0, 1], atol=1e-6):
    raise InputError(where, field, "last row must be [0, 0, 1]")
