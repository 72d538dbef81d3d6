"""The ``voxel`` backend (ours): a voxel-hashed latent cache.

It keeps a fixed number of voxel slots keyed by integer voxel coordinates. A write lifts
every latent pixel to 3D, then merges the new points with the table by one lexicographic
sort on the voxel key (sort-based dedup, no probing, exact): points and old entries falling
in the same voxel fuse into one entry whose feature and position are a *recency-weighted*
mean (weight ``recency_decay ** age_in_frames``, so the newest view dominates and averaging
does not blur view-dependent detail). When more voxels exist than slots, the least recently
seen ones (then the least observed) are evicted. A read splats every voxel's mean point into
the target camera with a z-buffer (the closest voxel wins each latent cell); cells left empty
then take the closest neighbouring voxel whose projected square reaches them (up to
``splat_radius`` cells away), so voxels that project larger than a latent pixel (a camera
close to a wall) leave no holes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from mirage_jax.memory.config import MemoryConfig, check_frames, live_bytes, memory_config
from mirage_jax.memory.splatting import latent_intrinsics, lift_frames, splat


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


def init(cfg) -> VoxelState:
  """Empty voxel table with ``cfg.capacity`` slots."""
  cfg = memory_config(cfg)
  t, c = cfg.capacity, cfg.latent_channels
  return VoxelState(coords=jnp.zeros((t, 3), jnp.int32), points=jnp.zeros((t, 3), jnp.float32),
                    features=jnp.zeros((t, c), cfg.dtype), weight=jnp.zeros((t,), jnp.float32),
                    count=jnp.zeros((t,), jnp.int32), last_seen=jnp.full((t,), -1, jnp.int32),
                    occupied=jnp.zeros((t,), bool), cfg=cfg)


def write(state: VoxelState, latents, depth, intrinsics, c2w, static_mask, frame_index,
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


def read(state: VoxelState, intrinsics, c2w, *, with_depth: bool = False):
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


def nbytes(state: VoxelState) -> int:
  """Bytes of the occupied voxels (host side; summed over any batch dims)."""
  return live_bytes(state, state.occupied)
