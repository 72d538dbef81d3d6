"""The ``none`` backend: no memory. Writes only check shapes, reads are empty (the
sliding window of recent frames lives in the rollout)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct

from mirage_jax.memory.config import MemoryConfig, check_frames, memory_config


@struct.dataclass
class EmptyState:
  """No arrays: the ``none`` backend remembers nothing."""
  cfg: MemoryConfig = struct.field(pytree_node=False)


def init(cfg) -> EmptyState:
  return EmptyState(cfg=memory_config(cfg))


def write(state: EmptyState, latents, depth, intrinsics, c2w, static_mask, frame_index,
          rgb=None) -> EmptyState:
  """Checks shapes like every backend, then forgets the frames."""
  del rgb
  check_frames(state.cfg, latents, depth, intrinsics, c2w, static_mask, frame_index)
  return state


def read(state: EmptyState, intrinsics, c2w):
  """Returns zeros (F, h, w, C) and an all-False coverage (F, h, w) for intrinsics (F, 3, 3)."""
  del c2w
  cfg = state.cfg
  f = intrinsics.shape[0]
  return (jnp.zeros((f, cfg.latent_height, cfg.latent_width, cfg.latent_channels), cfg.dtype),
          jnp.zeros((f, cfg.latent_height, cfg.latent_width), bool))


def nbytes(state: EmptyState) -> int:
  del state
  return 0
