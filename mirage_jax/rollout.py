"""Chunked generation: first frame + camera trajectory -> RGB-D frames.

Per chunk of ``target_frames`` cameras (static shapes, so a trajectory of any length reuses
the same three compiled functions):

  1. read     the memory into the chunk's cameras -> projected latents + coverage;
  2. denoise  from noise with the DiT, conditioned on memory, Plücker rays and clean context
              (t = 0): ``reference_frames`` earlier latents retrieved by voxel IoU (the
              reference's rule, :func:`retrieve_references`), then the last
              ``context_frames`` generated latents; then decode RGB-D;
  3. write    the new latents back into memory with the *generated* depth (no external depth
              model), leaving out cells the autoencoder's dynamic head marks as moving, and
              into the reference bank.

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

The memory backend (``voxel`` ours, ``mirage`` the reference's append-only cloud, the
baselines) is chosen by name; training builds its conditioning with the same
``memory_config`` + write/read and the same reference retrieval (``train.DenoiserStage``),
so the model is trained as it is run.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from mirage_jax import diffusion, geometry
from mirage_jax import memory as memory_lib
from mirage_jax.errors import InputError
from mirage_jax.memory import objects as objects_lib
from mirage_jax.models import autoencoder, denoiser


def model_family(config: ml_collections.ConfigDict) -> str:
  """'wan' (Wan2.2 DiT + VACE + Wan VAE, ``mirage_jax/wan_rollout.py``) or 'small' (ours),
  from ``config.denoiser.model.family`` (configs without the field are the small family)."""
  return config.denoiser.model.get("family", "small")


def memory_config(config: ml_collections.ConfigDict, **overrides) -> memory_lib.MemoryConfig:
  """The memory settings of ``config`` at the model's image and latent resolution."""
  if model_family(config) == "wan":
    from mirage_jax import wan_rollout  # pylint: disable=g-import-not-at-top
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
    from mirage_jax import wan_rollout  # pylint: disable=g-import-not-at-top
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
  import os  # pylint: disable=g-import-not-at-top
  meta_path = os.path.join(path, "config.json")
  if not os.path.isfile(meta_path):
    raise InputError(path, "config.json", "not an export directory (missing config.json)")
  try:
    with open(meta_path) as f:
      return ml_collections.ConfigDict(json.load(f)["config"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise InputError(meta_path, "config", f"unreadable ({e})") from None


def make_rollout(config: ml_collections.ConfigDict, ae: nnx.Module, dn: nnx.Module,
                 backend: str | None = None, *, wan_options: dict | None = None, **kwargs):
  """The rollout of the export's family: :class:`Rollout` (small) or
  ``wan_rollout.WanRollout`` (Wan; ``wan_options``: text, empty_text, guidance_scale).

  ``kwargs`` are the memory overrides and, for the small family, mask_dynamic/object_slots.
  Asking the Wan family for moving-content handling is refused (it has none yet).
  """
  if model_family(config) == "wan":
    from mirage_jax import wan_rollout  # pylint: disable=g-import-not-at-top
    for flag in ("mask_dynamic", "object_slots"):
      if kwargs.pop(flag, None):
        raise InputError(f"--{flag}", flag, "the Wan family does not handle moving content yet")
    return wan_rollout.WanRollout(config, ae, dn, backend, **(wan_options or {}), **kwargs)
  if wan_options and any(v is not None for v in wan_options.values()):
    given = next(k for k, v in wan_options.items() if v is not None)
    raise InputError(f"--{_WAN_FLAGS.get(given, given)}", _WAN_FLAGS.get(given, given),
                     "only the Wan family takes it; this export is of the small family")
  return Rollout(config, ae, dn, backend, **kwargs)


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
  ``memory.baselines.frame_bank_write``)."""
  return memory_lib.baselines.frame_bank_init(dataclasses.replace(cfg, capacity=capacity))


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
  K_lat = memory_lib.latent_cache.latent_intrinsics(cfg, target_K)
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
    self.prediction = d.prediction
    if self.prediction == "x0_prior" and self.sampler.method != "euler":
      raise InputError("config.sampler", "method", "prediction='x0_prior' samples with 'euler' "
                       f"(its velocity is undefined at t = 0), got {self.sampler.method!r}")
    self.backend_name = backend or config.memory.backend
    # Exports made before `memory.write_new_only` existed wrote everything.
    self.write_new_only = self.backend_name in config.memory.get("write_new_only", ())
    self.memory_cfg = memory_config(config, **memory_overrides)
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
    self._read = jax.jit(self.backend.read)
    self._write = jax.jit(self.backend.write)
    self._encode = jax.jit(self._encode_impl)
    self._dynamic = jax.jit(self._dynamic_impl)
    if self.object_slots:
      self._observe = jax.jit(objects_lib.observe)
      self._render_objects = jax.jit(self._render_objects_impl)
    self._denoise = jax.jit(self._denoise_impl)
    self.refs = reference_settings(config)
    if self.refs.frames:
      self._bank_write = jax.jit(memory_lib.baselines.frame_bank_write)
      self._retrieve = jax.jit(self._retrieve_impl)

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
    K_lat = memory_lib.latent_cache.latent_intrinsics(self.memory_cfg, K)
    return geometry.plucker_rays(K_lat, c2w, *self.latent_hw)

  def _retrieve_impl(self, bank, start, K, c2w):
    """References for the chunk starting at frame ``start`` () int32 (traced: no recompile).

    Frames ``>= start - context_frames`` are the recent context already, so not eligible.
    Returns latents (k, h, w, C), intrinsics (k, 3, 3), c2w (k, 4, 4).
    """
    eligible = bank.frame < start - self.num_context
    lat, ref_K, ref_c2w, _, _ = retrieve_references(bank, eligible, K, c2w, self.refs.frames)
    return lat, ref_K, ref_c2w

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

  # --------------------------------------------------------------------------- driver

  def generate(self, first_frame: np.ndarray, first_depth: np.ndarray, intrinsics: np.ndarray,
               poses_c2w: np.ndarray, *, seed: int = 0, progress: bool = True,
               oracle_frames: tuple[np.ndarray, np.ndarray] | None = None,
               initial_memory: Any = None) -> dict[str, Any]:
    """Generates frames 1..T-1 of a trajectory whose frame 0 is given.

    With ``config.denoiser.reference_frames`` = k > 0 each chunk's context is k references
    retrieved from the reference bank, then the last ``context_frames`` latents.

    Args:
      first_frame: (H, W, 3) uint8 or float in [-1, 1].
      first_depth: (H, W) metric depth of the first frame (> 0).
      intrinsics: (T, 3, 3) at the model's image resolution. poses_c2w: (T, 4, 4) OpenCV.
      seed: sampling seed.
      oracle_frames: optional ground truth ``(frames (N, H, W, 3) uint8, depths (N, H, W))``,
        N <= T: frames ``< N`` are written to memory encoded from these (with their depth)
        instead of the generated ones (evaluation bounds); their encoding is not timed.
      initial_memory: optional memory state of this backend to start from instead of an
        empty one (the scaling benchmark pre-fills it); frame 0 is written into it.
    Returns:
      dict with frames (T, H, W, 3) uint8 (frame 0 = the decoded first frame), depths
      (T, H, W) float32, coverage (T, h, w) float32 (memory coverage of each generated frame;
      frame 0: 1), timings: list of ChunkTiming, cache_bytes (after the last chunk),
      reference_bytes (bytes of the frames in the reference bank after the last chunk; 0
      without references), dynamic (T, h, w) float32 the dynamic head's probability that a
      cell moves (zeros for a model without the head; computed with or without
      ``mask_dynamic``, which only decides what is written), object_positions (T, S, 3)
      float32 and object_idents (T, S) int32 (-1 = empty) the slots at each frame, as the chunk's
      conditioning saw them (S = 0 without object slots), object_bytes (the slots' state).
      Reference retrieval, bank writes and object slots are timed as memory.
    """
    h, w = self.image_hw
    T = poses_c2w.shape[0]
    if first_frame.shape[:2] != (h, w) or first_depth.shape != (h, w):
      raise InputError("generate", "first_frame", f"expected ({h}, {w}) to match the model, got "
                       f"{first_frame.shape[:2]} and depth {first_depth.shape}")
    if intrinsics.shape != (T, 3, 3):
      raise InputError("generate", "intrinsics", f"expected ({T}, 3, 3), got {intrinsics.shape}")
    geometry.check_poses(poses_c2w, "generate")
    frame0 = np.asarray(first_frame)
    if frame0.dtype == np.uint8:
      frame0 = frame0.astype(np.float32) / 127.5 - 1.0
    K = jnp.asarray(intrinsics, jnp.float32)
    c2w = jnp.asarray(poses_c2w, jnp.float32)

    lat0 = self._encode(self.ae_state, jnp.asarray(frame0)[None], jnp.asarray(first_depth)[None])
    if oracle_frames is not None:
      gt_rgb, gt_depth = (np.asarray(a) for a in oracle_frames)
      if gt_rgb.shape[1:] != (h, w, 3) or gt_depth.shape != gt_rgb.shape[:3] or len(gt_rgb) > T:
        raise InputError("generate", "oracle_frames", f"expected (N <= {T}, {h}, {w}, 3) frames and "
                         f"(N, {h}, {w}) depths, got {gt_rgb.shape} and {gt_depth.shape}")
    given_depth0 = jnp.asarray(first_depth, jnp.float32)[None]
    dyn0 = self._dynamic(self.ae_state, lat0)
    static0 = (dyn0 < self.dynamic_threshold) | (not self.mask_dynamic)
    frame_ids0 = jnp.zeros((1,), jnp.int32)
    state = self.backend.init(self.memory_cfg) if initial_memory is None else initial_memory
    state = self._write(state, lat0, given_depth0, K[:1], c2w[:1], static0, frame_ids0,
                        rgb=(jnp.asarray(frame0)[None] + 1.0) / 2.0)
    objects = None
    if self.object_slots:
      objects = self._observe(objects_lib.init(self.object_cfg), lat0, given_depth0, K[:1],
                              c2w[:1], ~static0, frame_ids0)
    positions, idents = [np.zeros((1, 0, 3))], [np.zeros((1, 0), np.int32)]  # (frames, S, ...)
    if objects is not None:
      positions = [np.asarray(objects_lib.predict(objects, 0))[None]]
      idents = [np.asarray(jnp.where(objects.valid, objects.ident, -1))[None]]
    rgb0, depth0 = nnx.merge(self.ae_graphdef, self.ae_state).decode(lat0 / self.latent_scale)
    # Context: the last generated latents; at the start, the first frame repeated.
    nc = self.num_context
    ctx = jnp.repeat(lat0, nc, axis=0)
    ctx_K, ctx_c2w = jnp.repeat(K[:1], nc, axis=0), jnp.repeat(c2w[:1], nc, axis=0)
    bank, stride = None, self.refs.stride
    if self.refs.frames:
      bank = self._bank_write(reference_bank_init(self.memory_cfg, self.refs.bank), lat0,
                              given_depth0, K[:1], c2w[:1], static0, frame_ids0)

    frames, depths, timings = [rgb0], [depth0], []
    coverage, dynamic = [np.ones((1,) + self.latent_hw, np.float32)], [np.asarray(dyn0)]
    rng = jax.random.key(seed)
    starts = range(1, T, self.chunk)
    for start in tqdm(starts, desc=f"generate [{self.backend_name}]", disable=not progress,
                      unit="chunk"):
      n = min(self.chunk, T - start)
      # Pad the last chunk with its last camera; padded frames are never written.
      idx = np.minimum(np.arange(start, start + self.chunk), T - 1)
      Kc, c2wc = K[idx], c2w[idx]
      oracle = oracle_frames is not None and start < len(gt_rgb)
      if oracle:  # padded with the last ground-truth frame; only frames < N are written from it
        gi = np.minimum(idx, len(gt_rgb) - 1)
        o_rgb = jnp.asarray(gt_rgb[gi], jnp.float32) / 127.5 - 1.0
        o_depth = jnp.asarray(gt_depth[gi], jnp.float32)
        o_lat = jax.block_until_ready(self._encode(self.ae_state, o_rgb, o_depth))
      t0 = time.perf_counter()
      mem, cov = jax.block_until_ready(self._read(state, Kc, c2wc))
      frame_ids = jnp.asarray(idx, jnp.int32)
      if objects is not None:
        mem, cov, pos, ids = jax.block_until_ready(
            self._render_objects(objects, mem, cov, Kc, c2wc, frame_ids))
        positions.append(np.asarray(pos[:n])), idents.append(np.asarray(ids[:n]))
      full_ctx, full_K, full_c2w = ctx, ctx_K, ctx_c2w
      if bank is not None:  # references first: memory_prior falls back on the last frame
        refs = jax.block_until_ready(self._retrieve(bank, jnp.int32(start), Kc, c2wc))
        full_ctx, full_K, full_c2w = (jnp.concatenate([r, c], 0) for r, c in
                                      zip(refs, (ctx, ctx_K, ctx_c2w)))
      t_read = time.perf_counter() - t0
      rng, sub = jax.random.split(rng)
      lat, rgb, depth = jax.block_until_ready(self._denoise(
          self.ae_state, self.dn_state, mem, cov, Kc, c2wc, full_ctx, full_K, full_c2w, sub))
      t1 = time.perf_counter()
      w_lat, w_rgb, w_depth = lat, rgb, depth
      if oracle:  # a chunk straddling N mixes the two (no extra ops when it lies below N)
        use = idx < len(gt_rgb)
        pick = lambda o, g: o if use.all() else jnp.where(use.reshape((-1,) + (1,) * (o.ndim - 1)), o, g)
        w_lat, w_rgb, w_depth = pick(o_lat, lat), pick(o_rgb, rgb), pick(o_depth, depth)
      real = (jnp.arange(self.chunk) < n)[:, None, None]  # padded frames are never written
      dyn = self._dynamic(self.ae_state, lat)
      w_dyn = self._dynamic(self.ae_state, w_lat) if oracle else dyn
      moving = (w_dyn >= self.dynamic_threshold) & real
      static = real & ~(moving & self.mask_dynamic)
      if self.write_new_only and not oracle:
        # Covered cells were copied from memory: writing them back only adds drift.
        static = static & ~cov
      state = jax.block_until_ready(self._write(
          state, w_lat, w_depth, Kc, c2wc, static, frame_ids, rgb=(w_rgb + 1.0) / 2.0))
      if objects is not None:
        observed = jnp.asarray(idx < len(gt_rgb)) if oracle else jnp.zeros((self.chunk,), bool)
        objects = jax.block_until_ready(self._observe(objects, w_lat, w_depth, Kc, c2wc, moving,
                                                      frame_ids, observed))
      if bank is not None:  # the last chunk's padded frames may enter; nothing reads them
        bank = jax.block_until_ready(self._bank_write(
            bank, w_lat[::stride], w_depth[::stride], Kc[::stride], c2wc[::stride],
            static[::stride], frame_ids[::stride]))
      t_write = time.perf_counter() - t1
      timings.append(ChunkTiming(t_read + t_write, time.perf_counter() - t0,
                                 int(self.backend.nbytes(state))))
      frames.append(rgb[:n]), depths.append(depth[:n]), coverage.append(np.asarray(cov[:n], np.float32))
      dynamic.append(np.asarray(dyn[:n]))
      ctx = jnp.concatenate([ctx, lat[:n]], 0)[-nc:] if nc else ctx
      ctx_K = jnp.concatenate([ctx_K, Kc[:n]], 0)[-nc:] if nc else ctx_K
      ctx_c2w = jnp.concatenate([ctx_c2w, c2wc[:n]], 0)[-nc:] if nc else ctx_c2w

    rgb_all = np.concatenate([np.asarray(f) for f in frames], 0)
    return dict(
        frames=np.round((np.clip(rgb_all, -1, 1) + 1.0) * 127.5).astype(np.uint8),
        depths=np.concatenate([np.asarray(d) for d in depths], 0).astype(np.float32),
        coverage=np.concatenate(coverage, 0),
        timings=timings,
        cache_bytes=int(self.backend.nbytes(state)),
        dynamic=np.concatenate(dynamic, 0),
        object_positions=(np.concatenate(positions, 0) if objects is not None
                          else np.zeros((T, 0, 3))).astype(np.float32),
        object_idents=(np.concatenate(idents, 0) if objects is not None
                       else np.zeros((T, 0))).astype(np.int32),
        object_bytes=objects_lib.nbytes(objects) if objects is not None else 0,
        reference_bytes=0 if bank is None else memory_lib.baselines.frame_bank_nbytes(bank),
    )
