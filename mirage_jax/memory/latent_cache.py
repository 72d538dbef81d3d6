"""Latent spatial memory: shared config and splatting, and our voxel-hashed latent cache.

Every backend (see ``mirage_jax.memory``) is a set of pure functions over a state pytree
(a ``flax.struct`` dataclass whose arrays are the leaves and whose ``MemoryConfig`` is static
aux data), so ``write`` and ``read`` jit, vmap over a batch of scenes and shard along it.

The ``voxel`` backend (ours) keeps a fixed number of voxel slots keyed by integer voxel
coordinates. A write lifts every latent pixel to 3D, then merges the new points with the
table by one lexicographic sort on the voxel key (sort-based dedup, no probing, exact):
points and old entries falling in the same voxel fuse into one entry whose feature and
position are a *recency-weighted* mean (weight ``recency_decay ** age_in_frames``, so the
newest view dominates and averaging does not blur view-dependent detail). When more voxels
exist than slots, the least recently seen ones (then the least observed) are evicted.
A read splats every voxel's mean point into the target camera with a z-buffer (the closest
voxel wins each latent cell); cells left empty then take the closest neighbouring voxel
whose projected square reaches them (up to ``splat_radius`` cells away), so voxels that
project larger than a latent pixel (a camera close to a wall) leave no holes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mirage_jax import geometry
from mirage_jax.errors import InputError, settings_dataclass

_WHERE = "memory config"


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
  """Static settings of a memory backend (hashable: it rides in the state as aux data).

  Attributes:
    image_height, image_width: resolution the intrinsics refer to (and of full-res depth,
      masks and RGB).
    latent_height, latent_width, latent_channels: latent grid (h, w, C) read and written.
    capacity: number of slots: points (mirage, rgb_points), voxels (voxel), frames
      (frame_bank).
    feature_dtype: storage dtype of latent features ("bfloat16" or "float32").
    voxel_size: voxel edge in world units (voxel backend).
    recency_decay: voxel merge weight per frame of age, in [0, 1]: 0 keeps only the newest
      frame's points, 1 is a plain mean over all history.
    splat_radius: largest footprint radius in latent pixels a voxel may cover on read
      (0 = centre pixel only).
    near: points with camera depth <= near are not written or splatted (keep it tiny).
    depth_tolerance: voxel read: voxels within this relative depth of a cell's closest one
      count as the same surface, and the most recently seen of them wins the cell.
  """
  image_height: int
  image_width: int
  latent_height: int
  latent_width: int
  latent_channels: int
  capacity: int
  feature_dtype: str = "bfloat16"
  voxel_size: float = 0.05
  recency_decay: float = 0.5
  splat_radius: int = 1
  near: float = 1e-3
  depth_tolerance: float = 0.0

  def __post_init__(self):
    for name in ("image_height", "image_width", "latent_height", "latent_width",
                 "latent_channels", "capacity"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(_WHERE, name, f"must be a positive integer, got {value!r}")
    if self.feature_dtype not in ("bfloat16", "float32"):
      raise InputError(_WHERE, "feature_dtype",
                       f"must be 'bfloat16' or 'float32', got {self.feature_dtype!r}")
    if not self.voxel_size > 0:
      raise InputError(_WHERE, "voxel_size", f"must be > 0, got {self.voxel_size}")
    if not 0.0 <= self.recency_decay <= 1.0:
      raise InputError(_WHERE, "recency_decay", f"must be in [0, 1], got {self.recency_decay}")
    if not isinstance(self.splat_radius, (int, np.integer)) or self.splat_radius < 0:
      raise InputError(_WHERE, "splat_radius", f"must be an integer >= 0, got {self.splat_radius!r}")
    if not self.near > 0:
      raise InputError(_WHERE, "near", f"must be > 0, got {self.near}")
    if not self.depth_tolerance >= 0:
      raise InputError(_WHERE, "depth_tolerance", f"must be >= 0, got {self.depth_tolerance}")

  @property
  def dtype(self):
    return jnp.dtype(self.feature_dtype)


def memory_config(cfg: Any) -> MemoryConfig:
  """A ``MemoryConfig`` from itself, an ``ml_collections.ConfigDict`` or a mapping."""
  return settings_dataclass(MemoryConfig, cfg, _WHERE)


# ----------------------------------------------------------------------------- write helpers


def check_frames(cfg: MemoryConfig, latents, depth, intrinsics, c2w, static_mask, frame_index):
  """Shape checks shared by every ``write`` (static shapes, so they run under jit too)."""
  f = latents.shape[0]
  h, w, c = cfg.latent_height, cfg.latent_width, cfg.latent_channels
  full, small = (cfg.image_height, cfg.image_width), (h, w)
  expect = {"latents": (latents.shape, [(f, h, w, c)]),
            "depth": (depth.shape, [(f,) + full, (f,) + small]),
            "intrinsics": (intrinsics.shape, [(f, 3, 3)]),
            "c2w": (c2w.shape, [(f, 4, 4)]),
            "static_mask": (static_mask.shape, [(f,) + full, (f,) + small]),
            "frame_index": (frame_index.shape, [(f,)])}
  for name, (shape, allowed) in expect.items():
    if tuple(shape) not in allowed:
      raise InputError("memory.write", name, f"expected shape {' or '.join(map(str, allowed))}, got {tuple(shape)}")


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


# ----------------------------------------------------------------------------- splatting


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


# ----------------------------------------------------------------------------- host helpers


def live_bytes(state, live) -> int:
  """Bytes of the state's per-entry arrays over its live entries (host side, any batch dims).

  Args:
    live: (..., capacity) bool, the state's occupancy; every leaf whose leading dims match
      its shape is a per-entry array.
  """
  live = np.asarray(live)
  per_entry = 0
  for leaf in jax.tree_util.tree_leaves(state):
    if leaf.shape[:live.ndim] == live.shape:
      per_entry += leaf.dtype.itemsize * int(np.prod(leaf.shape[live.ndim:], dtype=np.int64))
  return int(live.sum()) * per_entry


def capacity_bytes(state) -> int:
  """Bytes allocated by every array of the state (any batch dims)."""
  return int(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(state)))


# ----------------------------------------------------------------------------- voxel backend


@struct.dataclass
class VoxelState:
  """Voxel table of one scene; vmap adds leading batch dims to every array.

  Attributes:
    coords: (T, 3) int32 voxel integer coordinates (floor(point / voxel_size)).
    points: (T, 3) float32 recency-weighted mean point of the voxel.
    features: (T, C) feature_dtype recency-weighted mean latent.
    weight: (T,) float32 merge weight, relative to ``last_seen``.
    count: (T,) int32 points fused so far (confidence).
    last_seen: (T,) int32 newest frame index that saw the voxel.
    occupied: (T,) bool.
  """
  coords: jax.Array
  points: jax.Array
  features: jax.Array
  weight: jax.Array
  count: jax.Array
  last_seen: jax.Array
  occupied: jax.Array
  cfg: MemoryConfig = struct.field(pytree_node=False)


def voxel_init(cfg) -> VoxelState:
  """Empty voxel table with ``cfg.capacity`` slots."""
  cfg = memory_config(cfg)
  t, c = cfg.capacity, cfg.latent_channels
  return VoxelState(coords=jnp.zeros((t, 3), jnp.int32), points=jnp.zeros((t, 3), jnp.float32),
                    features=jnp.zeros((t, c), cfg.dtype), weight=jnp.zeros((t,), jnp.float32),
                    count=jnp.zeros((t,), jnp.int32), last_seen=jnp.full((t,), -1, jnp.int32),
                    occupied=jnp.zeros((t,), bool), cfg=cfg)


def voxel_write(state: VoxelState, latents, depth, intrinsics, c2w, static_mask, frame_index,
                rgb=None) -> VoxelState:
  """Fuses F frames into the voxel table.

  Args:
    latents: (F, h, w, C). depth: (F, H, W) or (F, h, w) z-depth.
    intrinsics: (F, 3, 3) of the image resolution. c2w: (F, 4, 4).
    static_mask: (F, H, W) or (F, h, w) bool, False where content moves (kept out).
    frame_index: (F,) int frame number of each frame (drives recency).
    rgb: unused (accepted so every backend takes the same call).
  Returns:
    The new state.
  """
  del rgb
  cfg = state.cfg
  check_frames(cfg, latents, depth, intrinsics, c2w, static_mask, frame_index)
  h, w = cfg.latent_height, cfg.latent_width
  pts, valid = lift_frames(cfg, depth, intrinsics, c2w, static_mask, h, w)
  m = pts.shape[0] * h * w
  pts, valid = pts.reshape(m, 3), valid.reshape(m)
  seen = jnp.broadcast_to(frame_index.astype(jnp.int32)[:, None], (frame_index.shape[0], h * w)).reshape(m)
  scaled = jnp.clip(jnp.floor(pts / cfg.voxel_size), -2.0**30, 2.0**30)

  # Old entries and new points in one list, fused by a sort on the voxel key.
  big = jnp.iinfo(jnp.int32).max  # key of empty entries: sorts last
  occ = jnp.concatenate([state.occupied, valid])
  keys = jnp.concatenate([state.coords, scaled.astype(jnp.int32)])
  keys = jnp.where(occ[:, None], keys, big)
  wt = jnp.concatenate([state.weight, jnp.ones((m,), jnp.float32)])
  feat = jnp.concatenate([state.features.astype(jnp.float32), latents.reshape(m, -1).astype(jnp.float32)])
  pos = jnp.concatenate([state.points, pts])
  cnt = jnp.concatenate([state.count, jnp.ones((m,), jnp.int32)])
  last = jnp.concatenate([state.last_seen, seen])
  n = occ.shape[0]
  kx, ky, kz, order = jax.lax.sort((keys[:, 0], keys[:, 1], keys[:, 2], jnp.arange(n, dtype=jnp.int32)),
                                   num_keys=3)
  sk = jnp.stack([kx, ky, kz], -1)
  start = jnp.concatenate([jnp.ones((1,), bool), jnp.any(sk[1:] != sk[:-1], axis=-1)])
  seg = jnp.cumsum(start) - 1
  occ, wt, feat, pos, cnt, last = (a[order] for a in (occ, wt, feat, pos, cnt, last))

  # Recency weights: everything is re-weighted to the voxel's newest frame.
  newest = jax.ops.segment_max(jnp.where(occ, last, -1), seg, n)
  age = jnp.clip(newest[seg] - last, 0, 10_000).astype(jnp.float32)
  wt = jnp.where(occ, wt * jnp.power(jnp.float32(cfg.recency_decay), age), 0.0)
  w_sum = jax.ops.segment_sum(wt, seg, n)
  safe = jnp.where(w_sum > 0, w_sum, 1.0)[:, None]
  f_new = jax.ops.segment_sum(wt[:, None] * feat, seg, n) / safe
  p_new = jax.ops.segment_sum(wt[:, None] * pos, seg, n) / safe
  c_new = jax.ops.segment_sum(jnp.where(occ, cnt, 0), seg, n)
  o_new = jax.ops.segment_max(occ.astype(jnp.int32), seg, n) > 0
  k_new = jax.ops.segment_min(sk, seg, n)

  # Keep the `capacity` most recently seen voxels (then the most observed).
  _, _, keep = jax.lax.sort((jnp.where(o_new, -newest, big), -c_new, jnp.arange(n, dtype=jnp.int32)),
                            num_keys=2)
  keep = keep[:cfg.capacity]
  o_keep = o_new[keep]
  return VoxelState(coords=jnp.where(o_keep[:, None], k_new[keep], 0),
                    points=jnp.where(o_keep[:, None], p_new[keep], 0.0),
                    features=jnp.where(o_keep[:, None], f_new[keep], 0.0).astype(cfg.dtype),
                    weight=jnp.where(o_keep, w_sum[keep], 0.0),
                    count=jnp.where(o_keep, c_new[keep], 0),
                    last_seen=jnp.where(o_keep, newest[keep], -1),
                    occupied=o_keep, cfg=cfg)


def voxel_read(state: VoxelState, intrinsics, c2w, *, with_depth: bool = False):
  """Splats the voxel table into F target cameras at latent resolution.

  The closest voxel centre wins each cell; empty cells then take the closest neighbouring
  voxel (at most ``splat_radius`` cells away) whose projected square (``voxel_size * f / z``
  pixels wide) contains the cell centre.

  Args:
    intrinsics: (F, 3, 3) of the image resolution. c2w: (F, 4, 4).
    with_depth: also return the camera z-depth of each cell's voxel (static).
  Returns:
    latents (F, h, w, C) in feature_dtype (zeros where empty), coverage (F, h, w) bool;
    with ``with_depth``, depth (F, h, w) float32 too (0 where empty).
  """
  cfg = state.cfg
  K = latent_intrinsics(cfg, intrinsics)

  def one(K1, c2w1):
    return splat(state.points, state.features, state.occupied, K1, c2w1,
                 cfg.latent_height, cfg.latent_width, cfg.near,
                 footprint=cfg.voxel_size, max_radius=cfg.splat_radius,
                 priority=state.last_seen, depth_tolerance=cfg.depth_tolerance)

  image, covered, depth = jax.vmap(one)(K, c2w)
  return (image, covered, depth) if with_depth else (image, covered)


def voxel_nbytes(state: VoxelState) -> int:
  """Bytes of the occupied voxels (host side; summed over any batch dims)."""
  return live_bytes(state, state.occupied)
