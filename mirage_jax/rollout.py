"""Chunked generation: first frame + camera trajectory -> RGB-D frames.

Per chunk of ``target_frames`` cameras, ONE jitted call (:meth:`Rollout._chunk_impl`, static
shapes, so a trajectory of any length reuses the same compiled step; nothing syncs with the
host inside it):

  1. read     the memory into the chunk's cameras -> projected latents + coverage;
  2. denoise  from noise with the DiT, conditioned on memory, Plücker rays and clean context
              (t = 0): ``reference_frames`` earlier latents retrieved by voxel IoU (the
              reference's rule, :func:`retrieve_references`), then the last
              ``context_frames`` generated latents; then decode RGB-D;
  3. write    the new latents back into memory with the *generated* depth (no external depth
              model; with ``config.memory.depth_from_memory``, tied to the memory's depth
              where the read covers, :func:`anchor_depth`), leaving out cells the
              autoencoder's dynamic head marks as moving, and into the reference bank.

Moving content (``mask_dynamic``, ``object_slots``; defaults per backend in
``config.memory.mask_dynamic`` and ``config.objects.backends``): cells predicted as moving
never enter the static memory, so no ghost stays where an object used to be. With object
slots (``memory/objects.py``) the moving cells of the given frames (frame 0, oracle frames)
open and update per-object slots (appearance + position + velocity, matched across chunks)
and generated frames move matched tracks on; before each chunk the slots are advanced to
the chunk's frames and splatted into its cameras on top of the static memory read, so the
denoiser sees where each object will be, in or out of the earlier views. The reference's
released inference does neither: its ``mirage`` cache keeps whatever was generated, moving
objects included.

The reference bank is a fixed-capacity ring buffer of past latent frames (the ``frame_bank``
backend's state, ``reference_bank`` frames, every ``reference_stride``-th frame of each
chunk), so memory and retrieval cost per chunk do not grow with the trajectory.

Batching (:meth:`Rollout.generate_batch`): the chunk step is vmapped over trajectories and
the trajectory axis is sharded over the mesh's batch axes (``data``, ``fsdp``); trajectories
of different lengths are padded to the longest and a chunk past a trajectory's end changes
nothing of its state (its outputs are dropped). Timing is its own mode (``timed``, the
scaling benchmark): only then does the driver block after every chunk.

The memory backend (``voxel`` ours, ``mirage`` the reference's append-only cloud, the
baselines) is chosen by name; training builds its conditioning with the same
``memory_config`` + write/read and the same reference retrieval (``train.DenoiserStage``),
so the model is trained as it is run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from mirage_jax import diffusion, geometry, sharding
from mirage_jax import memory as memory_lib
from mirage_jax.errors import InputError
from mirage_jax.memory import objects as objects_lib
from mirage_jax.families.small import autoencoder
from mirage_jax.families.small import denoiser


def model_family(config: ml_collections.ConfigDict) -> str:
  """'wan' (Wan2.2 DiT + VACE + Wan VAE, ``mirage_jax/families/wan/rollout.py``) or 'small' (ours),
  from ``config.denoiser.model.family`` (configs without the field are the small family)."""
  return config.denoiser.model.get("family", "small")


def memory_config(config: ml_collections.ConfigDict, **overrides) -> memory_lib.MemoryConfig:
  """The memory settings of ``config`` at the model's image and latent resolution."""
  if model_family(config) == "wan":
    from mirage_jax.families.wan import rollout as wan_rollout  # pylint: disable=g-import-not-at-top
    return wan_rollout.memory_config(config, **overrides)
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
    ratio = jnp.nanmedian(jnp.where(ok, memory_depth / jnp.where(ok, gen, 1.0), jnp.nan), axis=(1, 2))
    enough = ok.sum(axis=(1, 2)) >= min_cells
    out = out * jnp.where(enough, ratio, 1.0)[:, None, None]
  return jnp.where(up(ok), up(memory_depth.astype(jnp.float32)), out)


def load_world_model(denoiser_export: str, autoencoder_export: str | None = None
                     ) -> tuple[ml_collections.ConfigDict, nnx.Module, nnx.Module]:
  """(config, autoencoder, denoiser) of a denoiser export (``python -m mirage_jax.export``).

  The autoencoder comes from ``autoencoder_export`` or else from the path the denoiser was
  trained with (``config.denoiser.autoencoder_checkpoint``). The export's config picks the
  family (:func:`model_family`): a Wan-family export (``python -m mirage_jax.convert_wan``)
  gives (config, WanVAE, WanDiT), to be run by :func:`make_rollout`.
  """
  from mirage_jax import export  # pylint: disable=g-import-not-at-top
  config = export_config(denoiser_export)
  if config.stage != "denoiser":
    raise InputError(denoiser_export, "stage", f"expected a denoiser export, got {config.stage!r}")
  if model_family(config) == "wan":
    from mirage_jax.families.wan import rollout as wan_rollout  # pylint: disable=g-import-not-at-top
    return wan_rollout.load_wan_world_model(denoiser_export, autoencoder_export)
  dn, config = export.load_model(denoiser_export)
  ae_path = autoencoder_export or config.denoiser.autoencoder_checkpoint
  ae_family = export_config(ae_path).autoencoder.get("family", "small")
  if ae_family != "small":
    raise InputError(ae_path, "autoencoder.family", f"the denoiser {denoiser_export} is of the "
                     f"small family and needs its RGB-D autoencoder, this export is {ae_family!r}")
  ae, ae_config = export.load_model(ae_path)
  if ae_config.stage != "autoencoder" or ae_config.autoencoder.to_dict() != config.autoencoder.to_dict():
    raise InputError(ae_path, "autoencoder", "not the autoencoder this denoiser was trained with")
  return config, ae, dn


def export_config(path: str) -> ml_collections.ConfigDict:
  """The training config of an export (its ``config.json``), without loading the params."""
  import json  # pylint: disable=g-import-not-at-top
  from mirage_jax import paths  # pylint: disable=g-import-not-at-top
  meta_path = paths.join(path, "config.json")
  if not paths.isfile(meta_path):
    raise InputError(path, "config.json", "not an export directory (missing config.json)")
  try:
    with paths.open(meta_path) as f:
      return ml_collections.ConfigDict(json.load(f)["config"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise InputError(meta_path, "config", f"unreadable ({e})") from None


def make_rollout(config: ml_collections.ConfigDict, ae: nnx.Module, dn: nnx.Module,
                 backend: str | None = None, *, wan_options: dict | None = None, **kwargs):
  """The rollout of the export's family: :class:`Rollout` (small) or
  ``wan_rollout.WanRollout`` (Wan; ``wan_options``: text, empty_text, guidance_scale).

  ``kwargs`` are the memory overrides and, for the small family, mask_dynamic/object_slots.
  Asking the Wan family for moving-content handling is refused (it has none yet), and so is
  guidance for a model trained without conditioning dropout (:func:`check_guidance`).
  """
  check_guidance(config, (wan_options or {}).get("guidance_scale")
                 if model_family(config) == "wan" else None)
  if model_family(config) == "wan":
    from mirage_jax.families.wan import rollout as wan_rollout  # pylint: disable=g-import-not-at-top
    for flag in ("mask_dynamic", "object_slots"):
      if kwargs.pop(flag, None):
        raise InputError(f"--{flag}", flag, "the Wan family does not handle moving content yet")
    return wan_rollout.WanRollout(config, ae, dn, backend, **(wan_options or {}), **kwargs)
  if wan_options and any(v is not None for v in wan_options.values()):
    given = next(k for k, v in wan_options.items() if v is not None)
    raise InputError(f"--{_WAN_FLAGS.get(given, given)}", _WAN_FLAGS.get(given, given),
                     "only the Wan family takes it; this export is of the small family")
  return Rollout(config, ae, dn, backend, **kwargs)


def check_guidance(config: ml_collections.ConfigDict, scale: float | None = None) -> None:
  """Refuses classifier-free guidance when training never trained its unconditional branch.

  ``scale``: the ``--guidance_scale`` flag, or None for the export's
  ``config.sampler.guidance_scale``. The small family's unconditional branch (no memory) is
  trained by ``denoiser.cond_dropout`` > 0; a Wan fine-tune's (the empty prompt) by
  ``denoiser.caption_dropout`` > 0 (a converted base, without that field, keeps the released
  model's own training).
  """
  flag = "--guidance_scale" if scale is not None else "config.sampler.guidance_scale"
  scale = float(config.sampler.get("guidance_scale", 0.0) if scale is None else scale)
  if scale <= 0:
    return
  d = config.denoiser
  field = "caption_dropout" if model_family(config) == "wan" else "cond_dropout"
  if model_family(config) == "wan" and field not in d:
    return
  if float(d.get(field, 0.0)) <= 0:
    raise InputError(flag, "guidance_scale", f"{scale} needs an unconditional branch, and "
                     f"this model was trained without one (config.denoiser.{field} = 0); "
                     f"sample without guidance or train with {field} > 0")


# The command-line flag of each Wan option (for the errors of make_rollout).
_WAN_FLAGS = {"text": "caption_embedding", "empty_text": "empty_text_embedding",
              "guidance_scale": "guidance_scale"}


# ----------------------------------------------------------------------------- reference frames


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

  Exports made before these fields existed lack them: they read as "off", which is how
  those models were trained.
  """
  d = config.denoiser
  r = ReferenceSettings(int(d.get("reference_frames", 0)), int(d.get("reference_bank", 1)),
                        int(d.get("reference_stride", 1)))
  if r.frames < 0:
    raise InputError("config.denoiser", "reference_frames", f"must be >= 0, got {r.frames}")
  if r.frames and r.bank < r.frames:
    raise InputError("config.denoiser", "reference_bank",
                     f"must be >= reference_frames ({r.frames}), got {r.bank}")
  if not 1 <= r.stride <= int(d.target_frames):
    raise InputError("config.denoiser", "reference_stride",
                     f"must be in [1, target_frames = {d.target_frames}], got {r.stride}")
  return r


def reference_bank_init(cfg: memory_lib.MemoryConfig, capacity: int):
  """Empty bank of ``capacity`` latent frames (a ``frame_bank`` state; write with
  ``memory.frame_bank.write``)."""
  return memory_lib.frame_bank.init(dataclasses.replace(cfg, capacity=capacity))


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
  K_lat = memory_lib.splatting.latent_intrinsics(cfg, target_K)
  seen = jax.vmap(lambda K1, c1: memory_lib.retrieval.visible_points(
      flat_p, flat_v, K1, c1, h, w, cfg.near))(K_lat, target_c2w).any(0)
  ids = jnp.where(eligible & bank.valid, jnp.arange(s, dtype=jnp.int32), -1)
  picks, _ = memory_lib.retrieval.select_reference_frames(flat_p, seen, points, valid, ids, k=k)
  found = picks >= 0
  newest = jnp.argmax(jnp.where(bank.valid, bank.frame, -1)).astype(jnp.int32)
  slots = jnp.where(found, picks, newest)
  K_img = geometry.scale_intrinsics(bank.intrinsics[slots], cfg.image_width / cfg.latent_width,
                                    cfg.image_height / cfg.latent_height)
  return bank.latents[slots].astype(jnp.float32), K_img, bank.c2w[slots], slots, found


@dataclasses.dataclass
class ChunkTiming:
  memory_seconds: float  # read + write
  chunk_seconds: float  # read + denoise + decode + write
  cache_bytes: int


class Rollout:
  """Generates along trajectories with one autoencoder, one denoiser and one memory backend.

  Args:
    config: the denoiser's training config (sizes, sampler, memory settings).
    ae: the trained autoencoder. dn: the trained denoiser.
    backend: memory backend name (default ``config.memory.backend``).
    mask_dynamic: keep cells the autoencoder's dynamic head marks as moving out of the
      static memory (default: the backend is in ``config.memory.mask_dynamic``); needs a
      model with the head.
    object_slots: carry moving content in object slots (default: the backend is in
      ``config.objects.backends``); implies ``mask_dynamic``.
    memory_overrides: fields of ``MemoryConfig`` to change (e.g. ``capacity``).
  """

  def __init__(self, config: ml_collections.ConfigDict, ae: nnx.Module, dn: nnx.Module,
               backend: str | None = None, *, mask_dynamic: bool | None = None,
               object_slots: bool | None = None, **memory_overrides):
    if model_family(config) != "small":
      raise InputError("config.denoiser.model", "family", f"{model_family(config)!r} exports run "
                       "through rollout.make_rollout (Rollout is the small family's)")
    self.config = config
    d = config.denoiser
    self.chunk = int(d.target_frames)
    self.num_context = int(d.context_frames)
    self.latent_scale = float(d.latent_scale)
    self.sampler = config.sampler
    # Exports made before `sampler.reencode_latents` existed used the sampled latents.
    self.reencode = bool(config.sampler.get("reencode_latents", False))
    self.prediction = d.prediction
    if self.prediction == "x0_prior" and self.sampler.method != "euler":
      raise InputError("config.sampler", "method", "prediction='x0_prior' samples with 'euler' "
                       f"(its velocity is undefined at t = 0), got {self.sampler.method!r}")
    self.backend_name = backend or config.memory.backend
    # Exports made before `memory.write_new_only` existed wrote everything.
    self.write_new_only = self.backend_name in config.memory.get("write_new_only", ())
    self.memory_cfg = memory_config(config, **memory_overrides)
    # Exports made before `memory.depth_from_memory` existed used the generated depth.
    self.depth_from_memory = self.backend_name in config.memory.get("depth_from_memory", ())
    self.depth_rescale = bool(config.memory.get("depth_from_memory_rescale", True))
    if self.depth_from_memory and self.backend_name != "voxel":
      raise InputError("config.memory", "depth_from_memory", f"the {self.backend_name!r} backend "
                       "reads no depth; only 'voxel' takes its depth from the memory")
    # Exports made before moving content was handled lack these fields: off, as trained.
    objects_cfg = config.get("objects")
    if object_slots is None:
      object_slots = objects_cfg is not None and self.backend_name in objects_cfg.backends
    if mask_dynamic is None:
      mask_dynamic = object_slots or self.backend_name in config.memory.get("mask_dynamic", ())
    if (mask_dynamic or object_slots) and not ae.has_dynamic_head:
      raise InputError("generate", "mask_dynamic", "the autoencoder has no dynamic head "
                       "(config.autoencoder.dynamic_head_width = 0): cannot tell moving content")
    self.mask_dynamic, self.object_slots = bool(mask_dynamic or object_slots), bool(object_slots)
    self.dynamic_threshold = float(config.memory.get("dynamic_threshold", 0.5))
    self.object_cfg = object_config(config) if self.object_slots else None
    self.image_hw = (self.memory_cfg.image_height, self.memory_cfg.image_width)
    self.latent_hw = (self.memory_cfg.latent_height, self.memory_cfg.latent_width)
    self.ae_graphdef, self.ae_state = nnx.split(ae)
    self.dn_graphdef, self.dn_state = nnx.split(dn)
    self.backend = memory_lib.get_backend(self.backend_name, encode_fn=self._encode_rgb)
    self.refs = reference_settings(config)
    self._per_mesh: dict[Mesh, dict[str, Any]] = {}  # jitted functions (see _functions)

  # --------------------------------------------------------------------------- pieces

  def _encode_impl(self, ae_state, frames, depths):
    """frames (F, H, W, 3) in [-1, 1], depths (F, H, W) -> scaled latents (F, h, w, C)."""
    ae = nnx.merge(self.ae_graphdef, ae_state)
    mean, _ = ae.encode(frames, depths)
    return mean * self.latent_scale

  def _dynamic_impl(self, ae_state, latents):
    """Scaled latents (F, h, w, C) -> probability (F, h, w) that a cell shows moving content
    (zeros for a model without the dynamic head)."""
    ae = nnx.merge(self.ae_graphdef, ae_state)
    if not ae.has_dynamic_head:
      return jnp.zeros(latents.shape[:3], jnp.float32)
    return jax.nn.sigmoid(ae.dynamic_logits(latents / self.latent_scale))

  def _render_objects_impl(self, objects, memory, coverage, K, c2w, frame_index):
    """Object slots advanced to ``frame_index`` (T,) and splatted over the static read.

    Args:
      memory: (T, h, w, C) static read; coverage (T, h, w) bool. K (T, 3, 3), c2w (T, 4, 4).
    Returns:
      memory (T, h, w, C), coverage (T, h, w) (:func:`splat_objects`); positions (T, S, 3)
      and idents (T, S) of the slots at each frame (-1 = empty).
    """
    memory, coverage = splat_objects(objects, memory, coverage, K, c2w, frame_index)
    positions = jax.vmap(lambda f: objects_lib.predict(objects, f))(frame_index)
    idents = jnp.broadcast_to(jnp.where(objects.valid, objects.ident, -1), positions.shape[:2])
    return memory, coverage, positions, idents

  def _encode_rgb(self, rgb01):
    """rgb_points' re-encoder: rendered rgb (F, H, W, 3) in [0, 1] -> latents (F, h, w, C).

    The RGB cloud carries no depth channel, so the encoder sees a constant 2 m depth: the
    baseline pays for re-encoding as Spatia/Voyager do, with the RGB content only.
    """
    depth = jnp.full(rgb01.shape[:-1], 2.0, jnp.float32)
    return self._encode_impl(self.ae_state, rgb01 * 2.0 - 1.0, depth)

  def _rays(self, K, c2w):
    """Image intrinsics (F, 3, 3), c2w (F, 4, 4) -> Plücker rays (F, h, w, 6) at latent size."""
    K_lat = memory_lib.splatting.latent_intrinsics(self.memory_cfg, K)
    return geometry.plucker_rays(K_lat, c2w, *self.latent_hw)

  def _retrieve_impl(self, bank, start, K, c2w):
    """References for the chunk starting at frame ``start`` () int32 (traced: no recompile).

    Frames ``>= start - context_frames`` are the recent context already, so not eligible.
    Returns latents (k, h, w, C), intrinsics (k, 3, 3), c2w (k, 4, 4), and frames (k,)
    int32 the frame index of each (-1 where none passed and the newest frame stands in).
    """
    eligible = bank.frame < start - self.num_context
    lat, ref_K, ref_c2w, slots, found = retrieve_references(bank, eligible, K, c2w,
                                                            self.refs.frames)
    return lat, ref_K, ref_c2w, jnp.where(found, bank.frame[slots], -1)

  def _denoise_impl(self, ae_state, dn_state, memory, coverage, K, c2w, context, context_K,
                    context_c2w, rng):
    """One chunk from noise.

    Args:
      memory: (T, h, w, C) read latents; coverage (T, h, w) bool.
      K, c2w: (T, 3, 3), (T, 4, 4) target cameras.
      context: (Nc, h, w, C) clean latents with cameras context_K (Nc, 3, 3), context_c2w.
    Returns:
      latents (T, h, w, C), rgb (T, H, W, 3) in [-1, 1], depth (T, H, W) metric.
    """
    dn = nnx.merge(self.dn_graphdef, dn_state)
    rays, ctx_rays = self._rays(K, c2w)[None], self._rays(context_K, context_c2w)[None]
    mem = memory.astype(jnp.float32)[None]
    cov = coverage.astype(jnp.float32)[None]

    def velocity(x, t, conditioned=True):
      m, c = (mem, cov) if conditioned else (jnp.zeros_like(mem), jnp.zeros_like(cov))
      tt = jnp.full(x.shape[:2], t, jnp.float32)
      return denoiser.predict(dn, self.prediction, x, tt, rays, m, c, context[None], ctx_rays)[0]

    noise = jax.random.normal(rng, (1,) + memory.shape, jnp.float32)
    s = self.sampler
    guidance = s.guidance_scale or None
    latents = diffusion.sample(velocity, noise, int(s.num_steps), s.method, float(s.shift),
                               guidance)[0]
    ae = nnx.merge(self.ae_graphdef, ae_state)
    rgb, depth = ae.decode(latents / self.latent_scale)
    return latents, rgb, depth

  # --------------------------------------------------------------------------- one chunk step

  def _start_impl(self, ae_state, state, frame0, depth0, K0, c2w0, rng):
    """Frame 0 of one trajectory into the memories: the carry of :meth:`_chunk_impl`.

    Args:
      state: the memory state frame 0 is written into (empty or pre-filled).
      frame0: (H, W, 3) in [-1, 1]. depth0: (H, W) metric. K0: (3, 3). c2w0: (4, 4).
      rng: (2,) uint32 key data of the trajectory's sampling key.
    Returns:
      carry: dict of memory, rng, ctx (Nc, h, w, C), ctx_K, ctx_c2w, and objects / bank
      when used; frame 0's outputs: rgb (1, H, W, 3), depth (1, H, W), coverage (1, h, w),
      dynamic (1, h, w), positions (1, S, 3), idents (1, S).
    """
    K, c2w, given = K0[None], c2w0[None], depth0[None]
    lat0 = self._encode_impl(ae_state, frame0[None], given)
    dyn0 = self._dynamic_impl(ae_state, lat0)
    static0 = (dyn0 < self.dynamic_threshold) | (not self.mask_dynamic)
    ids = jnp.zeros((1,), jnp.int32)
    carry = dict(memory=self.backend.write(state, lat0, given, K, c2w, static0, ids,
                                           rgb=(frame0[None] + 1.0) / 2.0), rng=rng)
    positions, idents = jnp.zeros((1, 0, 3), jnp.float32), jnp.zeros((1, 0), jnp.int32)
    if self.object_slots:
      objects = objects_lib.observe(objects_lib.init(self.object_cfg), lat0, given, K, c2w,
                                    ~static0, ids)
      positions = objects_lib.predict(objects, 0)[None]
      idents = jnp.where(objects.valid, objects.ident, -1)[None]
      carry["objects"] = objects
    if self.refs.frames:
      carry["bank"] = memory_lib.frame_bank.write(
          reference_bank_init(self.memory_cfg, self.refs.bank), lat0, given, K, c2w, static0, ids)
    # Context: the last generated latents; at the start, the first frame repeated.
    nc = self.num_context
    carry.update(ctx=jnp.repeat(lat0, nc, 0), ctx_K=jnp.repeat(K, nc, 0),
                 ctx_c2w=jnp.repeat(c2w, nc, 0))
    rgb0, d0 = nnx.merge(self.ae_graphdef, ae_state).decode(lat0 / self.latent_scale)
    return carry, dict(rgb=rgb0, depth=d0, coverage=jnp.ones_like(dyn0), dynamic=dyn0,
                       positions=positions, idents=idents)

  def _chunk_impl(self, ae_state, dn_state, carry, chunk, *, oracle: bool):
    """One chunk of one trajectory: read -> denoise (whole sampler) -> decode -> write.

    Args:
      carry: as :meth:`_start_impl` returns it.
      chunk: K (F, 3, 3), c2w (F, 4, 4), frame (F,) int32 frame indices (a short chunk is
        padded with its last camera), start () int32 first frame, real () int32 frames
        that exist (padded frames are never written; 0: the trajectory has ended, nothing
        changes). With ``oracle``: use (F,) bool frames written from ground truth, their
        o_lat (F, h, w, C), o_rgb (F, H, W, 3) in [-1, 1], o_depth (F, H, W), and given
        (F,) bool frames (a subset of use) that are also the next chunk's clean context.
      oracle: static; without it no frame is written from ground truth.
    Returns:
      the new carry; outputs: latents (F, h, w, C), rgb (F, H, W, 3) in [-1, 1], depth
      (F, H, W), coverage (F, h, w) bool, dynamic (F, h, w), positions (F, S, 3), idents
      (F, S), references (k,) frame index of each reference (-1 = fallback; k = 0 without).
    """
    Kc, c2wc, ids = chunk["K"], chunk["c2w"], chunk["frame"]
    real = (jnp.arange(self.chunk) < chunk["real"])[:, None, None]
    if self.depth_from_memory:
      mem, cov, mem_depth = self.backend.read(carry["memory"], Kc, c2wc, with_depth=True)
      static_cov = cov
    else:
      mem, cov = self.backend.read(carry["memory"], Kc, c2wc)
    positions = jnp.zeros((self.chunk, 0, 3), jnp.float32)
    idents = jnp.zeros((self.chunk, 0), jnp.int32)
    if self.object_slots:
      mem, cov, positions, idents = self._render_objects_impl(carry["objects"], mem, cov, Kc,
                                                              c2wc, ids)
    ctx, ctx_K, ctx_c2w = carry["ctx"], carry["ctx_K"], carry["ctx_c2w"]
    full = (ctx, ctx_K, ctx_c2w)
    ref_frames = jnp.zeros((0,), jnp.int32)
    if self.refs.frames:  # references first: memory_prior falls back on the last frame
      *refs, ref_frames = self._retrieve_impl(carry["bank"], chunk["start"], Kc, c2wc)
      full = tuple(jnp.concatenate([r, c], 0) for r, c in zip(refs, full))
    key, sub = jax.random.split(jax.random.wrap_key_data(carry["rng"]))
    lat, rgb, depth = self._denoise_impl(ae_state, dn_state, mem, cov, Kc, c2wc, *full, sub)
    if self.reencode:  # back onto the encoder's latents: off-manifold error stops compounding
      lat = self._encode_impl(ae_state, rgb, depth)
    if self.depth_from_memory:  # the static read's depth: object slots carry none
      depth = anchor_depth(depth, mem_depth, static_cov, rescale=self.depth_rescale)
    dyn = self._dynamic_impl(ae_state, lat)
    w_lat, w_rgb, w_depth, w_dyn = lat, rgb, depth, dyn
    if oracle:  # a chunk straddling N mixes the two
      use = chunk["use"]
      pick = lambda o, g: jnp.where(use.reshape((-1,) + (1,) * (o.ndim - 1)), o, g)
      w_lat, w_rgb, w_depth = (pick(chunk[k], g) for k, g in
                               (("o_lat", lat), ("o_rgb", rgb), ("o_depth", depth)))
      w_dyn = self._dynamic_impl(ae_state, w_lat)
    moving = (w_dyn >= self.dynamic_threshold) & real
    static = real & ~(moving & self.mask_dynamic)
    if self.write_new_only:
      # Covered cells were copied from memory: writing them back only adds drift (unless
      # the chunk is written from ground truth).
      static = static & (~cov | use.any()) if oracle else static & ~cov
    new = dict(carry, rng=jax.random.key_data(key), memory=self.backend.write(
        carry["memory"], w_lat, w_depth, Kc, c2wc, static, ids, rgb=(w_rgb + 1.0) / 2.0))
    if self.object_slots:
      observed = use if oracle else jnp.zeros((self.chunk,), bool)
      new["objects"] = objects_lib.observe(carry["objects"], w_lat, w_depth, Kc, c2wc, moving,
                                           ids, observed)
    if self.refs.frames:  # the last chunk's padded frames may enter; nothing reads them
      s = self.refs.stride
      new["bank"] = memory_lib.frame_bank.write(
          carry["bank"], w_lat[::s], w_depth[::s], Kc[::s], c2wc[::s], static[::s], ids[::s])
    if self.num_context:  # the last Nc of [context, the chunk's real frames]
      # Given frames (a protocol's context) are the clean context as encoded, not as generated.
      ctx_lat = jnp.where(chunk["given"][:, None, None, None], chunk["o_lat"], lat) if oracle else lat
      new.update((k, jax.lax.dynamic_slice_in_dim(jnp.concatenate([c, x], 0), chunk["real"],
                                                  self.num_context))
                 for k, c, x in (("ctx", ctx, ctx_lat), ("ctx_K", ctx_K, Kc), ("ctx_c2w", ctx_c2w, c2wc)))
    # A trajectory that has ended (shorter than others in its batch) keeps its state.
    active = chunk["real"] > 0
    new = jax.tree.map(lambda a, b: jnp.where(active, a, b), new, carry)
    return new, dict(latents=lat, rgb=rgb, depth=depth, coverage=cov, dynamic=dyn,
                     positions=positions, idents=idents, references=ref_frames)

  def _functions(self, mesh: Mesh) -> dict[str, Any]:
    """The jitted, trajectory-batched (vmapped) functions on ``mesh`` (built once per mesh).

    The trajectory axis is sharded over the mesh's batch axes (``data``, ``fsdp``), the
    parameters are replicated: trajectories are independent, so no collective runs.
    """
    if mesh not in self._per_mesh:
      rep, bat = NamedSharding(mesh, PartitionSpec()), batch_sharding(mesh)
      step = lambda oracle: jax.jit(
          jax.vmap(functools.partial(self._chunk_impl, oracle=oracle), in_axes=(None, None, 0, 0)),
          in_shardings=(rep, rep, bat, bat), out_shardings=bat)
      write = lambda s, lat, d, K, c2w, m, f, rgb: self.backend.write(s, lat, d, K, c2w, m, f, rgb=rgb)
      self._per_mesh[mesh] = dict(
          params=jax.device_put((self.ae_state, self.dn_state), rep),
          start=jax.jit(jax.vmap(self._start_impl, in_axes=(None,) + (0,) * 6),
                        in_shardings=(rep,) + (bat,) * 6, out_shardings=bat),
          step={False: step(False), True: step(True)},
          encode=jax.jit(jax.vmap(self._encode_impl, in_axes=(None, 0, 0)),
                         in_shardings=(rep, bat, bat), out_shardings=bat),
          # Timed runs only (the scaling benchmark): the memory's share of a chunk.
          read=jax.jit(jax.vmap(self.backend.read), in_shardings=bat, out_shardings=bat),
          write=jax.jit(jax.vmap(write), in_shardings=bat, out_shardings=bat))
    return self._per_mesh[mesh]

  # --------------------------------------------------------------------------- driver

  def generate(self, first_frame: np.ndarray, first_depth: np.ndarray, intrinsics: np.ndarray,
               poses_c2w: np.ndarray, *, seed: int = 0, progress: bool = True,
               oracle_frames: tuple[np.ndarray, np.ndarray] | None = None,
               initial_memory: Any = None, timed: bool = False) -> dict[str, Any]:
    """Generates frames 1..T-1 of a trajectory whose frame 0 is given.

    One trajectory of :meth:`generate_batch` (the same compiled chunk step, batch 1 on one
    device).

    With ``config.denoiser.reference_frames`` = k > 0 each chunk's context is k references
    retrieved from the reference bank, then the last ``context_frames`` latents.

    Args:
      first_frame: (H, W, 3) uint8 or float in [-1, 1].
      first_depth: (H, W) metric depth of the first frame (> 0).
      intrinsics: (T, 3, 3) at the model's image resolution. poses_c2w: (T, 4, 4) OpenCV.
      seed: sampling seed.
      oracle_frames: optional ground truth ``(frames (N, H, W, 3) uint8, depths (N, H, W))``,
        N <= T: frames ``< N`` are written to memory encoded from these (with their depth)
        instead of the generated ones (evaluation bounds); their encoding is outside the
        chunk step.
      initial_memory: optional memory state of this backend to start from instead of an
        empty one (the scaling benchmark pre-fills it); frame 0 is written into it.
      timed: block after every chunk and time it (the scaling benchmark); see
        :meth:`generate_batch`.
    Returns:
      dict with frames (T, H, W, 3) uint8 (frame 0 = the decoded first frame), depths
      (T, H, W) float32, coverage (T, h, w) float32 (memory coverage of each generated frame;
      frame 0: 1), chunk_seconds (wall seconds per chunk after the first, without a sync per
      chunk), timings: list of ChunkTiming (``timed`` only, else empty), cache_bytes (after
      the last chunk), reference_bytes (bytes of the frames in the reference bank after the
      last chunk; 0 without references), references (chunks, k) int32 the frame index of
      each chunk's retrieved references (-1: none passed, the newest banked frame was used;
      k = 0 without references), dynamic (T, h, w) float32 the dynamic head's probability
      that a cell moves (zeros for a model without the head; computed with or without
      ``mask_dynamic``, which only decides what is written), object_positions (T, S, 3)
      float32 and object_idents (T, S) int32 (-1 = empty) the slots at each frame, as the
      chunk's conditioning saw them (S = 0 without object slots), object_bytes (the slots'
      state).
    """
    return self.generate_batch([first_frame], [first_depth], [intrinsics], [poses_c2w],
                               seeds=[seed], progress=progress, oracle_frames=[oracle_frames],
                               initial_memory=initial_memory, timed=timed)[0]

  def _check_trajectory(self, where: str, first_frame, first_depth, intrinsics, poses_c2w,
                        oracle_frames) -> None:
    h, w = self.image_hw
    T = poses_c2w.shape[0]
    if first_frame.shape[:2] != (h, w) or first_depth.shape != (h, w):
      raise InputError(where, "first_frame", f"expected ({h}, {w}) to match the model, got "
                       f"{first_frame.shape[:2]} and depth {first_depth.shape}")
    if intrinsics.shape != (T, 3, 3):
      raise InputError(where, "intrinsics", f"expected ({T}, 3, 3), got {intrinsics.shape}")
    geometry.check_poses(poses_c2w, where)
    if oracle_frames is not None:
      gt_rgb, gt_depth = (np.asarray(a) for a in oracle_frames)
      if gt_rgb.shape[1:] != (h, w, 3) or gt_depth.shape != gt_rgb.shape[:3] or len(gt_rgb) > T:
        raise InputError(where, "oracle_frames", f"expected (N <= {T}, {h}, {w}, 3) frames and "
                         f"(N, {h}, {w}) depths, got {gt_rgb.shape} and {gt_depth.shape}")

  def generate_batch(self, first_frames, first_depths, intrinsics, poses_c2w, *,
                     seeds: int | list[int] = 0, progress: bool = True, oracle_frames=None,
                     initial_memory: Any = None, mesh: Mesh | None = None,
                     timed: bool = False, given_frames=None) -> list[dict[str, Any]]:
    """Generates B trajectories at once: the chunk step vmapped over them, sharded on a mesh.

    Per chunk, ONE jitted call advances every trajectory (memory read, the whole sampler,
    decode, memory write) with no host sync inside. Trajectories of different lengths are
    padded to the longest: a chunk past a trajectory's end changes nothing of its state and
    its outputs are dropped, so results do not depend on the batch (up to float32 rounding)
    and a batch of any lengths reuses the same compiled step.

    Args:
      first_frames: B arrays (H, W, 3) uint8 or float in [-1, 1]. first_depths: B (H, W).
      intrinsics: B arrays (T_b, 3, 3). poses_c2w: B arrays (T_b, 4, 4).
      seeds: the sampling seed of each trajectory (an int: the same for all).
      oracle_frames: None, or B entries each None or ``(frames (N_b, H, W, 3) uint8,
        depths (N_b, H, W))`` (see :meth:`generate`).
      given_frames: None, or B ints G_b <= N_b: frames ``< G_b`` are *given* (a protocol's
        context): besides memory, they are the clean context of the chunks after them, as
        encoded from ``oracle_frames`` (otherwise the context is always the generated latents).
      initial_memory: one memory state every trajectory starts from (see :meth:`generate`).
      mesh: the trajectory axis is sharded over its batch axes (``data``, ``fsdp``; padded
        with empty trajectories to a multiple of their size); default: a ``data`` mesh of
        min(B, local devices) local devices (:func:`trajectory_mesh`).
      timed: block after every chunk step and time it, then time the backend's read + write
        of the chunk separately on the same state (the scaling benchmark): ``timings``.
        Otherwise nothing blocks before the last chunk but one sync after the first chunk
        (compilation), which ``chunk_seconds`` starts from.
    Returns:
      B dicts as :meth:`generate` returns.
    """
    B = len(poses_c2w)
    seeds = [int(seeds)] * B if np.isscalar(seeds) else [int(s) for s in seeds]
    oracle_frames = [None] * B if oracle_frames is None else list(oracle_frames)
    if not (len(first_frames) == len(first_depths) == len(intrinsics) == len(seeds)
            == len(oracle_frames) == B >= 1):
      raise InputError("generate", "trajectories", "need as many first frames, depths, "
                       "intrinsics, poses, seeds and oracle entries (at least one)")
    frames0, depths0, Ks, poses = [], [], [], []
    for b in range(B):
      self._check_trajectory("generate" if B == 1 else f"generate[{b}]", first_frames[b],
                             first_depths[b], intrinsics[b], poses_c2w[b], oracle_frames[b])
      f0 = np.asarray(first_frames[b])
      frames0.append(f0.astype(np.float32) / 127.5 - 1.0 if f0.dtype == np.uint8 else f0)
      depths0.append(np.asarray(first_depths[b], np.float32))
      Ks.append(np.asarray(intrinsics[b], np.float32))
      poses.append(np.asarray(poses_c2w[b], np.float32))
    lengths = np.array([len(p) for p in poses])
    gts = [None if o is None else tuple(np.asarray(a) for a in o) for o in oracle_frames]
    given = np.array([0 if g is None else len(g[0]) for g in gts])
    ctx_given = np.zeros(B, int) if given_frames is None else np.asarray(given_frames, int)
    if ctx_given.shape != (B,) or (ctx_given < 0).any() or (ctx_given > given).any():
      raise InputError("generate", "given_frames", f"expected {B} counts in [0, oracle "
                       f"frames {given.tolist()}], got {given_frames!r}")

    mesh = trajectory_mesh(B) if mesh is None else mesh
    shards = batch_shards(mesh)
    pad = -B % shards  # empty trajectories: length 1, so every chunk of theirs is inactive
    order = list(range(B)) + [0] * pad
    lengths = np.concatenate([lengths, np.ones(pad, int)])
    given = np.concatenate([given, np.zeros(pad, int)])
    ctx_given = np.concatenate([ctx_given, np.zeros(pad, int)])
    fns = self._functions(mesh)
    bat = batch_sharding(mesh)
    put = lambda x: jax.device_put(x, bat)
    ae_state, dn_state = fns["params"]
    F, T_max, Bp = self.chunk, int(lengths.max()), B + pad

    if initial_memory is None:
      state = memory_lib.init_batch(self.backend, self.memory_cfg, Bp)
    else:
      state = jax.tree.map(lambda x: jnp.broadcast_to(x, (Bp,) + x.shape), initial_memory)
    keys = np.stack([np.asarray(jax.random.key_data(jax.random.key(seeds[b]))) for b in order])
    carry, first = fns["start"](
        ae_state, put(state), put(np.stack([frames0[b] for b in order])),
        put(np.stack([depths0[b] for b in order])), put(np.stack([Ks[b][0] for b in order])),
        put(np.stack([poses[b][0] for b in order])), put(keys))

    has_oracle = bool(given.any())
    starts = list(range(1, T_max, F))
    outs, timings, real_counts = [], [[] for _ in range(Bp)], []
    t_first = t_start = time.perf_counter()
    for c, start in enumerate(tqdm(starts, desc=f"generate [{self.backend_name}] x{B}",
                                   disable=not progress, unit="chunk")):
      # Pad each trajectory's chunk with its last camera; padded frames are never written.
      idx = np.minimum(start + np.arange(F)[None], lengths[:, None] - 1)  # (Bp, F)
      real = np.clip(lengths - start, 0, F)
      chunk = dict(K=np.stack([Ks[b][i] for b, i in zip(order, idx)]),
                   c2w=np.stack([poses[b][i] for b, i in zip(order, idx)]),
                   frame=idx.astype(np.int32), start=np.full((Bp,), start, np.int32),
                   real=real.astype(np.int32))
      if has_oracle:
        chunk.update(self._oracle_chunk(fns, ae_state, gts, order, idx, given, put))
        chunk["given"] = idx < ctx_given[:, None]
      chunk = {k: put(v) for k, v in chunk.items()}
      carry, out, synced = run_chunk_step(
          functools.partial(fns["step"][has_oracle], ae_state, dn_state), carry, chunk,
          timed=timed, first=c == 0, timings=timings, nbytes=self.backend.nbytes,
          time_memory=functools.partial(self._time_memory, fns))
      t_first = synced or t_first
      outs.append(out)
      real_counts.append(real)
    first, outs, carry = jax.device_get((first, outs, carry))
    t_end = time.perf_counter()
    steady = (t_end - t_first) / (len(starts) - 1) if len(starts) > 1 else t_end - t_start

    results = []
    for b in range(B):
      take = lambda x, b=b: x[b]
      keep = [(o, n[b]) for o, n in zip(outs, real_counts) if n[b] > 0]
      cat = lambda k, dtype, b=b, keep=keep: np.concatenate(
          [first[k][b]] + [o[k][b][:n] for o, n in keep], 0).astype(dtype)
      rgb_all = cat("rgb", np.float32)
      objects = jax.tree.map(take, carry["objects"]) if self.object_slots else None
      bank = jax.tree.map(take, carry["bank"]) if self.refs.frames else None
      refs = [o["references"][b] for o, _ in keep]
      results.append(dict(
          frames=np.round((np.clip(rgb_all, -1, 1) + 1.0) * 127.5).astype(np.uint8),
          depths=cat("depth", np.float32),
          coverage=cat("coverage", np.float32),
          timings=timings[b],
          chunk_seconds=float(steady),
          cache_bytes=int(self.backend.nbytes(jax.tree.map(take, carry["memory"]))),
          dynamic=cat("dynamic", np.float32),
          object_positions=cat("positions", np.float32),
          object_idents=cat("idents", np.int32),
          object_bytes=objects_lib.nbytes(objects) if objects is not None else 0,
          reference_bytes=0 if bank is None else memory_lib.frame_bank.nbytes(bank),
          references=(np.stack(refs) if refs else np.zeros((0, self.refs.frames))).astype(np.int32),
      ))
    return results

  def _oracle_chunk(self, fns, ae_state, gts, order, idx, given, put) -> dict[str, np.ndarray]:
    """The ground-truth inputs of a chunk: use (Bp, F), o_lat, o_rgb, o_depth (encoded here,
    outside the step; zeros when no trajectory takes ground truth in this chunk)."""
    h, w = self.image_hw
    lh, lw = self.latent_hw
    Bp, F = idx.shape
    use = idx < given[:, None]
    o_rgb = np.zeros((Bp, F, h, w, 3), np.float32)
    o_depth = np.ones((Bp, F, h, w), np.float32)
    for row, b in enumerate(order):
      if given[row] and use[row].any():  # padded with the last ground-truth frame
        gi = np.minimum(idx[row], given[row] - 1)
        o_rgb[row] = gts[b][0][gi].astype(np.float32) / 127.5 - 1.0
        o_depth[row] = gts[b][1][gi]
    if use.any():
      o_lat = fns["encode"](ae_state, put(o_rgb), put(o_depth))
    else:
      o_lat = np.zeros((Bp, F, lh, lw, self.memory_cfg.latent_channels), np.float32)
    return dict(use=use, o_lat=o_lat, o_rgb=o_rgb, o_depth=o_depth)

  def _time_memory(self, fns, state, chunk, out) -> float:
    """Seconds of the backend's read + write of one chunk on ``state`` (blocked; the chunk
    step fuses them with the denoiser, so they are timed again on their own)."""
    lat, depth = out["latents"], out["depth"]
    if "use" in chunk:  # what the step wrote: ground truth where given
      pick = lambda o, g: jnp.where(chunk["use"].reshape(chunk["use"].shape + (1,) * (o.ndim - 2)), o, g)
      lat, depth = pick(chunk["o_lat"], lat), pick(chunk["o_depth"], depth)
    static = jnp.broadcast_to((jnp.arange(self.chunk)[None] < chunk["real"][:, None])[..., None, None],
                              depth.shape)
    rgb = (out["rgb"] + 1.0) / 2.0
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    jax.block_until_ready(fns["read"](state, chunk["K"], chunk["c2w"]))
    jax.block_until_ready(fns["write"](state, lat, depth, chunk["K"], chunk["c2w"], static,
                                       chunk["frame"], rgb))
    return time.perf_counter() - t0


def run_chunk_step(step, carry, chunk, *, timed: bool, first: bool, timings, nbytes,
                   time_memory):
  """One chunk step of a trajectory batch, as both families' ``generate_batch`` run it.

  Args:
    step: ``(carry, chunk) -> (carry, out)``, the jitted batched chunk step (its params
      bound); ``out`` holds ``latents`` (dropped here: only the timing needs them).
    timed: block before and after the step and time it, then ``time_memory(pre-step
      memory, chunk, out)`` (the backend's read + write alone); append a ``ChunkTiming``
      per trajectory to ``timings`` (cache bytes by ``nbytes`` of its memory).
    first: the first chunk of the batch: untimed runs block once after it (compilation)
      and nowhere else.
  Returns:
    (carry, out, the time of that one sync or None).
  """
  pre, synced = carry["memory"], None
  if timed:
    jax.block_until_ready(carry)
    t0 = time.perf_counter()
  carry, out = step(carry, chunk)
  if timed:
    jax.block_until_ready((carry, out))
    chunk_seconds = time.perf_counter() - t0
    memory_seconds = time_memory(pre, chunk, out)
    per_traj = jax.device_get(carry["memory"])
    for b, row in enumerate(timings):
      row.append(ChunkTiming(memory_seconds, chunk_seconds,
                             int(nbytes(jax.tree.map(lambda x, b=b: x[b], per_traj)))))
  elif first:  # one sync: the first chunk compiles, the others are timed together
    jax.block_until_ready(carry)
    synced = time.perf_counter()
  out.pop("latents")
  return carry, out, synced


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (trajectory) axis over the mesh's batch axes (the ``batch`` logical rule)."""
  return NamedSharding(mesh, PartitionSpec(sharding.logical_to_spec(("batch",), None, mesh)[0]))


def batch_shards(mesh: Mesh) -> int:
  """How many ways :func:`batch_sharding` splits the trajectory axis."""
  axes = sharding.logical_to_spec(("batch",), None, mesh)[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def trajectory_mesh(batch: int, devices=None) -> Mesh:
  """A ``data`` mesh of min(batch, len(devices)) devices (default: this process's own).

  Trajectories are independent, so a process batches its own over its own devices; several
  processes split the trajectories between them (``mirage_jax.evaluate``).
  """
  devices = list(jax.local_devices() if devices is None else devices)
  n = max(1, min(int(batch), len(devices)))
  return sharding.make_mesh({"data": n}, devices[:n], where="trajectory batch")
