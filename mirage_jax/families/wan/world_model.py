"""Chunked generation with the Wan family (Wan2.2 DiT + VACE memory branch + Wan2.2 VAE).

The reference's inference loop (microsoft/LatentSpatialMemory, ``MiragePipeline.generate``)
ported to static shapes. A trajectory of T video frames is generated in chunks:

  * chunk 0 covers video frames 0..C-1 (C = ``config.denoiser.target_frames``, 4N+1, the
    reference's 33): L = (C - 1)/4 + 1 latent frames (9), latent k with the camera of video
    frame 4k; latent 0 is the clean encoded first frame;
  * chunk i >= 1 starts one frame early, at video frame s_i = (C - 1) i: its latent 0 is the
    last generated latent (clean), latent k goes with video frame s_i + 4k, and it adds C - 1
    new video frames (32) and L - 1 new latents (8). The decoded first frame of these chunks
    repeats the previous chunk's last one and is dropped.

Per chunk (``memory.latent_frame_indices`` gives the video frame of each latent):

  1. read    the memory into the L target cameras (z-buffer splat at latent resolution,
             zeros in holes) -> ``target_scene``;
  2. context P preceding latents (``preceding_frames`` video frames -> P = ceil(8/4) = 2
             latents): the generated latents just before the chunk's first one, with the
             memory reads they were generated with (the reference's ``preceding_scene``);
             and up to R retrieved references (voxel IoU >= 0.04, best first, at most
             ``config.denoiser.reference_frames``) among the latents generated so far;
  3. denoise the DiT sees ``[references R | target L | preceding P]`` with timesteps 0 | [0,
             t, ..., t] | 0, the text embedding, and the VACE input
             ``wan_mirage.vace_context([target_scene | preceding_scene], control)``
             (``wan_mirage.predict``, the forward pass the training loss makes); FlowUniPC
             (``config.sampler``: 20 steps, shift 5, order 2), the clean latent 0 re-written
             after every step; no CFG unless ``guidance_scale`` > 0 (the negative text is the
             empty-prompt embedding);
  4. decode  the L latents with the Wan VAE (tiled as the reference) -> 4L - 3 RGB frames;
  5. write   the new latents (chunk 0: all L, the first frame a second time as the reference
             does; later: latents 1..L-1) into the memory and the reference bank, each at its
             video frame's camera, with that frame's GIVEN depth.

Depth. The reference predicts the depth of every generated frame with an external model
(MapAnything) before writing it. That model is not available here, and the Wan VAE is RGB
only, so this rollout takes the depth from the input: the geometry file's (or dataset's)
depth of the video frame each latent stands for. An input without depth (``has_depth`` False)
is refused by the callers with a one-line error; there is no silent fallback (the small
family's RGB-D autoencoder does not share the Wan latent space, so it cannot stand in).

Text. The DiT's cross-attention takes a (Lt, text_dim) umT5 embedding, zero-padded to
``denoiser.text_len`` tokens (512, as the reference's prompter pads): a prompt encoded by the
umT5 export (``mirage_jax.text.prompts``; ``--prompt``, ``--text_encoder``, ``--tokenizer``)
or a saved embedding (``--caption_embedding``). Without a prompt, the empty prompt is used
(also the CFG negative unless ``--negative_prompt``), umT5 of "" (:func:`empty_prompt`):
``--empty_text_embedding``, else the export's ``denoiser.empty_text`` file (``convert_wan`` /
``mirage_jax.export`` with ``--text_encoder`` write it), else encoded by the known text
encoder; all zeros, with a warning, only when none of these is known.

Shapes. Every chunk is ONE jitted call with fixed shapes (:meth:`WanRollout._chunk_impl`:
read -> retrieve -> the whole sampler -> decode -> write, no host sync inside): the DiT always
sees R = min(reference_frames, reference_bank) reference slots and P preceding slots. The
references that pass retrieval are right-aligned against the target (RoPE times -n..-1, as
the reference gives n references), the preceding latents that exist left-aligned after it;
the other slots are padding, and ``WanDiT``'s ``frame_mask`` keeps every token from
attending to them (main and VACE self-attention are the only token mixing), so a chunk
equals the one with exactly its real frames (tests/test_wan_batched.py). Chunk 0 is the
same step with every slot padded (the control video of L + P latents starts as that of L:
the VAE is causal in time). The last chunk is padded to L latents with the last camera (as
the reference cannot: it shortens its last chunk); padded latents are neither written to
memory nor returned. Frame 0's latent is written before chunk 0 twice (the reference writes
it from the geometry, then again as chunk 0's latent 0, which the sampler keeps equal to it).

Batching (:meth:`WanRollout.generate_batch`, as the small family's
``rollout.Rollout.generate_batch``): the chunk step is vmapped over trajectories, the
trajectory axis sharded over the mesh's batch axes; trajectories of different lengths are
padded to the most chunks, a chunk past a trajectory's end changes nothing of its state, and
a batch of any lengths reuses the one compiled step. The host syncs once, after the first
chunk (compilation); ``timed`` (``generate``'s timings) blocks after every chunk. Ground
truth for the oracle row is encoded outside the step.

Training (``stage.WanStage.loss``) builds the same inputs with the same functions
(``memory_scene`` of a read, ``vace_context``, ``predict``), with two differences of the
reference's training: the preceding latents' memory channels are the memory read into their
cameras (here, the reads they were generated with), and the timesteps are not rounded.

Every backend is written with everything generated (the reference's rule; the small
family's ``write_new_only`` and dynamic masking are not applied).

``rgb_points`` (the pixel point-cloud baseline, Voyager / Spatia style) keeps coloured
full-resolution points instead of latents: each written latent's decoded video frame (frame
4k of the chunk; frame 0 from the input) with that frame's depth, and per chunk it renders
the cloud into the cameras of EVERY video frame of the chunk (C = 4(L - 1) + 1; the chunk
carries ``K_video`` / ``c2w_video``) and encodes that rendered video with the Wan VAE (the
causal VAE: C frames -> L latents) inside the step, so the DiT gets the same kind of VACE
conditioning as from ``mirage``'s read. That VAE encode per chunk is the cost latent
memories avoid (``benchmarks/bench_wan_memory.py``, BENCHMARKS.md).

Differences from the reference, on purpose or by necessity: given depth instead of
MapAnything (above); a padded last chunk; retrieval scores each past latent by the voxel
IoU of its OWN lifted points (the reference: the whole cloud's points inside that frame's
frustum at the time it was written) and keeps a ring buffer of ``reference_bank`` latents
(the reference keeps all); uint8 frames by truncation as the reference (``.byte()``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from mirage_jax import diffusion, paths, world_model
from mirage_jax import memory as memory_lib
from mirage_jax.depth import estimator as depth_estimator
from mirage_jax.errors import InputError
from mirage_jax.families.wan import conditioning as wan_mirage
from mirage_jax.families.wan import exports
from mirage_jax.families.wan import vae as wan_vae

TEXT_TOKENS = 512  # the reference's umT5 sequence length


@dataclasses.dataclass(frozen=True)
class WanSettings:
  """The chunking of the Wan rollout (from ``config.denoiser``).

  Attributes:
    chunk_frames: video frames of the first chunk, 4N+1 (the reference's 33).
    temporal: video frames per latent frame after the first (4).
    preceding_latents: P, preceding latent frames of chunks after the first.
    max_references: at most this many retrieved references (0 = off).
    reference_bank: latents kept for retrieval (ring buffer).
  """
  chunk_frames: int
  temporal: int
  preceding_latents: int
  max_references: int
  reference_bank: int

  @property
  def latents(self) -> int:
    """L, latent frames per chunk."""
    return (self.chunk_frames - 1) // self.temporal + 1

  @property
  def new_frames(self) -> int:
    """Video frames each chunk after the first adds."""
    return self.chunk_frames - 1


def wan_settings(config: ml_collections.ConfigDict) -> WanSettings:
  """Checked :class:`WanSettings` of a Wan-family config.

  Fields: ``denoiser.target_frames`` (video frames per chunk, 4N+1), ``denoiser.preceding_frames``
  (video frames, default 8 as the reference), ``denoiser.reference_frames`` (max references),
  ``denoiser.reference_bank``.
  """
  d = config.denoiser
  temporal = wan_vae.temporal_factor(config.autoencoder)
  chunk = int(d.target_frames)
  if chunk < temporal + 1 or (chunk - 1) % temporal:
    raise InputError("config.denoiser", "target_frames", f"the Wan family generates chunks of "
                     f"{temporal}N+1 video frames (N >= 1; the reference: 33), got {chunk}")
  d = wan_mirage.upgrade(config).denoiser
  preceding, refs, bank = int(d.preceding_frames), int(d.reference_frames), int(d.reference_bank)
  if preceding < 0:
    raise InputError("config.denoiser", "preceding_frames", f"must be >= 0, got {preceding}")
  if refs < 0:
    raise InputError("config.denoiser", "reference_frames", f"must be >= 0, got {refs}")
  if refs and bank < refs:
    raise InputError("config.denoiser", "reference_bank",
                     f"must be >= reference_frames ({refs}), got {bank}")
  return WanSettings(chunk, temporal, math.ceil(preceding / temporal), refs, bank)


def text_length(config: ml_collections.ConfigDict) -> int:
  """Tokens of the DiT's text input (``denoiser.text_len``; the reference's umT5: 512)."""
  return int(wan_mirage.upgrade(config).denoiser.text_len)


def load_text_embedding(path: str | None, text_dim: int, flag: str,
                        length: int = TEXT_TOKENS) -> np.ndarray:
  """(length, text_dim) float32: a saved (Lt, text_dim) umT5 embedding zero-padded to
  ``length`` tokens (the reference pads its prompts to 512), or zeros when ``path`` is None.

  Raises:
    InputError naming ``path`` (or ``flag``) and the field when the file is missing,
    unreadable or of the wrong shape.
  """
  if not path:
    return np.zeros((length, text_dim), np.float32)
  field = flag.lstrip("-")
  if not paths.isfile(path):  # an export's empty_text.npy may be on gs://
    raise InputError(path, field, "no such file (a .npy of shape (Lt, text_dim))")
  try:
    with paths.open(path, "rb") as f:
      emb = np.load(f, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise InputError(path, field, f"not a readable .npy ({e})") from None
  if not isinstance(emb, np.ndarray) or emb.ndim != 2 or emb.shape[1] != text_dim or not (
      1 <= emb.shape[0] <= length):
    raise InputError(path, field, f"expected shape (Lt <= {length}, {text_dim}), got "
                     f"{getattr(emb, 'shape', None)}")
  if not np.issubdtype(emb.dtype, np.floating) or not np.all(np.isfinite(emb)):
    raise InputError(path, field, f"expected finite floats, got dtype {emb.dtype}")
  return load_or_pad(emb, text_dim, length)


class WorldModel(world_model.WorldModel):
  """A Wan-family export's VAE + DiT and a memory backend (see the module docstring).

  Args:
    config: the export's config (family 'wan'); upgraded (:meth:`upgrade`) here.
    vae: ``vae.WanVAE``. dit: ``dit.WanDiT`` (with its VACE branch; without one, a plain
      pretrained Wan base, it generates without the memory).
    backend: memory backend name (default ``config.memory.backend``; ``mirage`` is the
      reference's splat, ``voxel`` ours in the same slot).
    text: (Lt, text_dim) caption embedding (padded to text_len) or None (the empty prompt).
    empty_text: (Lt, text_dim) the empty-prompt embedding, or None (zeros).
    guidance_scale: CFG scale (> 0 turns CFG on, negative = ``empty_text``); None: the
      config's ``sampler.guidance_scale`` (0 = off, the reference's default).
    mask_dynamic, object_slots: refused when true (moving content is not handled yet).
    depth: where the depth of generated frames comes from (``depth.estimator.DepthOptions``):
      ``given`` (default: the input's depth of every frame) or ``depth_anything`` (estimated
      from each decoded frame inside the step and aligned to the memory).
    memory_overrides: fields of ``MemoryConfig`` to change (e.g. ``capacity``).
  """

  name = "wan"
  needs_depths = True  # with the ``given`` depth: generate() wants the depth of every frame
  has_depth_head = False  # the Wan VAE decodes RGB only
  depth_estimators = ("given", "depth_anything")
  moving_content = False
  given_context = False  # the clean context is always its own generation
  benchmarks = ("revisit", "scaling")
  takes_text = True

  def __init__(self, config: ml_collections.ConfigDict, vae: nnx.Module, dit: nnx.Module,
               backend: str | None = None, *, text: np.ndarray | None = None,
               empty_text: np.ndarray | None = None, guidance_scale: float | None = None,
               mask_dynamic: bool | None = None, object_slots: bool | None = None,
               depth: depth_estimator.DepthOptions | None = None, **memory_overrides):
    depth = depth or self.depth_options()
    if depth.estimator not in self.depth_estimators:
      raise InputError("--depth_estimator", "depth_estimator", f"the Wan family takes "
                       f"{self.depth_estimators} (its VAE decodes no depth), got {depth.estimator!r}")
    for flag, value in (("mask_dynamic", mask_dynamic), ("object_slots", object_slots)):
      if value:
        raise InputError(f"--{flag}", flag, "the Wan family does not handle moving content yet")
    config = self.upgrade(config)
    if config.family != self.name:
      raise InputError("config.denoiser.model", "family", "the Wan WorldModel needs a "
                       f"Wan-family export, got {config.family!r}")
    # A DiT without its VACE branch (a pretrained plain Wan base) generates each chunk from
    # its first latent, the preceding latents and the references only: the memory is still
    # written and read (coverage is reported) but has no way into the DiT.
    self.uses_memory = dit.vace is not None
    if not self.uses_memory:
      logging.warning("the Wan DiT has no VACE branch: generating without the memory")
    self.config = config
    self.settings = wan_settings(config)
    self.chunk = self.settings.chunk_frames
    self.frames_per_write = self.settings.temporal  # one latent (one write) per 4 frames
    s = config.sampler
    if s.method != "unipc":
      raise InputError("config.sampler", "method", f"the Wan family samples with 'unipc' "
                       f"(the reference's FlowUniPC), got {s.method!r}")
    self.num_steps, self.shift = int(s.num_steps), float(s.shift)
    g = float(s.guidance_scale if guidance_scale is None else guidance_scale)
    if g < 0:
      raise InputError("--guidance_scale", "guidance_scale", f"must be >= 0, got {g}")
    self.guidance_scale = g or None
    self.backend_name = backend or config.memory.backend
    self.memory_cfg = wan_mirage.memory_config(config, **memory_overrides)
    self.image_hw = (self.memory_cfg.image_height, self.memory_cfg.image_width)
    self.latent_hw = (self.memory_cfg.latent_height, self.memory_cfg.latent_width)
    self.mask_dynamic = self.object_slots = False  # moving content: not handled on Wan yet
    text_dim, length = int(config.denoiser.model.text_dim), text_length(config)
    pad = lambda e: load_or_pad(np.zeros((1, text_dim)) if e is None else e, text_dim, length)
    self.empty_text = jnp.asarray(pad(empty_text))[None]  # (1, length, text_dim)
    # No caption: the empty prompt, as the reference's "" (its embedding, zeros by default).
    self.text = jnp.asarray(pad(text))[None] if text is not None else self.empty_text
    self.vae = vae
    self.vae_graphdef, self.vae_state = nnx.split(vae)
    self.dit_graphdef, self.dit_state = nnx.split(dit)
    # rgb_points renders every video frame of a chunk and encodes them with the VAE.
    self.reads_video = self.backend_name == "rgb_points"
    # Outside the step (timed reads, tools) the VAE state is bound as an argument of a jitted
    # encode: merging concrete params inside another trace is refused by nnx.
    self.backend = memory_lib.get_backend(
        self.backend_name, encode_fn=functools.partial(jax.jit(self._encode_rgb), self.vae_state))
    self.depth_model = depth_estimator.Monocular.from_options(depth)
    self.needs_depths = self.depth_model is None
    self.needs_first_depth = self.depth_model is None or self.depth_model.needs_first_depth
    self._sample = jax.jit(self._sample_impl)  # sample_chunk's (unpadded) path
    self._control: dict[int, jax.Array] = {}
    st = self.settings
    # R: reference slots of every chunk (the retrieved ones, padded).
    self.num_references = min(st.max_references, st.reference_bank) if st.max_references else 0

  # --------------------------------------------------------------------------- config, loading

  upgrade = staticmethod(wan_mirage.upgrade)
  memory_config = staticmethod(wan_mirage.memory_config)

  @staticmethod
  def load(denoiser_export: str, autoencoder_export: str | None = None):
    """(config, vae, dit) of a Wan-family export: a ``convert_wan`` DiT export or a fine-tune
    export of one (``exports.load_dit`` follows ``denoiser.base_checkpoint``).

    The VAE comes from ``autoencoder_export``, else the first ``denoiser.autoencoder_checkpoint``
    along the export chain (newest first; ``convert_wan`` sets it on the root export); it must
    be a Wan-family autoencoder export with the config the DiT was exported with.
    """
    dit, config = exports.load_dit(denoiser_export)
    return wan_mirage.upgrade(config), load_vae(config, autoencoder_export, denoiser_export), dit

  @staticmethod
  def check_guidance(config: ml_collections.ConfigDict, scale: float | None = None) -> None:
    """Refuses classifier-free guidance when a fine-tune never trained its unconditional
    branch (the empty prompt: ``denoiser.caption_dropout`` > 0); a converted base, without
    that field, keeps the released model's own training."""
    world_model.refuse_untrained_guidance(wan_mirage.upgrade(config), scale, "caption_dropout")

  @staticmethod
  def frozen_autoencoder(config: ml_collections.ConfigDict) -> nnx.Module:
    """The Wan VAE a fine-tuning run trains on latents with (:func:`load_vae`)."""
    return load_vae(config)

  @classmethod
  def sampling_options(cls, config, *, caption=None, empty_text=None, guidance_scale=None,
                       **text):
    return rollout_options(config, caption, empty_text, guidance_scale, **text)

  @classmethod
  def encode_prompts(cls, config, texts, *, text_encoder=None, tokenizer=None):
    encoder = TextEncoders(config, text_encoder, tokenizer).get("a prompt")
    return [np.asarray(encoder.encode([t])[0]) for t in texts]

  def set_text(self, embedding):
    text_dim, length = int(self.config.denoiser.model.text_dim), text_length(self.config)
    self.text = jnp.asarray(load_or_pad(embedding, text_dim, length))[None]

  def _encode_rgb(self, vae_state, rgb01):
    """rgb_points' re-encoder: rendered video (C, H, W, 3) in [0, 1], C = 4k + 1 -> (k + 1,
    h, w, 48) float32 latents (tiled, as every Wan encode here)."""
    vae = nnx.merge(self.vae_graphdef, vae_state)
    return vae.tiled_encode((rgb01 * 2.0 - 1.0)[None])[0].astype(jnp.float32)

  def _memory_backend(self, vae_state) -> memory_lib.Backend:
    """The memory backend; ``rgb_points``' read encodes with the VAE of ``vae_state`` (the
    step's own params, so the VAE is an argument of the compiled step, not a constant)."""
    return memory_lib.get_backend(self.backend_name,
                                  encode_fn=functools.partial(self._encode_rgb, vae_state))

  def read_cameras(self, chunk) -> tuple:
    """(K, c2w) the memory is read into: the L latents' cameras, or for ``rgb_points`` the
    C video frames' (``K_video``, ``c2w_video``), batched like ``chunk``."""
    if self.reads_video:
      return chunk["K_video"], chunk["c2w_video"]
    return chunk["K"], chunk["c2w"]

  @staticmethod
  def _rgb01(rgb):
    """Decoded frames in [-1, 1] -> [0, 1] (what ``rgb_points`` stores)."""
    return (jnp.clip(rgb, -1.0, 1.0) + 1.0) * 0.5

  # --------------------------------------------------------------------------- pieces

  def control(self, num_latents: int) -> jax.Array:
    """(F, h, w, 48) encoded all-ones control video for F latent frames (cached per F)."""
    if num_latents not in self._control:
      self._control[num_latents] = wan_mirage.control_latents(self.vae, num_latents,
                                                              *self.latent_hw)
    return self._control[num_latents]

  def vace_input(self, scene: jax.Array) -> jax.Array | None:
    """Memory reads of target + preceding frames (F, h, w, 48) -> VACE input (1, F, h, w, 96);
    None for a DiT without VACE."""
    if not self.uses_memory:
      return None
    return wan_mirage.vace_context(scene.astype(jnp.float32)[None], self.control(scene.shape[0]))

  def _sample_impl(self, dit_state, noise, first, references, preceding, vace, text, empty_text,
                   frame_mask=None):
    """One chunk's latents from noise.

    Args:
      noise: (1, L, h, w, 48). first: (1, 1, h, w, 48) the clean latent 0.
      references: (1, R, h, w, 48). preceding: (1, P, h, w, 48) clean latents.
      vace: (1, L + P, h, w, 96), or None (a DiT without VACE).
      text, empty_text: (1, text_len, text_dim).
      frame_mask: optional (1, R + L + P) bool, False = a padding slot (``WanDiT``).
    Returns:
      (1, L, h, w, 48) float32, latent 0 = ``first``.
    """
    dit = nnx.merge(self.dit_graphdef, dit_state)
    length = noise.shape[1]

    def model_fn(x, timestep, conditioned=True):
      sigma = jnp.full((1, length), timestep / wan_mirage.NUM_TRAIN_TIMESTEPS, jnp.float32)
      # The DiT sees the reference's integer timesteps: rounding undoes the float32 trip
      # through sigma (1000 * (989 / 1000) is 989.00006 in float32).
      return wan_mirage.predict(dit, references, x, preceding, sigma.at[:, 0].set(0.0),
                                text if conditioned else empty_text, vace,
                                integer_timesteps=True, frame_mask=frame_mask)

    put_first = lambda x: x.at[:, :1].set(first.astype(x.dtype))
    return diffusion.sample_unipc(model_fn, put_first(noise), self.num_steps, self.shift,
                                  guidance_scale=self.guidance_scale, after_step=put_first)

  def sample_chunk(self, rng, first, scene, *, references=None, preceding=None,
                   preceding_scene=None) -> jax.Array:
    """The denoised latents of one chunk (public for tests and tools).

    Args:
      rng: PRNG key of the noise. first: (h, w, 48) clean latent 0.
      scene: (L, h, w, 48) memory read into the target cameras (zeros in holes).
      references: (R, h, w, 48) or None. preceding: (P, h, w, 48) or None, with
        preceding_scene (P, h, w, 48) their memory reads.
    Returns:
      (L, h, w, 48) float32.
    """
    h, w = self.latent_hw
    c = wan_mirage.LATENT_CHANNELS
    empty = jnp.zeros((0, h, w, c), jnp.float32)
    refs = empty if references is None else jnp.asarray(references, jnp.float32)
    prec = empty if preceding is None else jnp.asarray(preceding, jnp.float32)
    prec_scene = empty if preceding_scene is None else jnp.asarray(preceding_scene, jnp.float32)
    length = self.settings.latents
    noise = jax.random.normal(rng, (1, length, h, w, c), jnp.float32)
    vace = self.vace_input(jnp.concatenate([jnp.asarray(scene, jnp.float32), prec_scene], 0))
    out = self._sample(self.dit_state, noise, jnp.asarray(first, jnp.float32)[None, None],
                       refs[None], prec[None], vace, self.text, self.empty_text)
    return out[0]

  def encode(self, frames: np.ndarray) -> jax.Array:
    """(F, H, W, 3) uint8 or [-1, 1] float, F = 4k + 1 -> (k + 1, h, w, 48) latents (tiled)."""
    x = np.asarray(frames)
    x = x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float32)
    return self.vae.tiled_encode(jnp.asarray(x)[None])[0]

  def decode(self, latents: jax.Array) -> jax.Array:
    """(L, h, w, 48) -> (4L - 3, H, W, 3) in [-1, 1] (tiled, as the reference)."""
    return self.vae.tiled_decode(jnp.asarray(latents)[None])[0]

  def plan(self, num_frames: int) -> list[np.ndarray]:
    """Per chunk, the video frame of each of its L latents (unclipped; may pass T - 1)."""
    st = self.settings
    chunks = max(1, math.ceil((num_frames - 1) / st.new_frames))
    return [memory_lib.mirage.latent_frame_indices(st.chunk_frames, st.temporal, start=i * st.new_frames)
            for i in range(chunks)]

  # --------------------------------------------------------------------------- one chunk step

  def _start_impl(self, vae_state, depth_state, state, frame0, depth0, valid0, K0, c2w0, rng):
    """Frame 0 of one trajectory: the carry of :meth:`_chunk_impl`.

    Frame 0's latent is written into the memory twice, as the reference does (its
    ``LatentPointCloud.from_geometry``, then again as chunk 0's latent 0, which the sampler
    keeps equal to it), and once into the reference bank (chunk 0's latent 0).

    Args:
      state: the memory state frame 0 is written into (empty or pre-filled).
      frame0: (H, W, 3) in [-1, 1]. depth0: (H, W) metric; all zeros when not given (then
        the depth model's estimate). valid0: (H, W) bool where depth0 was observed (nothing
        is lifted from the rest). K0: (3, 3). c2w0: (4, 4).
      rng: (2,) uint32 key data of the trajectory's sampling key.
    Returns:
      (carry: dict of memory, bank (with references), hist (P + 1, h, w, 48) float32 the
      last generated latents, newest last (here frame 0's only), hist_scene (P + 1, h, w, 48)
      the memory read each was generated with, count () int32 latents generated so far, rng,
      and with a depth model depth_fit (2,) its alignment; first outputs: depth (H, W) the
      depth frame 0 was written with).
    """
    vae = nnx.merge(self.vae_graphdef, vae_state)
    lat0 = vae.tiled_encode(frame0[None, None])[0].astype(jnp.float32)  # (1, h, w, 48)
    fit = None
    if self.depth_model is not None:
      depth0, fit = self.depth_model.first(depth_state, frame0, depth0)
    K, c2w, depth = K0[None], c2w0[None], depth0[None]
    every = valid0[None]  # no moving-content mask: every observed pixel
    ids = jnp.zeros((1,), jnp.int32)
    rgb0 = self._rgb01(frame0[None]) if self.reads_video else None
    memory = self.backend.write(state, lat0, depth, K, c2w, every, ids, rgb=rgb0)
    memory = self.backend.write(memory, lat0, depth, K, c2w, every, ids, rgb=rgb0)
    n = self.settings.preceding_latents + 1
    carry = dict(memory=memory, hist=jnp.repeat(lat0, n, 0), hist_scene=jnp.zeros((n,) + lat0.shape[1:]),
                 count=jnp.ones((), jnp.int32), rng=rng)
    if fit is not None:
      carry["depth_fit"] = fit
    if self.num_references:
      bank = memory_lib.references.reference_bank_init(self.memory_cfg, self.settings.reference_bank)
      carry["bank"] = memory_lib.frame_bank.write(bank, lat0, depth, K, c2w, every, ids)
    return carry, dict(depth=depth0)

  def _chunk_impl(self, vae_state, dit_state, control, text, empty_text, depth_state, carry,
                  chunk, *, oracle: bool):
    """One chunk of one trajectory with fixed shapes: read -> sample -> decode -> write.

    The DiT always sees ``[R references | L target | P preceding]``: the references that
    passed retrieval right-aligned against the target, the preceding latents that exist
    left-aligned after it, the other slots padding that ``frame_mask`` hides from every
    token (``WanDiT``). So real frames keep the RoPE positions they have without padding,
    and the result equals the chunk with exactly those frames (tests/test_wan_batched.py).

    Args:
      control: (L + P, h, w, 48) encoded all-ones video (None without VACE).
      text, empty_text: (1, Lt, D).
      depth_state: the depth model's state (None with the given depth).
      carry: as :meth:`_start_impl` returns it.
      chunk: K (L, 3, 3), c2w (L, 4, 4), depth (L, H, W) the given depth of each latent's
        video frame (with the given depth only), frame (L,) int32 those video frames (unclipped; cameras and depths
        past the trajectory's end repeat its last), with ``rgb_points`` K_video (C, 3, 3) and
        c2w_video (C, 4, 4) every video frame's camera, first () bool chunk 0, real () int32
        latents 1..real lie inside the trajectory (the others are never written), active ()
        bool the chunk belongs to the trajectory (else nothing of the carry changes). With
        ``oracle``: use (L,) bool latents written from ground truth, o_lat (L, h, w, 48).
        valid (L, H, W) bool (with the given depth) and o_valid (L, H, W) (with a depth
        model and ``oracle``): where the written ground-truth depth was observed.
      oracle: static; without it nothing is written from ground truth.
    Returns:
      the new carry; outputs: rgb (4L - 3, H, W, 3) in [-1, 1], coverage (L, h, w) bool,
      latents (L, h, w, 48) float32, references () int32 references used; with a depth
      model, depth (L - 1, H, W) the depth latents 1.. were written with and aligned
      (L - 1,) bool those fitted to the memory's own depth.
    """
    st = self.settings
    L, P, R = st.latents, st.preceding_latents, self.num_references
    Kc, c2wc = chunk["K"], chunk["c2w"]
    mem_depth = None
    backend = self._memory_backend(vae_state)
    if self.depth_model is not None and backend.reads_depth:
      mem, cov, mem_depth = backend.read(carry["memory"], Kc, c2wc, with_depth=True)
    else:
      mem, cov = backend.read(carry["memory"], *self.read_cameras(chunk))
    scene = wan_mirage.memory_scene(mem, cov)
    hist, count = carry["hist"], carry["count"]
    # Chunk 0's latent 0 is frame 0's: it is generated with this chunk's read.
    hist_scene = jnp.where(chunk["first"], carry["hist_scene"].at[-1].set(scene[0]),
                           carry["hist_scene"])
    # Preceding: the n_p <= P latents before the newest, oldest first, then padding.
    n_p = jnp.clip(count - 1, 0, P)
    take = jnp.clip(P - n_p + jnp.arange(P), 0, P)
    prec, prec_scene = hist[take], hist_scene[take]
    refs = jnp.zeros((R,) + scene.shape[1:], jnp.float32)
    n_r = jnp.zeros((), jnp.int32)
    if R:
      bank = carry["bank"]
      found_lat, _, _, _, found = memory_lib.references.retrieve_references(bank, bank.valid, Kc, c2wc, R)
      # found is a prefix (best first); chunk 0 takes none, as the reference.
      n_r = jnp.where(chunk["first"], 0, jnp.sum(found)).astype(jnp.int32)
      refs = found_lat[jnp.clip(jnp.arange(R) - (R - n_r), 0, R - 1)]
    frame_mask = jnp.concatenate([jnp.arange(R) >= R - n_r, jnp.ones((L,), bool),
                                  jnp.arange(P) < n_p])
    vace = (wan_mirage.vace_context(jnp.concatenate([scene, prec_scene], 0)[None], control)
            if self.uses_memory else None)
    key, sub = jax.random.split(jax.random.wrap_key_data(carry["rng"]))
    noise = jax.random.normal(sub, (1, L) + scene.shape[1:], jnp.float32)
    lat = self._sample_impl(dit_state, noise, hist[-1][None, None], refs[None], prec[None], vace,
                            text, empty_text, frame_mask[None])[0]
    rgb = nnx.merge(self.vae_graphdef, vae_state).tiled_decode(lat[None])[0]

    # Latents 1.. are new (chunk 0's latent 0 is frame 0's, written by _start_impl).
    w_lat = lat[1:]
    if oracle:
      w_lat = jnp.where(chunk["use"][1:, None, None, None], chunk["o_lat"][1:], w_lat)
    fit = carry.get("depth_fit")
    observed = True
    if self.depth_model is None:
      w_depth, observed = chunk["depth"][1:], chunk["valid"][1:]
    else:  # latent k stands for the chunk's video frame 4k (decoded rgb[4k])
      frames = rgb[st.temporal * jnp.arange(1, L)]
      w_depth, fit, aligned = self.depth_model.chunk(
          depth_state, frames, None if mem_depth is None else mem_depth[1:], cov[1:], fit)
      if oracle:  # ground-truth latents go with their ground-truth depth
        w_depth = jnp.where(chunk["use"][1:, None, None], chunk["o_depth"][1:], w_depth)
        observed = jnp.where(chunk["use"][1:, None, None], chunk["o_valid"][1:], True)
    real = jnp.arange(1, L) <= chunk["real"]
    # (L - 1, H, W): no moving-content mask, every observed pixel of the real latents.
    static = jnp.broadcast_to(real[:, None, None] & observed, (L - 1,) + self.image_hw)
    write = (w_depth, Kc[1:], c2wc[1:], static, chunk["frame"][1:])
    # rgb_points keeps the decoded frame each new latent stands for (video frame 4k).
    w_rgb = self._rgb01(rgb[st.temporal * jnp.arange(1, L)]) if self.reads_video else None
    new = dict(carry, rng=jax.random.key_data(key),
               memory=backend.write(carry["memory"], w_lat, *write, rgb=w_rgb))
    if fit is not None:
      new["depth_fit"] = fit
    if R:  # padded latents take a slot with no valid point: nothing retrieves them
      new["bank"] = memory_lib.frame_bank.write(carry["bank"], w_lat, *write)
    # The last P + 1 of [history, the chunk's real new latents] (generated, not ground truth).
    last = lambda old, x: jax.lax.dynamic_slice_in_dim(jnp.concatenate([old, x], 0),
                                                       chunk["real"], P + 1)
    new.update(hist=last(hist, lat[1:]), hist_scene=last(hist_scene, scene[1:]),
               count=count + chunk["real"])
    new = jax.tree.map(lambda a, b: jnp.where(chunk["active"], a, b), new, carry)
    out = dict(rgb=rgb, coverage=cov, latents=lat, references=n_r)
    if self.depth_model is not None:
      out.update(depth=w_depth, aligned=aligned)
    return new, out

  def _encode_impl(self, vae_state, frames):
    """(F, H, W, 3) in [-1, 1], F = 4k + 1 -> (k + 1, h, w, 48) float32 latents (tiled)."""
    vae = nnx.merge(self.vae_graphdef, vae_state)
    return vae.tiled_encode(frames[None])[0].astype(jnp.float32)

  # --------------------------------------------------------------------------- the driver's

  def params(self) -> tuple:
    st = self.settings
    control = self.control(st.latents + st.preceding_latents) if self.uses_memory else None
    depth_state = None if self.depth_model is None else self.depth_model.state
    return (self.vae_state, self.dit_state, control, self.text, self.empty_text, depth_state)

  def start(self, params, state, frame0, depth0, valid0, K0, c2w0, rng):
    return self._start_impl(params[0], params[5], state, frame0, depth0, valid0, K0, c2w0, rng)

  def step(self, params, carry, chunk, *, oracle: bool):
    return self._chunk_impl(*params, carry, chunk, oracle=oracle)

  def encode_oracle(self, params, arrays):
    """arrays: (video (C, H, W, 3) in [-1, 1],) -> (L, h, w, 48) latents."""
    return self._encode_impl(params[0], *arrays)

  @property
  def frames_per_chunk(self) -> int:
    """Video frames each chunk adds (C - 1: later chunks repeat the previous last frame)."""
    return self.settings.new_frames

  def num_chunks(self, num_frames: int) -> int:
    return len(self.plan(num_frames))

  def chunk_inputs(self, c, lengths, num_chunks, Ks, poses, depths, valids):
    """Chunk ``c``'s latents go with video frames ``c (C - 1) + 4k`` (unclipped; cameras and
    depths past a row's end repeat its last); ``real``: latents 1..real lie inside the row."""
    st = self.settings
    L, C = st.latents, st.chunk_frames
    Bp = len(lengths)
    idx = np.asarray(memory_lib.mirage.latent_frame_indices(C, st.temporal, start=c * st.new_frames))
    cams = np.minimum(idx[None], lengths[:, None] - 1)  # (Bp, L): past the end, the last
    real = np.sum(idx[None, 1:] < lengths[:, None], axis=1)
    chunk = dict(K=np.stack([Ks[r][i] for r, i in enumerate(cams)]),
                 c2w=np.stack([poses[r][i] for r, i in enumerate(cams)]),
                 frame=np.broadcast_to(idx, (Bp, L)).astype(np.int32),
                 first=np.full((Bp,), c == 0), real=real.astype(np.int32),
                 active=c < num_chunks)
    if self.needs_depths:
      chunk["depth"] = np.stack([depths[r][i] for r, i in enumerate(cams)])
      chunk["valid"] = world_model.observed_rows(valids, cams, self.image_hw)
    if self.reads_video:  # rgb_points renders every video frame of the chunk
      vids = np.minimum(idx[0] + np.arange(C)[None], lengths[:, None] - 1)  # (Bp, C)
      chunk["K_video"] = np.stack([Ks[r][i] for r, i in enumerate(vids)])
      chunk["c2w_video"] = np.stack([poses[r][i] for r, i in enumerate(vids)])
    return chunk, dict(idx=idx, real=real, start=c * st.new_frames, active=c < num_chunks)

  def oracle_chunk(self, encode, gts, order, plan, given, ctx_given) -> dict[str, Any]:
    """use (Bp, L) and o_lat (Bp, L, h, w, 48), the chunk's ground-truth video frames
    encoded (zeros when no row takes ground truth in this chunk); with a depth model, o_depth
    (Bp, L, H, W) their ground-truth depth and o_valid (Bp, L, H, W) where it was observed
    (the given depth's rows write with ``depth`` and ``valid``)."""
    h, w = self.image_hw
    st = self.settings
    idx = plan["idx"]
    Bp, L = len(order), st.latents
    use = idx[None] < given[:, None]  # (Bp, L)
    extra = {}
    if self.depth_model is not None:
      o_depth = np.ones((Bp, L, h, w), np.float32)
      o_valid = np.ones((Bp, L, h, w), bool)
      for row, b in enumerate(order):
        if given[row]:
          o_depth[row] = gts[b][1][np.minimum(idx, given[row] - 1)]
          if gts[b][2] is not None:
            o_valid[row] = gts[b][2][np.minimum(idx, given[row] - 1)]
      extra.update(o_depth=o_depth, o_valid=o_valid)
    if not use.any():
      lh, lw = self.latent_hw
      return dict(use=use, o_lat=np.zeros((Bp, L, lh, lw, wan_mirage.LATENT_CHANNELS),
                                          np.float32), **extra)
    video = np.zeros((Bp, st.chunk_frames, h, w, 3), np.float32)
    for row, b in enumerate(order):
      if given[row] and use[row].any():  # padded with the last ground-truth frame
        gi = np.minimum(np.arange(idx[0], idx[0] + st.chunk_frames), given[row] - 1)
        video[row] = gts[b][0][gi].astype(np.float32) / 127.5 - 1.0
    return dict(use=use, o_lat=encode((video,)), **extra)

  def written(self, chunk, out) -> tuple:
    lat = out["latents"][:, 1:]
    if "use" in chunk:
      lat = jnp.where(chunk["use"][:, 1:, None, None, None], chunk["o_lat"][:, 1:], lat)
    L = self.settings.latents
    real = jnp.arange(1, L)[None] <= chunk["real"][:, None]
    static = jnp.broadcast_to(real[..., None, None], real.shape + self.image_hw)
    depth = chunk["depth"][:, 1:] if self.depth_model is None else out["depth"]
    rgb = (self._rgb01(out["rgb"][:, self.settings.temporal * np.arange(1, L)])
           if self.reads_video else None)
    return (lat, depth, chunk["K"][:, 1:], chunk["c2w"][:, 1:], static,
            chunk["frame"][:, 1:], rgb)

  def trajectory_result(self, b, T, first, outs, plans, carry) -> dict[str, Any]:
    """frames (T, H, W, 3) uint8 (truncated, as the reference), depths None, coverage
    (T, h, w) of the latent each frame belongs to, num_references (per chunk), latent_frames,
    and zeros for the small family's moving-content outputs (see ``rollout.Rollout.generate``).
    With a depth model also latent_depths (len(latent_frames), H, W) the depth each latent
    frame was written with (estimated and aligned; frame 0's given when given) and
    depth_aligned (len(latent_frames),) bool those fitted to the memory's own depth."""
    st = self.settings
    C = st.chunk_frames
    lh, lw = self.latent_hw
    rgb, cov, latent_frames = [], [], [0]
    chunks = [(o, p) for o, p in zip(outs, plans) if p["active"][b]]
    for c, (o, p) in enumerate(chunks):
      start = p["start"]
      first_out = 0 if c == 0 else 1  # later chunks repeat the previous chunk's last frame
      vids = np.arange(start + first_out, start + C)
      vids = vids[vids < T]
      rgb.append(o["rgb"][b][vids - start])
      # Video frame f of the chunk belongs to latent ceil((f - start) / 4).
      cov.append(o["coverage"][b][-(-(vids - start) // st.temporal)])
      latent_frames.extend(int(start + st.temporal * k) for k in range(1, p["real"][b] + 1))
    rgb_all = np.concatenate(rgb, 0).astype(np.float32)
    cov_all = np.concatenate(cov, 0).astype(np.float32)
    cov_all[0] = 1.0
    extra = {}
    if self.depth_model is not None:
      extra["latent_depths"] = np.concatenate(
          [first["depth"][b][None]] + [o["depth"][b][:p["real"][b]] for o, p in chunks], 0)
      extra["depth_aligned"] = np.concatenate(
          [[False]] + [o["aligned"][b][:p["real"][b]] for o, p in chunks], 0)
    return dict(
        **extra,
        # Truncation, as the reference's uint8 conversion.
        frames=np.floor((np.clip(rgb_all, -1, 1) + 1.0) * 127.5).astype(np.uint8),
        depths=None,
        coverage=cov_all,
        num_references=[int(o["references"][b]) for o, _ in chunks],
        latent_frames=np.asarray(latent_frames, np.int32),
        dynamic=np.zeros((T, lh, lw), np.float32),
        object_positions=np.zeros((T, 0, 3), np.float32),
        object_idents=np.zeros((T, 0), np.int32),
        object_bytes=0,
    )


def text_setting(config: ml_collections.ConfigDict, field: str) -> tuple[str, str]:
  """(value, where) of ``denoiser.<field>`` (``empty_text``, ``text_encoder``, ``tokenizer``):
  the config's, else the newest along its base export chain (a fine-tune export finds what
  ``convert_wan`` stored with its base); ('', '') when none sets it."""
  d = wan_mirage.upgrade(config).denoiser
  if d[field]:
    return d[field], f"denoiser.{field}"
  if d.base_checkpoint:
    for path, c in exports.export_chain(d.base_checkpoint, config.denoiser.model)[::-1]:
      value = wan_mirage.upgrade(c).denoiser[field]
      if value:
        return value, f"denoiser.{field}"
  return "", ""


_ZEROS_WARNED = []


def _warn_zeros(what: str) -> None:
  if not _ZEROS_WARNED:  # once per process: a training run asks on every restart only
    _ZEROS_WARNED.append(what)
    logging.warning("no umT5 text encoder and no empty-prompt embedding are known: %s uses "
                    "ZEROS as the empty prompt (umT5 of \"\" is not zeros). Give "
                    "--text_encoder=<convert_text export> and --tokenizer=<google/umt5-xxl "
                    "folder> (or --empty_text_embedding), or convert/export the DiT with "
                    "them.", what)


class TextEncoders:
  """The prompt encoder of a Wan-family config, loaded on first use: ``--text_encoder`` /
  ``--tokenizer`` (``text_encoder``, ``tokenizer``), else the config's (or its base
  chain's) ``denoiser.text_encoder`` / ``denoiser.tokenizer``. Its width is checked against
  the DiT's ``text_dim`` before its params load."""

  def __init__(self, config: ml_collections.ConfigDict, text_encoder: str | None = None,
               tokenizer: str | None = None):
    self.text_dim = int(config.denoiser.model.text_dim)
    self.length = text_length(config)  # prompts truncated to the DiT's text input
    self.encoder = (text_encoder, "--text_encoder") if text_encoder else text_setting(
        config, "text_encoder")
    self.tokenizer = (tokenizer, "--tokenizer") if tokenizer else text_setting(
        config, "tokenizer")
    self._loaded = None

  @property
  def known(self) -> bool:
    return bool(self.encoder[0] and self.tokenizer[0])

  def get(self, why: str):
    """The ``prompts.PromptEncoder``; ``why``: what needs it (named in the error)."""
    if self._loaded is not None:
      return self._loaded
    from mirage_jax.text import prompts  # pylint: disable=g-import-not-at-top
    for (value, _), flag in ((self.encoder, "--text_encoder"), (self.tokenizer, "--tokenizer")):
      if not value:
        raise InputError(flag, flag[2:], f"{why} needs the umT5 text encoder (a "
                         "convert_text export) and its tokenizer folder: give --text_encoder "
                         "and --tokenizer, or convert the DiT with them")
    prompts.check_width(self.encoder[0], self.text_dim)
    self._loaded = prompts.PromptEncoder(self.encoder[0], self.tokenizer[0], length=self.length)
    return self._loaded


def empty_prompt(config: ml_collections.ConfigDict, encoders: TextEncoders | None = None,
                 what: str = "generation") -> tuple[np.ndarray | None, str]:
  """(text_len, text_dim) umT5 embedding of "" (zero-padded) and where it came from: the config's (or its base
  chain's) ``denoiser.empty_text`` file, else the known text encoder's ``empty()``; (None,
  '') with a warning (once) when neither is known, and the caller uses zeros."""
  dim, length = int(config.denoiser.model.text_dim), text_length(config)
  path, where = text_setting(config, "empty_text")
  if path:
    return load_text_embedding(path, dim, where, length), path
  encoders = encoders or TextEncoders(config)
  if encoders.known:
    return load_or_pad(encoders.get("the empty prompt").empty(), dim, length), encoders.encoder[0]
  _warn_zeros(what)
  return None, ""


def rollout_options(config: ml_collections.ConfigDict, caption: str | None,
                    empty_text: str | None, guidance_scale: float | None, *,
                    prompt: str | None = None, negative_prompt: str | None = None,
                    text_encoder: str | None = None, tokenizer: str | None = None) -> dict:
  """:class:`WanRollout` keyword arguments from the command line: the text (``prompt``
  encoded, or the ``caption`` embedding file; neither: the empty prompt), the CFG negative
  (``negative_prompt`` encoded, else the empty prompt) and the guidance scale.

  The empty prompt: the ``empty_text`` file, else :func:`empty_prompt`. Files are checked
  against the DiT's text_dim, the encoder's width too; a bad one is a one-line error naming
  it and the field.
  """
  if caption and prompt is not None:
    raise InputError("--prompt", "prompt", "give --prompt (or --prompt_file) or "
                     "--caption_embedding, not both")
  dim, length = int(config.denoiser.model.text_dim), text_length(config)
  encoders = TextEncoders(config, text_encoder, tokenizer)
  if caption:
    text = load_text_embedding(caption, dim, "--caption_embedding", length)
  elif prompt is not None:
    text = encoders.get("--prompt").encode([prompt])[0]
  else:
    text = None
  if empty_text:
    empty = load_text_embedding(empty_text, dim, "--empty_text_embedding", length)
  else:
    empty, _ = empty_prompt(config, encoders)
  if negative_prompt is not None:
    negative = encoders.get("--negative_prompt").encode([negative_prompt])[0]
    if text is None:  # the text stays the empty prompt, not the negative one
      text = empty if empty is not None else np.zeros((1, dim), np.float32)
  else:
    negative = empty
  return dict(text=text, empty_text=negative, guidance_scale=guidance_scale)


def load_or_pad(emb: np.ndarray, text_dim: int, length: int = TEXT_TOKENS) -> np.ndarray:
  """An in-memory (Lt, text_dim) embedding checked and zero-padded to (length, text_dim)."""
  emb = np.asarray(emb, np.float32)
  if emb.ndim != 2 or emb.shape[1] != text_dim or not 1 <= emb.shape[0] <= length:
    raise InputError("text embedding", "text", f"expected (Lt <= {length}, {text_dim}), "
                     f"got {emb.shape}")
  out = np.zeros((length, text_dim), np.float32)
  out[:len(emb)] = emb
  return out


def load_vae(config: ml_collections.ConfigDict, autoencoder_export: str | None = None,
                 denoiser_export: str | None = None) -> nnx.Module:
  """The Wan VAE of a Wan-family ``config`` (an export's, or a fine-tuning run's).

  From ``autoencoder_export``, else ``config.denoiser.autoencoder_checkpoint``, else the first
  ``denoiser.autoencoder_checkpoint`` along the export chain of ``denoiser_export`` (default:
  ``config.denoiser.base_checkpoint``, the base a fine-tuning run trains on), newest first.
  It must be a Wan-family autoencoder export of ``config.autoencoder``.
  """
  d = wan_mirage.upgrade(config).denoiser
  ae_path = autoencoder_export or d.autoencoder_checkpoint
  start = denoiser_export or d.base_checkpoint
  if not ae_path and start:
    chain = exports.export_chain(start, config.denoiser.model)[::-1]
    ae_path = next((c.denoiser.autoencoder_checkpoint for c in
                    (wan_mirage.upgrade(c) for _, c in chain)
                    if c.denoiser.autoencoder_checkpoint), None)
  if not ae_path:
    raise InputError(start or "config.denoiser", "denoiser.autoencoder_checkpoint",
                     "empty along the export chain: give --autoencoder")
  vae, ae_config = wan_vae.load_export(ae_path, "denoiser.autoencoder_checkpoint")
  # As JSON: an export's lists stand for a live config's tuples.
  if json.loads(ae_config.autoencoder.to_json()) != json.loads(config.autoencoder.to_json()):
    raise InputError(ae_path, "autoencoder", "not the VAE this DiT was exported with")
  return vae
