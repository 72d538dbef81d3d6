"""Baseline memories, behind the same functions as ours (see ``mirage_jax.memory``).

  mirage      the reference's append-only latent point cloud (every latent pixel a point).
  none        no memory: reads are empty (the sliding window lives in the rollout).
  frame_bank  past latent frames with poses; retrieval by frustum overlap (WorldMem /
              Context-as-Memory style); read reprojects the best frame via its depth.
  rgb_points  full-resolution RGB point cloud (Spatia / Voyager style); read splats an
              image and re-encodes it with the autoencoder's encoder.

All states are ``flax.struct`` dataclasses carrying their ``MemoryConfig`` as static aux
data; every function works on one scene and is vmapped for a batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from mirage_jax import geometry
from mirage_jax.errors import InputError
from mirage_jax.memory.latent_cache import (MemoryConfig, check_frames, depth_at, latent_intrinsics,
                                            lift_frames, live_bytes, memory_config, ring_slots,
                                            splat)


# ----------------------------------------------------------------------------- mirage


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


def mirage_init(cfg) -> PointState:
  """Empty point cloud with ``cfg.capacity`` point slots."""
  cfg = memory_config(cfg)
  n = cfg.capacity
  return PointState(points=jnp.zeros((n, 3), jnp.float32),
                    features=jnp.zeros((n, cfg.latent_channels), cfg.dtype),
                    frame=jnp.full((n,), -1, jnp.int32), valid=jnp.zeros((n,), bool),
                    head=jnp.zeros((), jnp.int32), cfg=cfg)


def mirage_write(state: PointState, latents, depth, intrinsics, c2w, static_mask, frame_index,
                 rgb=None) -> PointState:
  """Appends every valid latent pixel of F frames as a world point (oldest overwritten when full).

  Args:
    latents: (F, h, w, C). depth: (F, H, W) or (F, h, w), resized bilinearly to (h, w).
    intrinsics: (F, 3, 3) of the image resolution. c2w: (F, 4, 4).
    static_mask: (F, H, W) or (F, h, w) bool. frame_index: (F,) int.
    rgb: unused.
  Returns:
    The new state.
  """
  del rgb
  cfg = state.cfg
  check_frames(cfg, latents, depth, intrinsics, c2w, static_mask, frame_index)
  h, w = cfg.latent_height, cfg.latent_width
  pts, valid = lift_frames(cfg, depth, intrinsics, c2w, static_mask, h, w)
  m = pts.shape[0] * h * w
  valid = valid.reshape(m)
  slots, head = ring_slots(state.head, valid, cfg.capacity)
  frame = jnp.broadcast_to(frame_index.astype(jnp.int32)[:, None], (frame_index.shape[0], h * w))
  put = lambda a, x: a.at[slots].set(x, mode="drop")
  return PointState(points=put(state.points, pts.reshape(m, 3)),
                    features=put(state.features, latents.reshape(m, -1).astype(cfg.dtype)),
                    frame=put(state.frame, frame.reshape(m)),
                    valid=put(state.valid, valid), head=head, cfg=cfg)


def mirage_read(state: PointState, intrinsics, c2w):
  """Nearest-pixel z-buffer splat of all points into F cameras at latent resolution.

  Args:
    intrinsics: (F, 3, 3) of the image resolution. c2w: (F, 4, 4).
  Returns:
    latents (F, h, w, C) (zeros where empty), coverage (F, h, w) bool.
  """
  cfg = state.cfg
  K = latent_intrinsics(cfg, intrinsics)

  def one(K1, c2w1):
    image, covered, _ = splat(state.points, state.features, state.valid, K1, c2w1,
                              cfg.latent_height, cfg.latent_width, cfg.near)
    return image, covered

  return jax.vmap(one)(K, c2w)


def mirage_nbytes(state: PointState) -> int:
  """Bytes of the live points (host side; summed over any batch dims)."""
  return live_bytes(state, state.valid)


# ----------------------------------------------------------------------------- none


@struct.dataclass
class EmptyState:
  """No arrays: the ``none`` backend remembers nothing."""
  cfg: MemoryConfig = struct.field(pytree_node=False)


def none_init(cfg) -> EmptyState:
  return EmptyState(cfg=memory_config(cfg))


def none_write(state: EmptyState, latents, depth, intrinsics, c2w, static_mask, frame_index,
               rgb=None) -> EmptyState:
  """Checks shapes like every backend, then forgets the frames."""
  del rgb
  check_frames(state.cfg, latents, depth, intrinsics, c2w, static_mask, frame_index)
  return state


def none_read(state: EmptyState, intrinsics, c2w):
  """Returns zeros (F, h, w, C) and an all-False coverage (F, h, w) for intrinsics (F, 3, 3)."""
  del c2w
  cfg = state.cfg
  f = intrinsics.shape[0]
  return (jnp.zeros((f, cfg.latent_height, cfg.latent_width, cfg.latent_channels), cfg.dtype),
          jnp.zeros((f, cfg.latent_height, cfg.latent_width), bool))


def none_nbytes(state: EmptyState) -> int:
  del state
  return 0


# ----------------------------------------------------------------------------- frame bank


@struct.dataclass
class FrameBankState:
  """Ring buffer of ``capacity`` latent frames with their geometry at latent resolution.

  Attributes:
    latents: (S, h, w, C) feature_dtype.
    depth: (S, h, w) float32 z-depth at latent resolution.
    intrinsics: (S, 3, 3) float32 of the latent resolution. c2w: (S, 4, 4) float32.
    point_valid: (S, h, w) bool static pixels with usable depth.
    frame: (S,) int32 frame index (-1 in empty slots).
    valid: (S,) bool live slots.
    head: () int32 frames written so far.
  """
  latents: jax.Array
  depth: jax.Array
  intrinsics: jax.Array
  c2w: jax.Array
  point_valid: jax.Array
  frame: jax.Array
  valid: jax.Array
  head: jax.Array
  cfg: MemoryConfig = struct.field(pytree_node=False)


def frame_bank_init(cfg) -> FrameBankState:
  """Empty bank of ``cfg.capacity`` frames."""
  cfg = memory_config(cfg)
  s, h, w, c = cfg.capacity, cfg.latent_height, cfg.latent_width, cfg.latent_channels
  return FrameBankState(latents=jnp.zeros((s, h, w, c), cfg.dtype),
                        depth=jnp.ones((s, h, w), jnp.float32),
                        intrinsics=jnp.broadcast_to(jnp.eye(3, dtype=jnp.float32), (s, 3, 3)),
                        c2w=jnp.broadcast_to(jnp.eye(4, dtype=jnp.float32), (s, 4, 4)),
                        point_valid=jnp.zeros((s, h, w), bool), frame=jnp.full((s,), -1, jnp.int32),
                        valid=jnp.zeros((s,), bool), head=jnp.zeros((), jnp.int32), cfg=cfg)


def frame_bank_write(state: FrameBankState, latents, depth, intrinsics, c2w, static_mask,
                     frame_index, rgb=None) -> FrameBankState:
  """Stores F frames (latents, latent-resolution depth, camera) in the ring buffer.

  Args: as ``mirage_write``.
  Returns:
    The new state.
  """
  del rgb
  cfg = state.cfg
  check_frames(cfg, latents, depth, intrinsics, c2w, static_mask, frame_index)
  h, w = cfg.latent_height, cfg.latent_width
  _, pvalid = lift_frames(cfg, depth, intrinsics, c2w, static_mask, h, w)
  f = latents.shape[0]
  slots, head = ring_slots(state.head, jnp.ones((f,), bool), cfg.capacity)
  put = lambda a, x: a.at[slots].set(x, mode="drop")
  return FrameBankState(latents=put(state.latents, latents.astype(cfg.dtype)),
                        depth=put(state.depth, depth_at(depth.astype(jnp.float32), h, w)),
                        intrinsics=put(state.intrinsics, latent_intrinsics(cfg, intrinsics)),
                        c2w=put(state.c2w, c2w.astype(jnp.float32)),
                        point_valid=put(state.point_valid, pvalid),
                        frame=put(state.frame, frame_index.astype(jnp.int32)),
                        valid=put(state.valid, jnp.ones((f,), bool)), head=head, cfg=cfg)


def _bank_points(state: FrameBankState):
  """(S, h, w, 3) world points of every stored latent pixel."""
  return geometry.unproject_depth(state.depth, state.intrinsics, state.c2w)


def frustum_overlap(state: FrameBankState, intrinsics, c2w):
  """Fraction of each stored frame's points that fall inside one target camera's frustum.

  Args:
    intrinsics: (3, 3) of the image resolution. c2w: (4, 4).
  Returns:
    (S,) float32 in [0, 1], 0 for empty slots.
  """
  cfg = state.cfg
  K = latent_intrinsics(cfg, intrinsics)
  s = state.depth.shape[0]
  uv, z = geometry.project_points(_bank_points(state).reshape(s, -1, 3), K[None], c2w[None])
  inside = ((z > cfg.near) & (uv[..., 0] >= 0) & (uv[..., 0] < cfg.latent_width)
            & (uv[..., 1] >= 0) & (uv[..., 1] < cfg.latent_height))
  pv = state.point_valid.reshape(s, -1)
  score = jnp.sum(inside & pv, -1) / jnp.maximum(jnp.sum(pv, -1), 1)
  return jnp.where(state.valid, score, 0.0).astype(jnp.float32)


def frame_bank_retrieve(state: FrameBankState, intrinsics, c2w, k: int):
  """Top-k stored frames by frustum overlap with each target camera.

  Args:
    intrinsics: (F, 3, 3) of the image resolution. c2w: (F, 4, 4). k: static int <= capacity.
  Returns:
    indices (F, k) int32 frame indices (-1 where no stored frame overlaps),
    scores (F, k) float32 overlap fractions, latents (F, k, h, w, C) (zeros for -1).
  """
  if not 1 <= k <= state.cfg.capacity:
    raise InputError("frame_bank.retrieve", "k", f"must be in [1, {state.cfg.capacity}], got {k}")

  def one(K1, c2w1):
    scores, slots = jax.lax.top_k(frustum_overlap(state, K1, c2w1), k)
    hit = scores > 0
    lat = jnp.where(hit[:, None, None, None], state.latents[slots], 0)
    return jnp.where(hit, state.frame[slots], -1), scores, lat

  return jax.vmap(one)(intrinsics, c2w)


def frame_bank_read(state: FrameBankState, intrinsics, c2w):
  """Reprojects the best-overlapping stored frame into each target camera (z-buffer).

  Args:
    intrinsics: (F, 3, 3) of the image resolution. c2w: (F, 4, 4).
  Returns:
    latents (F, h, w, C) (zeros where empty), coverage (F, h, w) bool.
  """
  cfg = state.cfg
  K = latent_intrinsics(cfg, intrinsics)

  def one(K_img, K1, c2w1):
    scores, slot = jax.lax.top_k(frustum_overlap(state, K_img, c2w1), 1)
    slot = slot[0]
    valid = state.point_valid[slot].reshape(-1) & (scores[0] > 0)
    points = geometry.unproject_depth(state.depth[slot], state.intrinsics[slot], state.c2w[slot])
    image, covered, _ = splat(points.reshape(-1, 3),
                              state.latents[slot].reshape(-1, cfg.latent_channels), valid, K1, c2w1,
                              cfg.latent_height, cfg.latent_width, cfg.near)
    return image, covered

  return jax.vmap(one)(intrinsics, K, c2w)


def frame_bank_nbytes(state: FrameBankState) -> int:
  """Bytes of the stored frames (host side; summed over any batch dims)."""
  return live_bytes(state, state.valid)


# ----------------------------------------------------------------------------- RGB points


@struct.dataclass
class RgbPointState:
  """Full-resolution RGB point cloud in a ring buffer of ``capacity`` points.

  Attributes:
    points: (N, 3) float32. rgb: (N, 3) uint8. valid: (N,) bool. head: () int32.
  """
  points: jax.Array
  rgb: jax.Array
  valid: jax.Array
  head: jax.Array
  cfg: MemoryConfig = struct.field(pytree_node=False)


def rgb_points_init(cfg) -> RgbPointState:
  """Empty RGB point cloud with ``cfg.capacity`` point slots."""
  cfg = memory_config(cfg)
  if cfg.image_height % cfg.latent_height or cfg.image_width % cfg.latent_width:
    raise InputError("memory config", "image_height", "rgb_points needs the image size to be an "
                     "integer multiple of the latent size")
  n = cfg.capacity
  return RgbPointState(points=jnp.zeros((n, 3), jnp.float32), rgb=jnp.zeros((n, 3), jnp.uint8),
                       valid=jnp.zeros((n,), bool), head=jnp.zeros((), jnp.int32), cfg=cfg)


def rgb_points_write(state: RgbPointState, latents, depth, intrinsics, c2w, static_mask,
                     frame_index, rgb=None) -> RgbPointState:
  """Appends every valid full-resolution pixel of F decoded frames as a coloured point.

  Args:
    latents: (F, h, w, C), checked but not stored.
    depth: (F, H, W) full-resolution z-depth (required at full resolution).
    intrinsics: (F, 3, 3) of the image resolution. c2w: (F, 4, 4).
    static_mask: (F, H, W) or (F, h, w) bool. frame_index: (F,) int.
    rgb: (F, H, W, 3) decoded frames, float in [0, 1] (required).
  Returns:
    The new state.
  """
  cfg = state.cfg
  check_frames(cfg, latents, depth, intrinsics, c2w, static_mask, frame_index)
  full = (latents.shape[0], cfg.image_height, cfg.image_width)
  if rgb is None or tuple(rgb.shape) != full + (3,):
    raise InputError("rgb_points.write", "rgb", f"expected decoded frames of shape {full + (3,)}, "
                     f"got {None if rgb is None else tuple(rgb.shape)}")
  if tuple(depth.shape) != full:
    raise InputError("rgb_points.write", "depth", f"expected full-resolution shape {full}, got {tuple(depth.shape)}")
  pts, valid = lift_frames(cfg, depth, intrinsics, c2w, static_mask, cfg.image_height, cfg.image_width)
  m = pts.shape[0] * cfg.image_height * cfg.image_width
  valid = valid.reshape(m)
  slots, head = ring_slots(state.head, valid, cfg.capacity)
  colours = jnp.round(jnp.clip(rgb.reshape(m, 3), 0.0, 1.0) * 255.0).astype(jnp.uint8)
  put = lambda a, x: a.at[slots].set(x, mode="drop")
  return RgbPointState(points=put(state.points, pts.reshape(m, 3)), rgb=put(state.rgb, colours),
                       valid=put(state.valid, valid), head=head, cfg=cfg)


def rgb_points_render(state: RgbPointState, intrinsics, c2w):
  """Full-resolution z-buffer render of the RGB cloud.

  Args:
    intrinsics: (F, 3, 3) of the image resolution. c2w: (F, 4, 4).
  Returns:
    rgb (F, H, W, 3) float32 in [0, 1] (black where empty), coverage (F, H, W) bool.
  """
  cfg = state.cfg

  def one(K1, c2w1):
    image, covered, _ = splat(state.points, state.rgb, state.valid, K1, c2w1,
                              cfg.image_height, cfg.image_width, cfg.near)
    return image.astype(jnp.float32) / 255.0, covered

  return jax.vmap(one)(intrinsics, c2w)


def rgb_points_read(state: RgbPointState, intrinsics, c2w, *, encode_fn):
  """Renders the RGB cloud at full resolution and re-encodes it to latents.

  Args:
    intrinsics: (F, 3, 3) of the image resolution. c2w: (F, 4, 4).
    encode_fn: maps rgb (F, H, W, 3) float32 in [0, 1] to latents (F, h, w, C) (the
      autoencoder's encoder); its cost is part of this backend's read.
  Returns:
    latents (F, h, w, C) (zeros outside coverage), coverage (F, h, w) bool: a latent cell
    is covered when at least half of its full-resolution pixels are.
  """
  cfg = state.cfg
  rgb, covered = rgb_points_render(state, intrinsics, c2w)
  latents = encode_fn(rgb)
  f, h, w = covered.shape[0], cfg.latent_height, cfg.latent_width
  frac = covered.reshape(f, h, cfg.image_height // h, w, cfg.image_width // w).mean(axis=(2, 4))
  cov = frac >= 0.5
  return jnp.where(cov[..., None], latents, 0).astype(cfg.dtype), cov


def rgb_points_nbytes(state: RgbPointState) -> int:
  """Bytes of the live points (host side; summed over any batch dims)."""
  return live_bytes(state, state.valid)

