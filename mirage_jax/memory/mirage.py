"""The ``mirage`` backend: the reference's append-only latent point cloud.

Every valid latent pixel of a written frame becomes a world point; a read splats all points
into the target camera with a nearest-cell z-buffer. It follows the reference's exact
conventions (integer pixel coordinates, rounding; see the notes below), unlike the
pixel-centre convention of the other backends (``memory.splatting``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mirage_jax.errors import InputError
from mirage_jax.memory.config import MemoryConfig, check_frames, live_bytes, memory_config
from mirage_jax.memory.splatting import ring_slots


# The ``mirage`` backend reproduces the reference's ``LatentPointCloud``
# (microsoft/LatentSpatialMemory, src/mirage/latent_point_cloud.py) and the way its callers
# (src/mirage/inference/mirage_pipeline.py, data_process/sample_builder.py) use it, so that
# the VACE branch sees the scene latents it was trained on. Facts of the reference:
#
# write (``from_geometry``, ``update``):
#   * depth is resized to the latent grid with ``F.interpolate(mode="bilinear",
#     align_corners=False)`` and no antialiasing: each latent cell samples the full-resolution
#     depth at its own centre, bilinearly (for stride 16 only the 2x2 pixels around the
#     centre of each 16x16 block count; nothing is averaged).
#   * intrinsics are rescaled by plain multiplication: fx, cx by w/W and fy, cy by h/H.
#   * latent pixel (i, j) is cast through image coordinate (u, v) = (j, i) of those
#     intrinsics (NOT j + 0.5): x = (j - cx) * d / fx, y = (i - cy) * d / fy, z = d, then
#     world = R @ p + t with the camera-to-world pose.
#   * a point is valid iff its resized depth is > 0 (no near plane, no far plane) and the
#     exclusion mask, resized with ``F.interpolate(mode="nearest")`` (cell (i, j) takes full
#     pixel (floor(i * H / h), floor(j * W / w))), is off there. Points are appended, never
#     merged or evicted.
# read (``project``):
#   * world -> camera with ``torch.inverse(c2w)``; u = x * fx / z + cx, v = y * fy / z + cy
#     with the target intrinsics rescaled the same way; the target cell is
#     (round(v), round(u)) (``torch.round``: halves to even), kept iff inside the grid and
#     z > 0.
#   * z-buffer: points sorted by z descending (``torch.argsort``, not stable) and scattered
#     in that order by plain duplicate-index assignment, so that the last write, the closest
#     point, wins a cell; empty cells are zero. Two things are left to chance there:
#     - exact depth ties: the unstable sort orders equal z arbitrarily (on CPU: stable below
#       17 points, introsort above). With level cameras and vertical walls, points of one
#       column at equal depth often share a target cell: in our golden (tests/goldens/
#       mirage_splat.npz) 131 of 2129 covered cells are exact ties, and the reference gives
#       71 of them to the earliest point and 60 to the latest. We give ties to the point
#       appended last (the newest view), so we differ from it on about half of the ties.
#     - the scatter itself: PyTorch leaves assignment through duplicate indices undefined;
#       serial CPU runs keep the last write, but a multi-threaded CPU run (we saw it at 4000
#       points on 2 threads) or CUDA may keep another, even a farther point, and the depth
#       and feature scatters may then disagree. We implement the intended rule (closest
#       wins), i.e. the reference run on one CPU thread.
#
# Which frames (see ``latent_frame_indices``): training builds the cloud from ONE frame, the
# first target frame t0 (its depth at frame resolution, and the VAE latent of that single
# image), and reads it at video frames t0 + 4k for target latent k (and t0 - 8, t0 - 4 for the
# 2 preceding latents). Inference writes the start frame the same way, then after every chunk
# appends each generated latent k with the pose of video frame 4k of the chunk and the depth
# MapAnything predicts on decoded frame 4k (at MapAnything's resolution, intrinsics rescaled to
# it); target latent k of a chunk is read at video frame 4k of the chunk (chunks after the
# first start one frame early and drop their first, overlapping latent from the write).
#
# Where we differ, on purpose: a ring buffer of ``capacity`` points (the reference grows
# without bound; with room for every point the two are the same), exact depth ties go to the
# point appended last (the reference leaves them to its unstable sort), non-finite depths or
# points are dropped
# (the reference keeps them but they can never land in a cell), ``cfg.near`` is not used
# (the reference has none), and the arithmetic is elementwise float32 (no matmuls, so the
# geometry is full float32 on accelerators whose default matmul precision is lower).


def latent_frame_indices(num_video_frames: int, temporal_stride: int = 4,
                         start: int = 0) -> np.ndarray:
  """Video frame whose pose and depth the reference writes and reads for each latent frame.

  Wan's causal video autoencoder turns frames [0], [1..4], [5..8], ... into latent frames
  0, 1, 2, ...; the reference pairs latent k with video frame ``start + 4 k``, i.e. the
  *last* frame of latent k's group (frame 0 for the first latent), both when it projects the
  cloud into target cameras and when it writes generated latents back (``frames[::4]``).

  Args:
    num_video_frames: frames of the clip or chunk, >= 1 (Wan chunks have 4 N + 1, giving
      N + 1 latent frames; other lengths give ceil(n / stride), as the reference's
      ``indices[::4]``).
    temporal_stride: frames per latent frame (4 for Wan2.2).
    start: video index of the chunk's first frame.
  Returns:
    (L,) int32 video frame indices, L = ceil(num_video_frames / temporal_stride).
  """
  if int(num_video_frames) < 1:
    raise InputError("memory.latent_frame_indices", "num_video_frames",
                     f"must be >= 1, got {num_video_frames}")
  if int(temporal_stride) < 1:
    raise InputError("memory.latent_frame_indices", "temporal_stride",
                     f"must be >= 1, got {temporal_stride}")
  return np.arange(int(start), int(start) + int(num_video_frames), int(temporal_stride),
                   dtype=np.int32)


@struct.dataclass
class PointState:
  """Append-only latent point cloud in a ring buffer of ``capacity`` points.

  Attributes:
    points: (N, 3) float32 world points.
    features: (N, C) feature_dtype latents.
    frame: (N,) int32 frame index that wrote each point.
    valid: (N,) bool live slots.
    head: () int32 points appended so far (next slot is head % N).
  """
  points: jax.Array
  features: jax.Array
  frame: jax.Array
  valid: jax.Array
  head: jax.Array
  cfg: MemoryConfig = struct.field(pytree_node=False)


def init(cfg) -> PointState:
  """Empty point cloud with ``cfg.capacity`` point slots."""
  cfg = memory_config(cfg)
  n = cfg.capacity
  return PointState(points=jnp.zeros((n, 3), jnp.float32),
                    features=jnp.zeros((n, cfg.latent_channels), cfg.dtype),
                    frame=jnp.full((n,), -1, jnp.int32), valid=jnp.zeros((n,), bool),
                    head=jnp.zeros((), jnp.int32), cfg=cfg)


def _scale_intrinsics_rows(K, sx: float, sy: float):
  """(..., 3, 3) K with row 0 times sx and row 1 times sy: the reference's rescaling, done
  elementwise so it is exact float32 on every backend."""
  scale = jnp.array([sx, sy, 1.0], jnp.float32)[:, None]
  return K.astype(jnp.float32) * scale


def _torch_linear_taps(n: int, size: int):
  """Source taps and weights of PyTorch's linear resize (align_corners=False) of n -> size.

  Computed on the host from the static sizes: the source coordinate scale * (i + 0.5) - 0.5
  rounded once to float32 (exact in float64 first), as PyTorch's fused multiply-add gives it.
  """
  scale = np.float64(np.float32(n) / np.float32(size))
  src = np.maximum(scale * (np.arange(size) + 0.5) - 0.5, 0.0).astype(np.float32)
  i0 = np.minimum(src.astype(np.int32), n - 1)
  i1 = np.minimum(i0 + 1, n - 1)
  l1 = src - i0.astype(np.float32)
  return i0, i1, np.float32(1.0) - l1, l1


def _bilinear_depth(depth, height: int, width: int):
  """(F, height, width) ``F.interpolate(mode="bilinear", align_corners=False)`` of (F, H', W').

  Each output is the sum, in this order, of its four taps times the products of their row
  and column weights, as PyTorch's CPU kernel computes it. Under ``jax.jit`` on CPU that is
  bit-exact (XLA fuses the multiply-adds as PyTorch's kernel does; eager op-by-op execution
  can differ in the last bit for non-integer size ratios).
  """
  if depth.shape[1:] == (height, width):
    return depth
  r0, r1, h0, h1 = _torch_linear_taps(depth.shape[1], height)
  c0, c1, w0, w1 = _torch_linear_taps(depth.shape[2], width)
  h0, h1, w0, w1 = h0[:, None], h1[:, None], w0[None], w1[None]
  tap = lambda r, c: depth[:, r][:, :, c]
  # The weight products are float32 constants, like PyTorch's per-tap weights.
  return ((h0 * w0) * tap(r0, c0) + (h0 * w1) * tap(r0, c1) + (h1 * w0) * tap(r1, c0)
          + (h1 * w1) * tap(r1, c1))


def _nearest_mask(mask, height: int, width: int):
  """(F, height, width) bool: ``F.interpolate(mode="nearest")`` of a (F, H', W') mask."""
  mask = mask.astype(bool)
  mh, mw = mask.shape[1:]
  if (mh, mw) == (height, width):
    return mask
  # Source index min(floor(i * (in / out)), in - 1) in float32, on the host (static sizes).
  taps = lambda n, size: np.minimum(np.floor(np.arange(size, dtype=np.float32)
                                             * (np.float32(n) / np.float32(size))), n - 1)
  return mask[:, taps(mh, height).astype(np.int32)][:, :, taps(mw, width).astype(np.int32)]


def _reference_lift(cfg: MemoryConfig, depth, intrinsics, c2w, static_mask):
  """The reference's write geometry: world points of every latent pixel and their validity.

  Args:
    depth: (F, H, W) or (F, h, w) z-depth. intrinsics: (F, 3, 3) of the image resolution.
    c2w: (F, 4, 4). static_mask: (F, H, W) or (F, h, w) bool, False = excluded.
  Returns:
    points (F, h, w, 3) float32, valid (F, h, w) bool.
  """
  h, w = cfg.latent_height, cfg.latent_width
  d = _bilinear_depth(depth.astype(jnp.float32), h, w)
  K = _scale_intrinsics_rows(intrinsics, w / cfg.image_width, h / cfg.image_height)
  fx, fy = K[:, 0, 0, None, None], K[:, 1, 1, None, None]
  cx, cy = K[:, 0, 2, None, None], K[:, 1, 2, None, None]
  v, u = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                      indexing="ij")
  # Integer coordinates and this order of operations, as the reference: (u - cx) * d / fx.
  cam = (((u - cx) * d) / fx, ((v - cy) * d) / fy, d)
  c2w = c2w.astype(jnp.float32)
  world = jnp.stack([cam[0] * c2w[:, i, 0, None, None] + cam[1] * c2w[:, i, 1, None, None]
                     + cam[2] * c2w[:, i, 2, None, None] + c2w[:, i, 3, None, None]
                     for i in range(3)], axis=-1)
  valid = (d > 0) & jnp.isfinite(d) & _nearest_mask(static_mask, h, w)
  valid &= jnp.all(jnp.isfinite(world), axis=-1)
  return world, valid


def write(state: PointState, latents, depth, intrinsics, c2w, static_mask, frame_index,
          rgb=None) -> PointState:
  """Appends every valid latent pixel of F frames as a world point (oldest overwritten when
  full), with the reference's geometry (see the notes above ``latent_frame_indices``).

  Args:
    latents: (F, h, w, C).
    depth: (F, H, W) or (F, h, w) z-depth, resized bilinearly (half-pixel centres, no
      antialiasing: ``F.interpolate(mode="bilinear", align_corners=False)``) to (h, w).
    intrinsics: (F, 3, 3) of the image resolution (H, W). c2w: (F, 4, 4).
    static_mask: (F, H, W) or (F, h, w) bool, False where excluded (resized by nearest).
    frame_index: (F,) int.
    rgb: unused.
  Returns:
    The new state.
  """
  del rgb
  cfg = state.cfg
  check_frames(cfg, latents, depth, intrinsics, c2w, static_mask, frame_index)
  h, w = cfg.latent_height, cfg.latent_width
  pts, valid = _reference_lift(cfg, depth, intrinsics, c2w, static_mask)
  m = pts.shape[0] * h * w
  valid = valid.reshape(m)
  slots, head = ring_slots(state.head, valid, cfg.capacity)
  frame = jnp.broadcast_to(frame_index.astype(jnp.int32)[:, None], (frame_index.shape[0], h * w))
  put = lambda a, x: a.at[slots].set(x, mode="drop")
  return PointState(points=put(state.points, pts.reshape(m, 3)),
                    features=put(state.features, latents.reshape(m, -1).astype(cfg.dtype)),
                    frame=put(state.frame, frame.reshape(m)),
                    valid=put(state.valid, valid), head=head, cfg=cfg)


def reference_cells(points, valid, K, c2w, height: int, width: int):
  """Where the reference's read puts each point: its target cell and camera depth.

  Args:
    points: (N, 3) world. valid: (N,) bool.
    K: (3, 3) intrinsics of the (height, width) latent grid. c2w: (4, 4).
  Returns:
    cells (N,) int32 in [0, height * width), or height * width for points that land nowhere
    (invalid, z <= 0, non-finite, outside the grid); z (N,) float32 camera depth (+inf for
    points that land nowhere).
  """
  c2w = c2w.astype(jnp.float32)
  R, t = c2w[:3, :3], c2w[:3, 3]
  # Rigid world -> camera, elementwise: R^T (p - t) expanded as R^T p - R^T t.
  t_cam = -(R[0] * t[0] + R[1] * t[1] + R[2] * t[2])
  pc = [points[:, 0] * R[0, i] + points[:, 1] * R[1, i] + points[:, 2] * R[2, i] + t_cam[i]
        for i in range(3)]
  z = pc[2]
  front = z > 0
  safe_z = jnp.where(front, z, 1.0)
  u = pc[0] * K[0, 0] / safe_z + K[0, 2]
  v = pc[1] * K[1, 1] / safe_z + K[1, 2]
  ok = valid & front & jnp.isfinite(u) & jnp.isfinite(v)
  # Clip before the int cast (points near the camera plane project to huge coordinates);
  # rounding halves to even like torch.round.
  iu = jnp.round(jnp.clip(u, -2.0, width + 2.0)).astype(jnp.int32)
  iv = jnp.round(jnp.clip(v, -2.0, height + 2.0)).astype(jnp.int32)
  ok &= (iu >= 0) & (iu < width) & (iv >= 0) & (iv < height)
  cells = jnp.where(ok, iv * width + iu, height * width)
  return cells, jnp.where(ok, z, jnp.inf)


def _reference_splat(points, features, valid, age_rank, K, c2w, height: int, width: int):
  """The reference's read: nearest-cell z-buffer splat into one camera.

  Args:
    points: (N, 3) world. features: (N, C). valid: (N,) bool.
    age_rank: (N,) int32, distinct, larger = appended later (breaks exact depth ties).
    K: (3, 3) intrinsics of the (height, width) grid. c2w: (4, 4).
  Returns:
    image (height, width, C) (zeros where empty), coverage (height, width) bool, depth
    (height, width) float32 camera depth of each cell's point (0 where empty).
  """
  n_cells = height * width
  cells, z = reference_cells(points, valid, K, c2w, height, width)  # n_cells: a dump for misses
  ok = cells < n_cells
  zmin = jnp.full((n_cells + 1,), jnp.inf, jnp.float32).at[cells].min(z)
  closest = ok & (z == zmin[cells])
  ids = jnp.arange(points.shape[0], dtype=jnp.int32)
  newest = jnp.full((n_cells + 1,), -1, jnp.int32).at[cells].max(jnp.where(closest, age_rank, -1))
  winner = closest & (age_rank == newest[cells])
  best = jnp.full((n_cells + 1,), -1, jnp.int32).at[cells].max(jnp.where(winner, ids, -1))
  best = best[:-1].reshape(height, width)
  covered = best >= 0
  image = jnp.where(covered[..., None], features[jnp.maximum(best, 0)], 0)
  depth = jnp.where(covered, zmin[:-1].reshape(height, width), 0.0)
  return image, covered, depth


def read(state: PointState, intrinsics, c2w, *, with_depth: bool = False):
  """Nearest-cell z-buffer splat of all points into F cameras at latent resolution, with the
  reference's conventions (integer pixel coordinates, rounding, z > 0, closest wins, exact
  depth ties to the newest point).

  Args:
    intrinsics: (F, 3, 3) of the image resolution. c2w: (F, 4, 4).
    with_depth: also return the camera z-depth of each cell's point (static).
  Returns:
    latents (F, h, w, C) (zeros where empty), coverage (F, h, w) bool; with ``with_depth``,
    depth (F, h, w) float32 too (0 where empty).
  """
  cfg = state.cfg
  h, w = cfg.latent_height, cfg.latent_width
  K = _scale_intrinsics_rows(intrinsics, w / cfg.image_width, h / cfg.image_height)
  # Slot order is append order rotated by the ring head: rank 0 oldest, capacity-1 newest.
  age_rank = (jnp.arange(cfg.capacity, dtype=jnp.int32) - state.head) % cfg.capacity

  def one(K1, c2w1):
    return _reference_splat(state.points, state.features, state.valid, age_rank, K1, c2w1, h, w)

  image, covered, depth = jax.vmap(one)(K, c2w)
  return (image, covered, depth) if with_depth else (image, covered)


def nbytes(state: PointState) -> int:
  """Bytes of the live points (host side; summed over any batch dims)."""
  return live_bytes(state, state.valid)
