"""The ``rgb_points`` backend: a full-resolution RGB point cloud (Spatia / Voyager style).

Writes append every valid full-resolution pixel of the decoded frames as a coloured point;
``render`` splats an image into a target camera and ``read`` re-encodes it to latents with
the autoencoder's encoder (bound by ``memory.get_backend(..., encode_fn=...)``).

An encoder may compress time: the Wan VAE turns F = 1 + t k rendered video frames into
k + 1 latent frames (causal, t = 4). ``read`` then takes the cameras of every video frame
(the Wan rollout renders all 33 frames of a chunk, as pixel-memory systems condition a
video model) and a latent cell's coverage pools the pixels of all frames that latent
encodes (latent 0: frame 0; latent j: frames t(j-1)+1 .. tj).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from mirage_jax.errors import InputError
from mirage_jax.memory.config import MemoryConfig, check_frames, live_bytes, memory_config
from mirage_jax.memory.splatting import lift_frames, ring_slots, splat


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


def init(cfg) -> RgbPointState:
  """Empty RGB point cloud with ``cfg.capacity`` point slots."""
  cfg = memory_config(cfg)
  if cfg.image_height % cfg.latent_height or cfg.image_width % cfg.latent_width:
    raise InputError("memory config", "image_height", "rgb_points needs the image size to be an "
                     "integer multiple of the latent size")
  n = cfg.capacity
  return RgbPointState(points=jnp.zeros((n, 3), jnp.float32), rgb=jnp.zeros((n, 3), jnp.uint8),
                       valid=jnp.zeros((n,), bool), head=jnp.zeros((), jnp.int32), cfg=cfg)


def write(state: RgbPointState, latents, depth, intrinsics, c2w, static_mask,
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


# Point-frames (cloud points x target frames) splatted per render step. A splat's
# temporaries are ~29 B a point-frame on TPU (projections, cell ids, z-buffer indices), so a
# step stays near 1 GB: a 704x1280 cloud after 16 chunks (117M points) renders one frame a
# step (a single vmapped splat of all 33 frames needed 111 GB); small clouds (the CPU
# benchmarks, <= 1M points) still render all frames in one vmapped step.
RENDER_POINT_FRAMES = 1 << 25


def render_frames_per_step(num_points: int, num_frames: int) -> int:
  """Target frames per render step: all when they fit ``RENDER_POINT_FRAMES``, at least 1."""
  return int(max(1, min(num_frames, RENDER_POINT_FRAMES // max(num_points, 1))))


def render(state: RgbPointState, intrinsics, c2w, *, frames_per_step: int | None = None):
  """Full-resolution z-buffer render of the RGB cloud.

  Frames render in steps of ``frames_per_step`` (a ``lax.map`` over steps, each a vmapped
  splat of the whole cloud), so temporaries are bounded by one step's frames; every frame's
  splat is the same computation as in a single vmap over all frames.

  Args:
    intrinsics: (F, 3, 3) of the image resolution. c2w: (F, 4, 4).
    frames_per_step: frames splatted together (None: ``render_frames_per_step``; >= F: one
      vmapped splat of all frames).
  Returns:
    rgb (F, H, W, 3) float32 in [0, 1] (black where empty), coverage (F, H, W) bool.
  """
  cfg = state.cfg
  f = intrinsics.shape[0]
  step = frames_per_step or render_frames_per_step(state.points.shape[0], f)
  if step < 1:
    raise InputError("rgb_points.render", "frames_per_step", f"must be >= 1, got {step}")

  def one(camera):
    K1, c2w1 = camera
    image, covered, _ = splat(state.points, state.rgb, state.valid, K1, c2w1,
                              cfg.image_height, cfg.image_width, cfg.near)
    return image.astype(jnp.float32) / 255.0, covered

  if step >= f:
    return jax.vmap(one)((intrinsics, c2w))
  # batch_size=1 would vmap a batch of one: plain map then. Otherwise lax.map scans the
  # whole steps and renders the remainder F % step in one more vmap.
  return jax.lax.map(one, (intrinsics, c2w), batch_size=None if step == 1 else step)


def read(state: RgbPointState, intrinsics, c2w, *, encode_fn):
  """Renders the RGB cloud at full resolution and re-encodes it to latents.

  Args:
    intrinsics: (F, 3, 3) of the image resolution. c2w: (F, 4, 4): one camera per rendered
      frame (for a temporally compressing encoder, every video frame).
    encode_fn: maps rgb (F, H, W, 3) float32 in [0, 1] to latents (F', h, w, C), F' = F
      (one latent per image) or F = 1 + t (F' - 1) (a causal video VAE with temporal factor
      t, as Wan's); its cost is part of this backend's read.
  Returns:
    latents (F', h, w, C) (zeros outside coverage), coverage (F', h, w) bool: a latent cell
    is covered when at least half of the full-resolution pixels it encodes are (over the
    frames of its temporal group).
  """
  cfg = state.cfg
  rgb, covered = render(state, intrinsics, c2w)
  latents = encode_fn(rgb)
  f, f_lat = covered.shape[0], latents.shape[0]
  h, w = cfg.latent_height, cfg.latent_width
  cell = lambda c: c.reshape(c.shape[0], h, cfg.image_height // h, w,
                             cfg.image_width // w).mean(axis=(2, 4))
  if f_lat == f:
    frac = cell(covered)
  else:
    t = (f - 1) // max(f_lat - 1, 1)
    if f_lat < 2 or 1 + t * (f_lat - 1) != f:
      raise InputError("rgb_points.read", "encode_fn", f"{f} rendered frames encoded to "
                       f"{f_lat} latents: expected {f} or 1 + t (latents - 1) frames")
    # Latent 0 encodes frame 0 alone, latent j frames t(j-1)+1 .. tj (causal VAE).
    rest = cell(covered[1:]).reshape(f_lat - 1, t, h, w).mean(axis=1)
    frac = jnp.concatenate([cell(covered[:1]), rest], 0)
  cov = frac >= 0.5
  return jnp.where(cov[..., None], latents, 0).astype(cfg.dtype), cov


def nbytes(state: RgbPointState) -> int:
  """Bytes of the live points (host side; summed over any batch dims)."""
  return live_bytes(state, state.valid)

