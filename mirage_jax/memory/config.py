"""What every memory backend's state and bookkeeping shares: the static ``MemoryConfig``,
the shape checks of ``write`` and the host-side byte counts.

Every backend (see ``mirage_jax.memory``) is a set of pure functions over a state pytree
(a ``flax.struct`` dataclass whose arrays are the leaves and whose ``MemoryConfig`` is static
aux data), so ``write`` and ``read`` jit, vmap over a batch of scenes and shard along it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mirage_jax.errors import InputError, settings_dataclass

_WHERE = "memory config"


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
