"""The small family's conditioning: what training and generation share.

The DiT's inputs of a chunk are built by ONE function, :func:`dit_inputs`, from the memory
read into the chunk's cameras (the static memory, object slots splatted over it), the
retrieved reference frames and the clean context latents; the denoiser stage's loss
(``stages.DenoiserStage._condition``, per clip under ``memory.batch_map``) and the world
model's jitted chunk step (``world_model.WorldModel._chunk_impl``) both call it, and both
sample a chunk from noise with :func:`sample` (the stage for its scheduled-sampling memory
frames). :func:`memory_config`, :func:`object_config` and :func:`reference_settings` read
the settings of both from a config at the model's latent geometry.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections

from mirage_jax import diffusion, families, geometry, world_model
from mirage_jax import memory as memory_lib
from mirage_jax.depth import align as depth_align
from mirage_jax.errors import InputError
from mirage_jax.families.small import autoencoder, denoiser
from mirage_jax.memory import objects as objects_lib


# The value an export made before each field existed was trained and run with.
_DEFAULTS = {
    "sampler.reencode_latents": False,  # the sampled latents were written
    "sampler.guidance_scale": 0.0,
    "memory.write_new_only": (),  # everything was written
    "memory.depth_from_memory": (),  # the generated depth was written
    "memory.depth_from_memory_rescale": True,
    "memory.mask_dynamic": (),  # moving content was not handled
    "memory.dynamic_threshold": 0.5,
    "objects.backends": (),
    "objects.settings": {},
    "denoiser.cond_dropout": 0.0,
    "denoiser.reference_frames": 0,  # no references
    "denoiser.reference_bank": 1,
    "denoiser.reference_stride": 1,
}


def upgrade(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A small-family config (an export's of any age, or a training run's) in the current
  schema: ``family`` set, and every field added since the first exports filled with the
  value those exports were trained and run with (a copy; present fields are kept)."""
  family = families.check_family(config, "small")
  defaults = dict(_DEFAULTS) if "denoiser" in config else {}
  return world_model.with_defaults(config, {"family": family, **defaults})


def memory_config(config: ml_collections.ConfigDict, **overrides) -> memory_lib.MemoryConfig:
  """The memory settings of ``config`` at the model's image and latent resolution."""
  res = tuple(config.data.resolution)
  factor = autoencoder.downsample_factor(config.autoencoder)
  settings = dict(config.memory.settings, image_height=res[0], image_width=res[1],
                  latent_height=res[0] // factor, latent_width=res[1] // factor,
                  latent_channels=config.autoencoder.latent_channels)
  settings.update(overrides)
  return memory_lib.memory_config(settings)


def object_config(config: ml_collections.ConfigDict) -> objects_lib.ObjectConfig:
  """The object-slot settings of ``config.objects`` at the model's image and latent size."""
  m = memory_config(config)
  return objects_lib.object_config(dict(
      config.objects.settings, image_height=m.image_height, image_width=m.image_width,
      latent_height=m.latent_height, latent_width=m.latent_width,
      latent_channels=m.latent_channels))


def splat_objects(objects, memory, coverage, K, c2w, frame_index):
  """Object slots advanced to ``frame_index`` and drawn over a static memory read.

  Objects go on top: a moving object stands in free space, which the static memory leaves
  empty or fills with what is behind it.

  Args:
    objects: ``memory.objects.ObjectState``. memory: (T, h, w, C) static read; coverage
      (T, h, w) bool. K: (T, 3, 3) image intrinsics. c2w: (T, 4, 4). frame_index: (T,) int32.
  Returns:
    memory (T, h, w, C), coverage (T, h, w) bool.
  """
  lat, cov, _, _ = objects_lib.render(objects, K, c2w, frame_index)
  return jnp.where(cov[..., None], lat.astype(memory.dtype), memory), coverage | cov


def dit_inputs(memory_cfg: memory_lib.MemoryConfig, memory, coverage, K, c2w, context,
               context_K, context_c2w, *, objects=None, frame_index=None, bank=None,
               start=None, num_context: int = 0, num_references: int = 0, target_rays=None,
               context_rays=None):
  """The denoiser's conditioning of one chunk of one clip (no batch axis).

  Training (targets: the window's frames after the memory frames) and generation (targets:
  the chunk's frames) both build the DiT's inputs here, from what each holds:

    1. the object slots (when given) advanced to ``frame_index`` and drawn over the static
       memory read (:func:`splat_objects`);
    2. ``num_references`` frames retrieved from the reference bank by voxel IoU
       (``memory.references.retrieve_references``; frames ``>= start - num_context`` are the
       recent context already, so not eligible), put before the clean context: the
       denoiser's memory prior falls back on the last context frame;
    3. Plücker rays at latent size of the targets and of that context.

  Args:
    memory_cfg: the memory's settings (image and latent geometry).
    memory: (T, h, w, C) static memory read into the targets; coverage (T, h, w) bool.
    K: (T, 3, 3) image intrinsics of the targets; c2w (T, 4, 4).
    context: (Nc, h, w, C) clean latents with cameras context_K (Nc, 3, 3), context_c2w
      (Nc, 4, 4).
    objects: ``memory.objects.ObjectState`` or None; frame_index (T,) int32 the targets'
      frames (with objects).
    bank: the reference bank (``frame_bank`` state) when ``num_references`` > 0; start ()
      int32 the first target frame (may be traced).
    target_rays, context_rays: the rays of the targets (T, h, w, 6) and of the context
      (Nc, h, w, 6) when the caller has them (training computes a window's rays in one batched
      call; computing them here per clip can round differently in the last bit).
  Returns:
    cond: memory (T, h, w, C) float32, coverage (T, h, w) float32, rays (T, h, w, 6),
      context (k + Nc, h, w, C), context_rays (k + Nc, h, w, 6) (k = ``num_references``);
    info: coverage (T, h, w) bool (objects included), references (k,) int32 the frame of
      each reference (-1 where none passed and the newest banked frame stood in).
  """
  if objects is not None:
    memory, coverage = splat_objects(objects, memory, coverage, K, c2w, frame_index)
  references = jnp.zeros((0,), jnp.int32)
  if num_references:  # references first: memory_prior falls back on the last context frame
    eligible = bank.frame < start - num_context
    ref_lat, ref_K, ref_c2w, slots, found = memory_lib.references.retrieve_references(
        bank, eligible, K, c2w, num_references)
    references = jnp.where(found, bank.frame[slots], -1)
  rays = lambda K, c2w: geometry.plucker_rays(
      memory_lib.splatting.latent_intrinsics(memory_cfg, K), c2w, memory_cfg.latent_height,
      memory_cfg.latent_width)
  if context_rays is None:
    context_rays = rays(context_K, context_c2w)
  if target_rays is None:
    target_rays = rays(K, c2w)
  if num_references:
    context = jnp.concatenate([ref_lat.astype(context.dtype), context], 0)
    context_rays = jnp.concatenate([rays(ref_K, ref_c2w), context_rays], 0)
  cond = dict(memory=memory.astype(jnp.float32), coverage=coverage.astype(jnp.float32),
              rays=target_rays, context=context, context_rays=context_rays)
  return cond, dict(coverage=coverage, references=references)


def sample(model, prediction: str, cond, noise, sampler, guidance_scale=None):
  """Latents of a chunk from ``noise`` (B, T, h, w, C) at t = 1, conditioned on ``cond``
  (:func:`dit_inputs`' with a leading batch axis), by ``sampler``'s method, steps and shift;
  with ``guidance_scale``, classifier-free guidance against the memory-free branch.
  Returns (B, T, h, w, C)."""

  def velocity(x, t, conditioned=True):
    m, c = ((cond["memory"], cond["coverage"]) if conditioned else
            (jnp.zeros_like(cond["memory"]), jnp.zeros_like(cond["coverage"])))
    tt = jnp.full(x.shape[:2], t, jnp.float32)
    return denoiser.predict(model, prediction, x, tt, cond["rays"], m, c, cond["context"],
                            cond["context_rays"])[0]

  return diffusion.sample(velocity, noise, int(sampler.num_steps), sampler.method,
                          float(sampler.shift), guidance_scale)


def anchor_depth(depth, memory_depth, coverage, *, rescale: bool = True,
                 min_cells: int = 8):
  """Generated depth tied to the memory's geometry where the memory covers the frame.

  Covered cells take the memory's depth (what the cache already holds there, instead of a
  regenerated estimate that drifts); with ``rescale``, the rest of each frame is the
  generated depth times the frame's median ratio memory / generated over its covered cells,
  so newly seen content is written at the memory's scale (unchanged for a frame with fewer
  than ``min_cells`` covered cells).

  Args:
    depth: (F, H, W) generated z-depth at image resolution, H = s * h, W = s * w.
    memory_depth: (F, h, w) the memory read's depth (0 where empty).
    coverage: (F, h, w) bool cells the memory covers.
  Returns:
    (F, H, W) float32 depth.
  """
  f, H, W = depth.shape
  _, h, w = coverage.shape
  sy, sx = H // h, W // w
  gen = memory_lib.splatting.depth_at(depth.astype(jnp.float32), h, w)
  ok = coverage & (memory_depth > 0) & (gen > 0)
  up = lambda x: jnp.repeat(jnp.repeat(x, sy, 1), sx, 2)
  out = depth.astype(jnp.float32)
  if rescale:
    scale, _ = depth_align.median_scale(out, memory_depth, coverage, min_cells=min_cells)
    out = out * scale[:, None, None]
  return jnp.where(up(ok), up(memory_depth.astype(jnp.float32)), out)


@dataclasses.dataclass(frozen=True)
class ReferenceSettings:
  """``config.denoiser``'s reference-frame fields (see experiments/common.py).

  Attributes:
    frames: k retrieved references put before the last frames in the context (0 = off).
    bank: rollout's ring-buffer capacity in frames.
    stride: rollout banks every ``stride``-th frame of each chunk.
  """
  frames: int
  bank: int
  stride: int


def reference_settings(config: ml_collections.ConfigDict) -> ReferenceSettings:
  """The reference fields of ``config.denoiser``, checked.

  Exports made before these fields existed read as "off" (:func:`upgrade`), which is how
  those models were trained.
  """
  d = upgrade(config).denoiser
  r = ReferenceSettings(int(d.reference_frames), int(d.reference_bank),
                        int(d.reference_stride))
  if r.frames < 0:
    raise InputError("config.denoiser", "reference_frames", f"must be >= 0, got {r.frames}")
  if r.frames and r.bank < r.frames:
    raise InputError("config.denoiser", "reference_bank",
                     f"must be >= reference_frames ({r.frames}), got {r.bank}")
  if not 1 <= r.stride <= int(d.target_frames):
    raise InputError("config.denoiser", "reference_stride",
                     f"must be in [1, target_frames = {d.target_frames}], got {r.stride}")
  return r
