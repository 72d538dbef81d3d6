"""Reference-frame retrieval by voxel IoU (the reference's rule), vectorised over history.

Each point set becomes a sorted array of unique voxel keys (a 32-bit hash of the integer
voxel coordinates, padded with an "empty" key); the intersection of the target's set with
every past frame's set is one ``searchsorted`` per frame, vmapped over history.

Hash collisions can merge two distinct voxels into one key; for n voxels in a set the
expected number of colliding pairs is about n^2 / 2^33 (≈0.01 for 10,000 voxels), which
moves an IoU by ~1e-6: negligible against the 0.04 threshold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mirage_jax import geometry
from mirage_jax.errors import InputError

VOXEL_SIZE = 0.1
IOU_THRESHOLD = 0.04
TOP_K = 4

_EMPTY = jnp.uint32(0xFFFFFFFF)


def _mix(h):
  """32-bit avalanche finaliser (MurmurHash3's fmix32): nearby inputs give unrelated outputs."""
  h ^= h >> 16
  h *= jnp.uint32(0x85EBCA6B)
  h ^= h >> 13
  h *= jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def voxel_keys(points, valid, voxel_size: float = VOXEL_SIZE):
  """Sorted unique voxel keys of one point set.

  Args:
    points: (N, 3) world points. valid: (N,) bool.
  Returns:
    keys (N,) uint32 ascending, unique keys first then padding 0xFFFFFFFF;
    count () int32 number of unique voxels.
  """
  ijk = jnp.floor(jnp.clip(points / voxel_size, -2.0**30, 2.0**30)).astype(jnp.int32)
  ijk = jax.lax.bitcast_convert_type(ijk, jnp.uint32)  # two's complement bits, wrapping multiply
  # Chained mixing; a plain XOR of scaled coordinates collides on mirror-symmetric grids.
  h = _mix(ijk[:, 0])
  h = _mix(h ^ (ijk[:, 1] + jnp.uint32(0x9E3779B9)))
  h = _mix(h ^ (ijk[:, 2] + jnp.uint32(0x7F4A7C15)))
  h = jnp.where(h == _EMPTY, _EMPTY - 1, h)  # keep the padding key unique
  ok = valid & jnp.all(jnp.isfinite(points), axis=-1)
  keys = jnp.sort(jnp.where(ok, h, _EMPTY))
  dup = jnp.concatenate([jnp.zeros((1,), bool), keys[1:] == keys[:-1]])
  keys = jnp.sort(jnp.where(dup, _EMPTY, keys))
  return keys, jnp.sum(keys != _EMPTY).astype(jnp.int32)


def voxel_iou(target_points, target_valid, frame_points, frame_valid, voxel_size: float = VOXEL_SIZE):
  """Voxel IoU between one target point set and each of S past frames' point sets.

  Args:
    target_points: (P, 3). target_valid: (P,) bool.
    frame_points: (S, Q, 3). frame_valid: (S, Q) bool.
  Returns:
    (S,) float32 IoU in [0, 1] (0 when both sets are empty).
  """
  t_keys, t_n = voxel_keys(target_points, target_valid, voxel_size)
  f_keys, f_n = jax.vmap(lambda p, v: voxel_keys(p, v, voxel_size))(frame_points, frame_valid)
  t_live = t_keys != _EMPTY

  def inter(row):
    pos = jnp.clip(jnp.searchsorted(row, t_keys), 0, row.shape[0] - 1)
    return jnp.sum(t_live & (row[pos] == t_keys))

  i = jax.vmap(inter)(f_keys)
  union = t_n + f_n - i
  return (i / jnp.maximum(union, 1)).astype(jnp.float32)


def select_reference_frames(target_points, target_valid, frame_points, frame_valid, frame_ids,
                            voxel_size: float = VOXEL_SIZE, threshold: float = IOU_THRESHOLD,
                            k: int = TOP_K):
  """The reference's rule: the top-k past frames by voxel IoU, kept if IoU >= threshold.

  Args:
    target_points: (P, 3) the target view's visible points. target_valid: (P,) bool.
    frame_points: (S, Q, 3) each past frame's points. frame_valid: (S, Q) bool.
    frame_ids: (S,) int frame index of each past frame (-1 marks an empty slot).
    k: static, <= S.
  Returns:
    indices (k,) int32 frame ids, best first, -1 where below threshold;
    scores (k,) float32 IoU of each pick.
  """
  if not 1 <= k <= frame_points.shape[0]:
    raise InputError("retrieval.select_reference_frames", "k",
                     f"must be in [1, {frame_points.shape[0]}] (number of past frames), got {k}")
  iou = voxel_iou(target_points, target_valid, frame_points, frame_valid, voxel_size)
  iou = jnp.where(frame_ids >= 0, iou, 0.0)
  scores, order = jax.lax.top_k(iou, k)
  ids = jnp.where(scores >= threshold, frame_ids[order], -1).astype(jnp.int32)
  return ids, scores


def visible_points(points, valid, intrinsics, c2w, height: int, width: int, near: float = 1e-3):
  """Which memory points fall inside a target camera's frustum (the target's visible set).

  Args:
    points: (N, 3). valid: (N,) bool. intrinsics: (3, 3) of the (height, width) grid.
    c2w: (4, 4).
  Returns:
    (N,) bool.
  """
  uv, z = geometry.project_points(points, intrinsics, c2w)
  return (valid & (z > near) & (uv[:, 0] >= 0) & (uv[:, 0] < width)
          & (uv[:, 1] >= 0) & (uv[:, 1] < height))
