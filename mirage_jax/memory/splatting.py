"""Lifting latent pixels to 3D and the z-buffer splat, shared by the memory backends.

Pixel-centre conventions throughout (pixel (u, v) has its centre at (u + 0.5, v + 0.5)); the
``mirage`` backend keeps the reference's own conventions instead (see ``memory.mirage``).
"""

from __future__ import annotations

import jax.numpy as jnp

from mirage_jax import geometry
from mirage_jax.errors import InputError
from mirage_jax.memory.config import MemoryConfig


def latent_intrinsics(cfg: MemoryConfig, intrinsics):
  """(..., 3, 3) intrinsics of the image resolution rescaled to the latent grid."""
  return geometry.scale_intrinsics(intrinsics, cfg.latent_width / cfg.image_width,
                                   cfg.latent_height / cfg.image_height)


def _resize_axis(x, size: int, axis: int):
  """Bilinear resize of one axis (half-pixel centres, no antialiasing, edges clamped).

  Gathers the two neighbours per output sample, so a non-finite input value only reaches
  the outputs that actually sample it (a matrix-based resize would spread it everywhere).
  """
  n = x.shape[axis]
  src = jnp.maximum((jnp.arange(size, dtype=jnp.float32) + 0.5) * (n / size) - 0.5, 0.0)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), n - 1)
  i1 = jnp.minimum(i0 + 1, n - 1)
  shape = [1] * x.ndim
  shape[axis] = size
  t = (src - i0).reshape(shape)
  a, b = jnp.take(x, i0, axis=axis), jnp.take(x, i1, axis=axis)
  return jnp.where(t == 0, a, a * (1 - t) + b * t)


def depth_at(depth, height: int, width: int):
  """(F, height, width) depth; bilinear without antialiasing when resizing (as the reference)."""
  if depth.shape[1:] == (height, width):
    return depth
  return _resize_axis(_resize_axis(depth, height, 1), width, 2)


def mask_at(mask, height: int, width: int):
  """(F, height, width) bool mask: a coarse cell is set only if all its fine pixels are.

  Downsampling is a min-pool (dynamic content must stay out of the cache), upsampling a
  nearest repeat; both need integer factors.
  """
  mask = mask.astype(bool)
  f, mh, mw = mask.shape
  if (mh, mw) == (height, width):
    return mask
  if mh % height == 0 and mw % width == 0:
    return mask.reshape(f, height, mh // height, width, mw // width).all(axis=(2, 4))
  if height % mh == 0 and width % mw == 0:
    return jnp.repeat(jnp.repeat(mask, height // mh, axis=1), width // mw, axis=2)
  raise InputError("memory.write", "static_mask",
                   f"cannot resize {(mh, mw)} to {(height, width)} by an integer factor")


def lift_frames(cfg: MemoryConfig, depth, intrinsics, c2w, static_mask, height: int, width: int):
  """World points of every pixel at (height, width), and which ones may enter the cache.

  Args:
    depth: (F, H', W') z-depth at the image or the target resolution.
    intrinsics: (F, 3, 3) of the image resolution. c2w: (F, 4, 4).
    static_mask: (F, H', W') bool.
  Returns:
    points (F, height, width, 3), valid (F, height, width) bool (static, finite depth > near).
  """
  d = depth_at(depth.astype(jnp.float32), height, width)
  K = geometry.scale_intrinsics(intrinsics, width / cfg.image_width, height / cfg.image_height)
  points = geometry.unproject_depth(d, K, c2w)
  valid = mask_at(static_mask, height, width) & jnp.isfinite(d) & (d > cfg.near)
  valid &= jnp.all(jnp.isfinite(points), axis=-1)
  return points, valid


def ring_slots(head, valid, capacity: int):
  """Ring-buffer slots for the valid entries of a flat batch, in order; others get ``capacity``.

  When more than ``capacity`` entries are valid only the newest ``capacity`` get a slot, so
  no slot is written twice in one scatter.

  Args:
    head: () int32 entries written so far. valid: (M,) bool.
  Returns:
    slots (M,) int32 (``capacity`` = drop), new head () int32.
  """
  rank = jnp.cumsum(valid) - 1
  total = rank[-1] + 1
  keep = valid & (rank >= total - capacity)
  slots = jnp.where(keep, (head + rank) % capacity, capacity)
  return slots.astype(jnp.int32), (head + total).astype(jnp.int32)


def splat(points, values, valid, K, c2w, height: int, width: int, near: float,
          footprint: float = 0.0, max_radius: int = 0, priority=None,
          depth_tolerance: float = 0.0):
  """Z-buffer splat of points into one camera: the closest point wins each cell.

  Ties in depth go to the point with the larger index (the newer one in append buffers).
  With ``priority`` and a ``depth_tolerance``, every point within ``(1 + depth_tolerance)``
  of a cell's closest depth is on the same surface, and the highest priority among them
  wins (e.g. the most recently seen): one view's content per cell instead of whichever of
  many views' points happens to be a hair closer, which blurs (docs/DESIGN.md probe).
  With a ``footprint``, points are world-space squares of that edge facing the camera, and
  they fill holes: an empty cell takes the closest neighbouring winner (up to
  ``max_radius`` cells away) whose projected square contains the cell's centre. Filling
  works on the image, after the z-buffer, so its cost does not grow with the number of
  points.

  Args:
    points: (N, 3) world points. values: (N, C) carried to the image. valid: (N,) bool.
    K: (3, 3) intrinsics of the (height, width) grid. c2w: (4, 4).
    near: points with camera depth <= near are skipped.
    footprint: world-space edge of each point's square (0 = centre cells only).
    max_radius: farthest footprint reach in cells (0 = centre cells only).
    priority: (N,) int32 or None (= index order).
    depth_tolerance: relative depth band treated as one surface (0 = exact z-buffer).
  Returns:
    image (height, width, C) with zeros where empty, coverage (height, width) bool,
    depth (height, width) of the winning points (0 where empty).
  """
  n = points.shape[0]
  uv, z = geometry.project_points(points, K, c2w)
  ok = valid & (z > near) & jnp.all(jnp.isfinite(uv), axis=-1)
  # Clip before the int cast: points near the camera plane project to huge coordinates.
  iu = jnp.floor(jnp.clip(uv[:, 0], -2.0, width + 2.0)).astype(jnp.int32)
  iv = jnp.floor(jnp.clip(uv[:, 1], -2.0, height + 2.0)).astype(jnp.int32)
  ok &= (iu >= 0) & (iu < width) & (iv >= 0) & (iv < height)
  cells = jnp.where(ok, iv * width + iu, height * width)  # last cell: a dump for misses
  z = jnp.where(ok, z, jnp.inf)
  zmin = jnp.full((height * width + 1,), jnp.inf, z.dtype).at[cells].min(z)
  winner = ok & (z <= zmin[cells] * (1.0 + depth_tolerance))
  ids = jnp.arange(n, dtype=jnp.int32)
  if priority is not None:
    low = jnp.iinfo(jnp.int32).min
    top = jnp.full((height * width + 1,), low, jnp.int32).at[cells].max(
        jnp.where(winner, priority.astype(jnp.int32), low))
    winner &= priority == top[cells]
  best = jnp.full((height * width + 1,), -1, jnp.int32).at[cells].max(jnp.where(winner, ids, -1))
  best = best[:-1].reshape(height, width)
  zbest = jnp.where(best >= 0, z[jnp.maximum(best, 0)], jnp.inf)
  if footprint > 0 and max_radius > 0:
    half_size = 0.5 * footprint * 0.5 * (K[0, 0] + K[1, 1]) / jnp.maximum(z, near)
    best, zbest = _fill_holes(best, zbest, uv, half_size, max_radius)
  covered = best >= 0
  image = jnp.where(covered[..., None], values[jnp.maximum(best, 0)], 0)
  return image, covered, jnp.where(covered, zbest, 0.0)


def _fill_holes(best, zbest, uv, half_size, max_radius: int):
  """Empty cells take the closest neighbouring winner whose footprint covers them.

  Args:
    best: (h, w) int32 winning point per cell (-1 empty). zbest: (h, w) its depth.
    uv: (N, 2) projected points. half_size: (N,) footprint half extent in pixels.
  Returns:
    best, zbest (h, w) with holes filled where a footprint reaches.
  """
  h, w = best.shape
  r = max_radius
  pad = lambda a, v: jnp.pad(a, r, constant_values=v)
  nb_best, nb_z = pad(best, -1), pad(zbest, jnp.inf)
  centre = jnp.stack(jnp.meshgrid(jnp.arange(w) + 0.5, jnp.arange(h) + 0.5, indexing="xy"), -1)
  fill, fill_z = jnp.full_like(best, -1), jnp.full_like(zbest, jnp.inf)
  for dv in range(-r, r + 1):
    for du in range(-r, r + 1):
      if (du, dv) == (0, 0):
        continue
      nb = nb_best[r + dv:r + dv + h, r + du:r + du + w]
      nz = nb_z[r + dv:r + dv + h, r + du:r + du + w]
      idx = jnp.maximum(nb, 0)
      reach = jnp.all(jnp.abs(centre - uv[idx]) <= half_size[idx][..., None], axis=-1)
      take = (nb >= 0) & reach & (nz < fill_z)
      fill, fill_z = jnp.where(take, nb, fill), jnp.where(take, nz, fill_z)
  hole = best < 0
  return jnp.where(hole, fill, best), jnp.where(hole, fill_z, zbest)
