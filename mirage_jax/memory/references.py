"""Reference frames: a fixed-capacity bank of past latent frames and retrieval from it.

Both families' rollouts and the small family's training retrieve references the same way:
the frames whose lifted points best overlap (voxel IoU, the reference's rule,
:mod:`mirage_jax.memory.retrieval`) what the target cameras see, from a ``frame_bank``
state (:mod:`mirage_jax.memory.frame_bank`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mirage_jax import geometry
from mirage_jax.memory import config, frame_bank, retrieval, splatting


def reference_bank_init(cfg: config.MemoryConfig, capacity: int):
  """Empty bank of ``capacity`` latent frames (a ``frame_bank`` state; write with
  ``memory.frame_bank.write``)."""
  return frame_bank.init(dataclasses.replace(cfg, capacity=capacity))


def retrieve_references(bank, eligible, target_K, target_c2w, k: int):
  """The top-k bank frames for a chunk by voxel IoU (the reference's rule), static shapes.

  The chunk's visible set is every bank point (all live frames, eligible or not) inside
  the frustum of any target camera; each eligible frame scores the voxel IoU (voxel 0.1 m)
  of that set with its own points, and the k best with IoU >= 0.04 are kept
  (``memory.retrieval``). Fallback: a slot with no frame above the threshold takes the
  newest live bank frame (at rollout and in training, the last context frame or close to
  it), which adds no stale content and keeps k static.

  Args:
    bank: ``FrameBankState`` of S frames (latents (S, h, w, C), latent-resolution depth,
      intrinsics, c2w, point_valid, frame ids, valid).
    eligible: (S,) bool frames that may be picked (e.g. not already in the context).
    target_K: (T, 3, 3) of the image resolution. target_c2w: (T, 4, 4).
    k: static, 1 <= k <= S.
  Returns:
    latents (k, h, w, C) float32; intrinsics (k, 3, 3) of the image resolution;
    c2w (k, 4, 4); slots (k,) int32 bank slots, best first; found (k,) bool whether the
    slot passed the threshold (False: fallback).
  """
  cfg = bank.cfg
  s, h, w = bank.depth.shape
  points = geometry.unproject_depth(bank.depth, bank.intrinsics, bank.c2w).reshape(s, h * w, 3)
  valid = (bank.point_valid & bank.valid[:, None, None]).reshape(s, h * w)
  flat_p, flat_v = points.reshape(-1, 3), valid.reshape(-1)
  K_lat = splatting.latent_intrinsics(cfg, target_K)
  seen = jax.vmap(lambda K1, c1: retrieval.visible_points(
      flat_p, flat_v, K1, c1, h, w, cfg.near))(K_lat, target_c2w).any(0)
  ids = jnp.where(eligible & bank.valid, jnp.arange(s, dtype=jnp.int32), -1)
  picks, _ = retrieval.select_reference_frames(flat_p, seen, points, valid, ids, k=k)
  found = picks >= 0
  newest = jnp.argmax(jnp.where(bank.valid, bank.frame, -1)).astype(jnp.int32)
  slots = jnp.where(found, picks, newest)
  K_img = geometry.scale_intrinsics(bank.intrinsics[slots], cfg.image_width / cfg.latent_width,
                                    cfg.image_height / cfg.latent_height)
  return bank.latents[slots].astype(jnp.float32), K_img, bank.c2w[slots], slots, found
