"""The ``frame_bank`` backend: past latent frames with their poses (WorldMem /
Context-as-Memory style).

A ring buffer of ``capacity`` latent frames with latent-resolution depth and cameras.
``retrieve`` ranks stored frames by frustum overlap with a target camera; ``read``
reprojects the best-overlapping frame into the target camera via its depth (z-buffer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from mirage_jax import geometry
from mirage_jax.errors import InputError
from mirage_jax.memory.config import MemoryConfig, check_frames, live_bytes, memory_config
from mirage_jax.memory.splatting import depth_at, latent_intrinsics, lift_frames, ring_slots, splat


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


def init(cfg) -> FrameBankState:
  """Empty bank of ``cfg.capacity`` frames."""
  cfg = memory_config(cfg)
  s, h, w, c = cfg.capacity, cfg.latent_height, cfg.latent_width, cfg.latent_channels
  return FrameBankState(latents=jnp.zeros((s, h, w, c), cfg.dtype),
                        depth=jnp.ones((s, h, w), jnp.float32),
                        intrinsics=jnp.broadcast_to(jnp.eye(3, dtype=jnp.float32), (s, 3, 3)),
                        c2w=jnp.broadcast_to(jnp.eye(4, dtype=jnp.float32), (s, 4, 4)),
                        point_valid=jnp.zeros((s, h, w), bool), frame=jnp.full((s,), -1, jnp.int32),
                        valid=jnp.zeros((s,), bool), head=jnp.zeros((), jnp.int32), cfg=cfg)


def write(state: FrameBankState, latents, depth, intrinsics, c2w, static_mask,
          frame_index, rgb=None) -> FrameBankState:
  """Stores F frames (latents, latent-resolution depth, camera) in the ring buffer.

  Args: as ``voxel.write``.
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


def retrieve(state: FrameBankState, intrinsics, c2w, k: int):
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


def read(state: FrameBankState, intrinsics, c2w):
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


def nbytes(state: FrameBankState) -> int:
  """Bytes of the stored frames (host side; summed over any batch dims)."""
  return live_bytes(state, state.valid)
