"""Latent spatial memories behind one interface, chosen by name.

Every backend is a ``Backend`` of pure functions over a state pytree for *one* scene
(``jax.vmap`` them for a batch; the batch axis then shards like any array):

  init(cfg) -> state
      cfg: ``MemoryConfig``, ``ml_collections.ConfigDict`` or dict (fields documented on
      ``MemoryConfig``).
  write(state, latents, depth, intrinsics, c2w, static_mask, frame_index, rgb=None) -> state
      latents (F, h, w, C); depth (F, H, W) or (F, h, w); intrinsics (F, 3, 3) of the image
      resolution (H, W); c2w (F, 4, 4); static_mask (F, H, W) or (F, h, w) bool;
      frame_index (F,) int; rgb (F, H, W, 3) float in [0, 1].
  read(state, intrinsics, c2w) -> (latents (F, h, w, C), coverage (F, h, w) bool)
  nbytes(state) -> int           bytes of live entries (host side, summed over batch dims)
  capacity_bytes(state) -> int   bytes allocated

Why one positional signature plus an optional ``rgb`` keyword rather than a ``Frames``
pytree: the rollout has every field at hand after decoding a chunk, so it passes them all
to whichever backend is configured; backends ignore what they do not use (only
``rgb_points`` needs ``rgb``). The encoder that ``rgb_points`` needs to turn its rendered
image back into latents is bound once by ``get_backend(..., encode_fn=...)``, so ``read``
keeps the same three arguments for every backend. ``frame_bank`` additionally offers
``frame_bank.retrieve``; voxel-IoU reference frames are in ``retrieval``.
``mirage.latent_frame_indices`` says which video frame's pose and depth go with each Wan
latent frame (the reference's pairing).

One module per backend, each with ``init``, ``write``, ``read`` and ``nbytes`` over its own
state class: ``voxel`` (ours: voxel-hashed latent cache), ``mirage`` (the reference's
append-only latent point cloud), ``none`` (no memory), ``frame_bank`` (past latent frames,
retrieved by frustum overlap), ``rgb_points`` (full-resolution RGB point cloud, re-encoded on
read). ``config`` holds the shared ``MemoryConfig`` and byte counts, ``splatting`` the
lifting of pixels to 3D and the z-buffer splat; ``objects`` (per-object slots) and
``retrieval`` (reference frames by voxel IoU) sit beside them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from mirage_jax import sharding
from mirage_jax.errors import InputError
from mirage_jax.memory import (config, frame_bank, mirage, none, objects, references, retrieval,
                               rgb_points, splatting, voxel)
from mirage_jax.memory.config import MemoryConfig, capacity_bytes, memory_config


class Backend(NamedTuple):
  """The functions of one memory backend (see the module docstring for signatures)."""
  name: str
  init: Callable
  write: Callable
  read: Callable
  nbytes: Callable
  capacity_bytes: Callable
  # read(..., with_depth=True) also returns (F, h, w) the depth of what each cell shows
  # (0 where empty): the backends that keep points in 3D.
  reads_depth: bool = False


# Each backend module has ``init``, ``write``, ``read`` and ``nbytes``.
_BACKENDS = {"voxel": voxel, "mirage": mirage, "none": none, "frame_bank": frame_bank,
             "rgb_points": rgb_points}

BACKEND_NAMES = tuple(_BACKENDS)
_READS_DEPTH = ("voxel", "mirage")


def get_backend(name: str, *, encode_fn: Callable | None = None) -> Backend:
  """The backend called ``name`` (one of ``BACKEND_NAMES``).

  Args:
    name: backend name.
    encode_fn: required by ``rgb_points`` only: rgb (F, H, W, 3) float in [0, 1] ->
      latents (F, h, w, C), the autoencoder's encoder.
  """
  if name not in _BACKENDS:
    raise InputError("memory config", "backend",
                     f"unknown memory backend {name!r} (known: {', '.join(BACKEND_NAMES)})")
  module = _BACKENDS[name]
  read = module.read
  if name == "rgb_points":
    if encode_fn is None:
      raise InputError("memory config", "backend", "rgb_points needs encode_fn (the autoencoder's encoder)")
    read = functools.partial(read, encode_fn=encode_fn)
  return Backend(name, module.init, module.write, read, module.nbytes, capacity_bytes,
                 reads_depth=name in _READS_DEPTH)


def capacity_for(backend: str, num_frames: int, cfg) -> dict[str, int]:
  """Memory overrides so an append-only backend holds ``num_frames`` frames without eviction.

  Args:
    backend: memory backend name. num_frames: frames that will be written.
    cfg: the ``MemoryConfig`` (image and latent sizes).
  Returns:
    ``{"capacity": n}`` for ``mirage`` (latent pixels), ``rgb_points`` (image pixels) and
    ``frame_bank`` (frames); ``{}`` for the others (``voxel`` stays bounded).
  """
  per_frame = {"mirage": cfg.latent_height * cfg.latent_width,
               "rgb_points": cfg.image_height * cfg.image_width, "frame_bank": 1}
  return {"capacity": int(num_frames) * per_frame[backend]} if backend in per_frame else {}


def init_batch(backend: Backend, cfg: Any, batch: int):
  """``batch`` empty states stacked on a new leading axis (vmap write/read over it)."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (batch,) + x.shape), backend.init(cfg))


def batch_map(fn: Callable, *args):
  """``jax.vmap(fn)(*args)`` that keeps every example on the device holding it.

  Inside a mesh context (``jax.set_mesh``) whose ``batch`` logical rule (``sharding.use_rules``)
  splits the leading axis, the vmap runs inside ``shard_map`` over those mesh axes: each
  device writes and reads the memories of its own examples, so the partitioner never sees
  the scatters, sorts and while loops of a batched memory (which it may gather across the
  batch) and no loop predicate becomes a cross-device reduction. Without a mesh, or when
  the axes do not divide the batch, it is the plain vmap.

  Args:
    fn: per-example function of arrays without the batch axis.
    *args: pytrees of (B, ...) arrays.
  Returns:
    ``fn``'s outputs with a leading (B,) axis, batch-sharded like the inputs.
  """
  mapped = jax.vmap(fn)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return mapped(*args)
  b = jax.tree.leaves(args)[0].shape[0]
  axes = sharding.logical_to_spec(("batch",), None, mesh, (b,))[0]
  if axes is None:
    return mapped(*args)
  spec = jax.sharding.PartitionSpec(axes)
  return jax.shard_map(mapped, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(*args)


__all__ = ["Backend", "BACKEND_NAMES", "capacity_for", "MemoryConfig", "batch_map", "config", "frame_bank",
           "get_backend", "init_batch", "memory_config", "mirage", "none", "objects", "retrieval",
           "rgb_points", "splatting", "voxel"]
