"""Mirage on the Wan2.2 backbone: what training and generation share for the Wan family.

The reference's sequence of latent frames along time is ``[reference R | target T |
preceding P]`` (the reference's ``model_fn_wan_video``). This module holds the pieces that turn memory reads, latents
and noise levels into the DiT's inputs, with the reference's conventions:

* VACE input (96 channels per latent frame of target + preceding): first the 48 channels of
  the z-buffer-splatted memory (zeros in holes), then the 48 channels of the VAE encoding of
  an all-ones "control" video of ``(T + P - 1) * 4 + 1`` frames, normalised
  ``(mu - mean) / std`` like every other latent (the reference's ``build_vace_context``
  concatenates scene first, control second). Options of ours, off by default (the released
  VACE weights were trained without them): ``coverage_channel`` appends one channel that is 1
  in holes (the reference's own 97-channel path; a model then needs ``vace_in_channels=97``).
* Timesteps per latent frame: 0 for references, ``[0, t_1, ..., t_{T-1}]`` for the target
  (the first target frame is clean: image conditioning), 0 for preceding; ``t = 1000 sigma``.
* Training noise: ``sigma ~ U(0, 1)`` per target frame, shifted ``s' = shift s / (1 + (shift
  - 1) s)`` (shift 5), the first target frame clean, noisy = ``(1 - s') x0 + s' noise``, loss =
  plain MSE (no weighting) between the prediction and ``noise - x0`` on target frames
  ``1..T-1``. The reference trains one clip per device and draws one sigma vector per clip;
  here every clip of the batch draws its own (the same law per clip).

Which video frame's pose and depth each latent frame uses: latent ``k`` of a chunk starting
at video frame ``s`` goes with video frame ``s + 4 k`` (``memory.mirage.latent_frame_indices``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mirage_jax import diffusion, families
from mirage_jax.errors import InputError

NUM_TRAIN_TIMESTEPS = 1000
LATENT_CHANNELS = 48


def control_latents(vae, num_latent_frames: int, height: int, width: int) -> jax.Array:
  """The reference's 48 control channels: the VAE encoding of an all-ones video.

  Args:
    vae: a ``models.wan_vae.WanVAE``.
    num_latent_frames: F, the target + preceding latent frames the VACE input covers.
    height, width: latent rows and columns (h, w); the video is (16 h, 16 w).
  Returns:
    (F, h, w, 48) float32, normalised like the data latents (untiled, as the reference's
    training encodes it).
  """
  if num_latent_frames < 1 or height < 1 or width < 1:
    raise InputError("wan_mirage.control_latents", "num_latent_frames",
                     f"need F, h, w >= 1, got {(num_latent_frames, height, width)}")
  from mirage_jax.families.wan import vae as wan_vae  # pylint: disable=g-import-not-at-top
  s, t = wan_vae.spatial_factor(vae.cfg), wan_vae.temporal_factor(vae.cfg)
  frames = (num_latent_frames - 1) * t + 1
  video = jnp.ones((1, frames, height * s, width * s, 3), jnp.float32)
  return wan_vae.jit_encode(vae, video)[0].astype(jnp.float32)


def vace_context(memory_latents: jax.Array, control: jax.Array,
                 coverage: jax.Array | None = None) -> jax.Array:
  """The VACE input of target + preceding frames.

  Args:
    memory_latents: (B, F, h, w, 48) memory read into the frames' cameras, zeros in holes.
    control: (F, h, w, 48) or (B, F, h, w, 48), see :func:`control_latents`.
    coverage: optional (B, F, h, w) bool; given, a 97th channel = 1 where the memory is empty
      (an option of ours; None for the released weights).
  Returns:
    (B, F, h, w, 96) (or 97) in memory_latents' dtype: memory channels first, then control.
  """
  b = memory_latents.shape[0]
  if control.ndim == 4:
    control = jnp.broadcast_to(control[None], (b,) + control.shape)
  if control.shape[:-1] != memory_latents.shape[:-1]:
    raise InputError("wan_mirage.vace_context", "control",
                     f"shape {tuple(control.shape)} does not match the memory "
                     f"{tuple(memory_latents.shape)}")
  parts = [memory_latents, control.astype(memory_latents.dtype)]
  if coverage is not None:
    parts.append((~coverage.astype(bool))[..., None].astype(memory_latents.dtype))
  return jnp.concatenate(parts, axis=-1)


def sample_sigmas(rng: jax.Array, batch: int, target_frames: int, shift: float = 5.0,
                  first_clean: bool = True, scheme: str = "per_frame",
                  mixed_prob: float = 0.5) -> jax.Array:
  """Training noise levels of the target frames: U(0, 1), shifted, frame 0 clean.

  ``scheme`` (``diffusion.NOISE_LEVELS``): 'per_frame' (the reference's) draws each frame's
  level; 'per_example' gives all target frames of an example one level (as the sampler
  moves them); 'mixed' does so with probability ``mixed_prob`` per example, per frame
  otherwise. With ``first_clean`` frame 0 is 0 under every scheme.

  The draws are not ``diffusion.sample_levels``'s: U(0, 1) without its 1e-5 margins, and a
  shared level is the last frame's, as the reference's training.

  Returns:
    (B, T) float32 sigmas in [0, 1].
  """
  if scheme not in diffusion.NOISE_LEVELS:
    raise ValueError(f"unknown noise-level scheme {scheme!r}; known: {diffusion.NOISE_LEVELS}")
  if scheme == "per_frame":  # the same draw as before the other schemes existed
    sigma = diffusion.shift_time(jax.random.uniform(rng, (batch, target_frames), jnp.float32),
                                 shift)
  else:
    k_sigma, k_mix = jax.random.split(rng)
    sigma = diffusion.shift_time(
        jax.random.uniform(k_sigma, (batch, target_frames), jnp.float32), shift)
    shared = jnp.broadcast_to(sigma[:, -1:], sigma.shape)  # the last frame is never the clean one
    together = (jnp.ones((batch, 1), bool) if scheme == "per_example"
                else jax.random.uniform(k_mix, (batch, 1)) < mixed_prob)
    sigma = jnp.where(together, shared, sigma)
  if first_clean:
    sigma = sigma.at[:, 0].set(0.0)
  return sigma


def frame_timesteps(target_sigmas: jax.Array, num_reference: int, num_preceding: int
                    ) -> jax.Array:
  """Per-latent-frame DiT timesteps of ``[reference | target | preceding]``.

  Args:
    target_sigmas: (B, T) flow sigmas of the target frames (the first one 0 when clean).
    num_reference, num_preceding: R and P (static).
  Returns:
    (B, R + T + P) float32: 0 for references and preceding, 1000 sigma for the target.
  """
  b = target_sigmas.shape[0]
  t = NUM_TRAIN_TIMESTEPS * target_sigmas.astype(jnp.float32)
  return jnp.concatenate([jnp.zeros((b, num_reference), jnp.float32), t,
                          jnp.zeros((b, num_preceding), jnp.float32)], axis=1)


def flow_loss(pred_target: jax.Array, x0: jax.Array, noise: jax.Array,
              first_clean: bool = True) -> jax.Array:
  """The reference's loss: MSE (float32, no weighting) to ``noise - x0`` on the target
  frames, frame 0 left out when it was kept clean. All arrays (B, T, h, w, C)."""
  start = 1 if first_clean else 0
  target = (noise.astype(jnp.float32) - x0.astype(jnp.float32))[:, start:]
  return jnp.mean(jnp.square(pred_target.astype(jnp.float32)[:, start:] - target))


def assemble(reference: jax.Array | None, target: jax.Array, preceding: jax.Array | None
             ) -> jax.Array:
  """``[reference | target | preceding]`` along time; each (B, n, h, w, C) or None."""
  parts = [p for p in (reference, target, preceding) if p is not None and p.shape[1]]
  return jnp.concatenate([p.astype(target.dtype) for p in parts], axis=1)


def predict(dit, references: jax.Array | None, target: jax.Array,
            preceding: jax.Array | None, target_sigmas: jax.Array, text: jax.Array,
            vace: jax.Array, *, integer_timesteps: bool = False, **dit_kwargs) -> jax.Array:
  """The DiT's prediction on the target frames of ``[reference | target | preceding]``:
  the one forward pass the training loss and the rollout's sampler both make.

  Args:
    dit: a ``dit.WanDiT`` with its VACE branch.
    references: (B, R, h, w, 48) clean or None. target: (B, T, h, w, 48) noisy.
    preceding: (B, P, h, w, 48) clean or None.
    target_sigmas: (B, T) flow sigmas of the target frames (:func:`frame_timesteps`).
    text: (B, Lt, D) embedding. vace: (B, T + P, h, w, 96 or 97) (:func:`vace_context`).
    integer_timesteps: round the timesteps (the sampler's: the reference's DiT sees integer
      timesteps, which the float32 trip through sigma may miss by an ulp).
    dit_kwargs: the DiT's other keywords (``frame_mask``; ``deterministic``, ``rngs``).
  Returns:
    (B, T, h, w, 48) the prediction (flow velocity) on the target frames.
  """
  r = 0 if references is None else references.shape[1]
  p = 0 if preceding is None else preceding.shape[1]
  t = frame_timesteps(target_sigmas, r, p)
  if integer_timesteps:
    t = jnp.round(t)
  out = dit(assemble(references, target, preceding), t, text, num_reference=r,
            vace_context=vace, **dit_kwargs)
  return out[:, r:r + target.shape[1]]


def memory_scene(memory: jax.Array, coverage: jax.Array) -> jax.Array:
  """A memory read as the VACE input's memory channels: (F, h, w, 48) float32, zeros in
  holes (``coverage`` (F, h, w) bool False)."""
  return jnp.where(coverage[..., None], memory.astype(jnp.float32), 0.0)


def splat_memory(backend, memory_cfg, src_latents: jax.Array, src_depth: jax.Array,
                 src_K: jax.Array, src_c2w: jax.Array, src_static: jax.Array,
                 dst_K: jax.Array, dst_c2w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Memory of one clip: written from S source latent frames, read into F cameras.

  Args:
    backend: a ``memory.Backend``; memory_cfg: its ``MemoryConfig`` (latent resolution h, w;
      image resolution 16 h, 16 w).
    src_latents (S, h, w, 48); src_depth (S, h, w) z-depth at latent resolution; src_K
      (S, 3, 3) image-resolution intrinsics; src_c2w (S, 4, 4); src_static (S, h, w) bool.
    dst_K (F, 3, 3); dst_c2w (F, 4, 4).
  Returns:
    memory (F, h, w, 48) float32 (zeros in holes), coverage (F, h, w) bool.
  """
  state = backend.init(memory_cfg)
  ids = jnp.arange(src_latents.shape[0], dtype=jnp.int32)
  state = backend.write(state, src_latents, src_depth, src_K, src_c2w, src_static, ids)
  mem, cov = backend.read(state, dst_K, dst_c2w)
  return memory_scene(mem, cov), cov


def caption_or_empty(text: jax.Array, empty: jax.Array, drop: jax.Array) -> jax.Array:
  """Caption dropout: (B, L, D) embeddings with the rows where ``drop`` (B,) bool replaced
  by the empty-prompt embedding ``empty`` (L, D)."""
  return jnp.where(drop[:, None, None], empty[None].astype(text.dtype), text)


__all__ = ["assemble", "caption_or_empty", "control_latents", "flow_loss",
           "frame_timesteps", "memory_scene", "predict", "sample_sigmas", "splat_memory",
           "vace_context"]


# ----------------------------------------------------------------------------- config


# The value an export made before each field existed was trained and run with.
_DEFAULTS = {
    "sampler.guidance_scale": 0.0,
    "denoiser.preceding_frames": 8,  # the reference's
    "denoiser.reference_frames": 0,
    "denoiser.reference_bank": 16,
    "denoiser.text_len": 512,  # the reference's umT5 sequence length
    "denoiser.empty_text": "",
    "denoiser.text_encoder": "",  # a umT5 export (convert_text) and its tokenizer folder
    "denoiser.tokenizer": "",
    "denoiser.autoencoder_checkpoint": "",
    "denoiser.base_checkpoint": "",
}


def upgrade(config):
  """A Wan-family config (an export's of any age, or a run's) in the current schema:
  ``family`` set and every field added since the first exports filled with the value they
  were made with (a copy; present fields are kept). ``denoiser.caption_dropout`` stays
  absent on a converted base: it keeps the released model's own training."""
  from mirage_jax import world_model  # pylint: disable=g-import-not-at-top
  defaults = dict(_DEFAULTS) if "denoiser" in config else {}
  return world_model.with_defaults(config, {"family": families.check_family(config, "wan"),
                                             **defaults})


def memory_config(config, **overrides):
  """The memory settings of a Wan-family ``config`` (``config.memory.settings``) at the
  reference's geometry: latent cells of 16 x 16 pixels of ``config.data.resolution``, 48
  channels; then ``overrides`` (fields of ``MemoryConfig``, e.g. ``capacity``)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from mirage_jax import memory as memory_lib  # pylint: disable=g-import-not-at-top
  h, w = (int(r) for r in config.data.resolution)
  if h % 16 or w % 16:
    raise InputError("config.data", "resolution", f"must be multiples of 16 for the Wan VAE, "
                     f"got {(h, w)}")
  return dataclasses.replace(memory_lib.memory_config(dict(
      config.memory.settings, image_height=h, image_width=w, latent_height=h // 16,
      latent_width=w // 16, latent_channels=LATENT_CHANNELS)), **overrides)
