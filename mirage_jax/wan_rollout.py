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
             ``wan_mirage.vace_context([target_scene | preceding_scene], control)``; FlowUniPC
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
``denoiser.text_len`` tokens (512, as the reference's prompter pads). Without a caption, the
empty-prompt embedding is used; it is all zeros unless a file with the real one (umT5 of "")
is given (``--empty_text_embedding``, or the config's ``denoiser.empty_text``). No text
encoder runs here.

Shapes. Chunk 0 has (R, P) = (0, 0); later chunks P fixed and R in 0..max (the reference's
number of references passing the IoU threshold), so a trajectory of any length compiles at
most ``max_references + 2`` chunk functions, each once. The last chunk is padded to L latents
with the last camera (as the reference cannot: it shortens its last chunk); padded latents
are neither written to memory nor returned.

Every backend is written with everything generated (the reference's rule; the small
family's ``write_new_only`` and dynamic masking are not applied), and ``rgb_points`` is not
supported (it would re-encode rendered RGB through the VAE per read).

Differences from the reference, on purpose or by necessity: given depth instead of
MapAnything (above); a padded last chunk; retrieval scores each past latent by the voxel
IoU of its OWN lifted points (the reference: the whole cloud's points inside that frame's
frustum at the time it was written) and keeps a ring buffer of ``reference_bank`` latents
(the reference keeps all); uint8 frames by truncation as the reference (``.byte()``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from mirage_jax import diffusion, geometry, wan_mirage
from mirage_jax import memory as memory_lib
from mirage_jax.errors import InputError

TEXT_TOKENS = 512  # the reference's umT5 sequence length


def is_wan(config: ml_collections.ConfigDict) -> bool:
  """Whether a denoiser config is of the Wan family (``denoiser.model.family == 'wan'``)."""
  return config.denoiser.model.get("family", "small") == "wan"


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
  from mirage_jax.models import wan_vae  # pylint: disable=g-import-not-at-top
  d = config.denoiser
  temporal = wan_vae.temporal_factor(config.autoencoder)
  chunk = int(d.target_frames)
  if chunk < temporal + 1 or (chunk - 1) % temporal:
    raise InputError("config.denoiser", "target_frames", f"the Wan family generates chunks of "
                     f"{temporal}N+1 video frames (N >= 1; the reference: 33), got {chunk}")
  preceding = int(d.get("preceding_frames", 8))
  refs = int(d.get("reference_frames", 0))
  bank = int(d.get("reference_bank", 16))
  if preceding < 0:
    raise InputError("config.denoiser", "preceding_frames", f"must be >= 0, got {preceding}")
  if refs < 0:
    raise InputError("config.denoiser", "reference_frames", f"must be >= 0, got {refs}")
  if refs and bank < refs:
    raise InputError("config.denoiser", "reference_bank",
                     f"must be >= reference_frames ({refs}), got {bank}")
  return WanSettings(chunk, temporal, math.ceil(preceding / temporal), refs, bank)


def memory_config(config: ml_collections.ConfigDict, **overrides) -> memory_lib.MemoryConfig:
  """The memory settings of a Wan-family ``config`` (``wan_mirage.memory_config``: latents at
  1/16 of the image, 48 channels) with ``overrides`` (e.g. ``capacity``)."""
  h, w = (int(r) for r in config.data.resolution)
  if h % 16 or w % 16:
    raise InputError("config.data", "resolution", f"must be multiples of 16 for the Wan VAE, "
                     f"got {(h, w)}")
  return dataclasses.replace(wan_mirage.memory_config(config), **overrides)


def text_length(config: ml_collections.ConfigDict) -> int:
  """Tokens of the DiT's text input (``denoiser.text_len``; the reference's umT5: 512)."""
  return int(config.denoiser.get("text_len", TEXT_TOKENS))


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
  if not os.path.isfile(path):
    raise InputError(path, field, "no such file (a .npy of shape (Lt, text_dim))")
  try:
    emb = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise InputError(path, field, f"not a readable .npy ({e})") from None
  if not isinstance(emb, np.ndarray) or emb.ndim != 2 or emb.shape[1] != text_dim or not (
      1 <= emb.shape[0] <= length):
    raise InputError(path, field, f"expected shape (Lt <= {length}, {text_dim}), got "
                     f"{getattr(emb, 'shape', None)}")
  if not np.issubdtype(emb.dtype, np.floating) or not np.all(np.isfinite(emb)):
    raise InputError(path, field, f"expected finite floats, got dtype {emb.dtype}")
  return load_or_pad(emb, text_dim, length)


@dataclasses.dataclass
class ChunkTiming:
  memory_seconds: float  # read + write (+ reference retrieval)
  chunk_seconds: float  # read + denoise + decode + write
  cache_bytes: int


class WanRollout:
  """Generates along trajectories with a Wan-family export (see the module docstring).

  Args:
    config: the export's config (``denoiser.model.family == 'wan'``).
    vae: ``models.wan_vae.WanVAE``. dit: ``models.wan_dit.WanDiT`` (with its VACE branch).
    backend: memory backend name (default ``config.memory.backend``; ``mirage`` is the
      reference's splat, ``voxel`` ours in the same slot).
    text: (Lt, text_dim) caption embedding (padded to text_len) or None (the empty prompt).
    empty_text: (Lt, text_dim) the empty-prompt embedding, or None (zeros).
    guidance_scale: CFG scale (> 0 turns CFG on, negative = ``empty_text``); None: the
      config's ``sampler.guidance_scale`` (0 = off, the reference's default).
    memory_overrides: fields of ``MemoryConfig`` to change (e.g. ``capacity``).
  """

  needs_depths = True  # generate() wants the depth of every frame (see the module docstring)

  def __init__(self, config: ml_collections.ConfigDict, vae: nnx.Module, dit: nnx.Module,
               backend: str | None = None, *, text: np.ndarray | None = None,
               empty_text: np.ndarray | None = None, guidance_scale: float | None = None,
               **memory_overrides):
    if not is_wan(config):
      raise InputError("config.denoiser.model", "family", "WanRollout needs a Wan-family "
                       f"export, got {config.denoiser.model.get('family', 'small')!r}")
    if dit.vace is None:
      raise InputError("config.denoiser.model", "vace", "the DiT has no VACE branch: the "
                       "memory has no way in (convert with --vace)")
    self.config = config
    self.settings = wan_settings(config)
    self.chunk = self.settings.chunk_frames
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
    self.memory_cfg = memory_config(config, **memory_overrides)
    self.image_hw = (self.memory_cfg.image_height, self.memory_cfg.image_width)
    self.latent_hw = (self.memory_cfg.latent_height, self.memory_cfg.latent_width)
    self.mask_dynamic = self.object_slots = False  # moving content: not handled on Wan yet
    text_dim, length = int(config.denoiser.model.text_dim), text_length(config)
    pad = lambda e: load_or_pad(np.zeros((1, text_dim)) if e is None else e, text_dim, length)
    self.empty_text = jnp.asarray(pad(empty_text))[None]  # (1, length, text_dim)
    # No caption: the empty prompt, as the reference's "" (its embedding, zeros by default).
    self.text = jnp.asarray(pad(text))[None] if text is not None else self.empty_text
    self.vae = vae
    self.dit_graphdef, self.dit_state = nnx.split(dit)
    self.backend = memory_lib.get_backend(self.backend_name, encode_fn=self._no_rgb_encoder)
    self._read = jax.jit(self.backend.read)
    self._write = jax.jit(self.backend.write)
    self._sample = jax.jit(self._sample_impl)
    self._control: dict[int, jax.Array] = {}
    if self.settings.max_references:
      from mirage_jax import rollout  # pylint: disable=g-import-not-at-top
      self._bank_init = lambda: rollout.reference_bank_init(self.memory_cfg,
                                                            self.settings.reference_bank)
      self._bank_write = jax.jit(memory_lib.baselines.frame_bank_write)
      k = min(self.settings.max_references, self.settings.reference_bank)
      self._retrieve = jax.jit(lambda bank, K, c2w: rollout.retrieve_references(
          bank, bank.valid, K, c2w, k))

  def _no_rgb_encoder(self, rgb01):
    raise InputError("--memory", "memory", "rgb_points re-encodes rendered RGB, which the Wan "
                     "rollout does not support; use mirage, voxel, frame_bank or none")

  # --------------------------------------------------------------------------- pieces

  def control(self, num_latents: int) -> jax.Array:
    """(F, h, w, 48) encoded all-ones control video for F latent frames (cached per F)."""
    if num_latents not in self._control:
      self._control[num_latents] = wan_mirage.control_latents(self.vae, num_latents,
                                                              *self.latent_hw)
    return self._control[num_latents]

  def vace_input(self, scene: jax.Array) -> jax.Array:
    """Memory reads of target + preceding frames (F, h, w, 48) -> VACE input (1, F, h, w, 96)."""
    return wan_mirage.vace_context(scene.astype(jnp.float32)[None], self.control(scene.shape[0]))

  def _sample_impl(self, dit_state, noise, first, references, preceding, vace, text, empty_text):
    """One chunk's latents from noise.

    Args:
      noise: (1, L, h, w, 48). first: (1, 1, h, w, 48) the clean latent 0.
      references: (1, R, h, w, 48). preceding: (1, P, h, w, 48) clean latents.
      vace: (1, L + P, h, w, 96). text, empty_text: (1, text_len, text_dim).
    Returns:
      (1, L, h, w, 48) float32, latent 0 = ``first``.
    """
    dit = nnx.merge(self.dit_graphdef, dit_state)
    r, p, length = references.shape[1], preceding.shape[1], noise.shape[1]

    def model_fn(x, timestep, conditioned=True):
      sigma = jnp.full((1, length), timestep / wan_mirage.NUM_TRAIN_TIMESTEPS, jnp.float32)
      # The DiT sees the reference's integer timesteps: rounding undoes the float32 trip
      # through sigma (1000 * (989 / 1000) is 989.00006 in float32).
      t = jnp.round(wan_mirage.frame_timesteps(sigma.at[:, 0].set(0.0), r, p))
      out = dit(wan_mirage.assemble(references, x, preceding), t,
                text if conditioned else empty_text, num_reference=r, vace_context=vace)
      return out[:, r:r + length]

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
    return [memory_lib.latent_frame_indices(st.chunk_frames, st.temporal, start=i * st.new_frames)
            for i in range(chunks)]

  # --------------------------------------------------------------------------- driver

  def generate(self, first_frame: np.ndarray, first_depth: np.ndarray, intrinsics: np.ndarray,
               poses_c2w: np.ndarray, *, depths: np.ndarray | None = None, seed: int = 0,
               progress: bool = True,
               oracle_frames: tuple[np.ndarray, np.ndarray] | None = None,
               initial_memory: Any = None, timed: bool = False) -> dict[str, Any]:
    """Generates frames 1..T-1 of a trajectory whose frame 0 is given.

    Args:
      first_frame: (H, W, 3) uint8 or float in [-1, 1].
      first_depth: (H, W) metric depth of frame 0 (written with it; equals ``depths[0]``).
      intrinsics: (T, 3, 3) at the model's image resolution. poses_c2w: (T, 4, 4) OpenCV.
      depths: (T, H, W) metric z-depth of every frame: each new latent is written into the
        memory with the depth of its video frame (required: see the module docstring).
      seed: sampling seed.
      oracle_frames: optional ground truth ``(frames (N, H, W, 3) uint8, depths (N, H, W))``:
        latents of video frames < N are written from the ground truth chunk encoded by the
        VAE instead of the generated ones (evaluation bounds).
      initial_memory: optional memory state to start from (frame 0 is written into it).
      timed: block inside every chunk to time its memory and whole-chunk seconds
        (``timings``); otherwise only the first chunk syncs (compilation), and the host
        waits on a chunk only where the number of retrieved references is needed.
    Returns:
      dict with frames (T, H, W, 3) uint8 (frame 0 = the decoded first-frame latent), depths
      None (the Wan VAE decodes RGB only), coverage (T, h, w) float32 (memory coverage of the
      latent each frame belongs to; frame 0: 1), timings (list of ChunkTiming, ``timed``
      only), chunk_seconds (wall seconds per chunk after the first), cache_bytes,
      reference_bytes, num_references (per chunk), latent_frames (video frame of every
      generated latent written into the memory, in order; the first frame's own write
      before chunk 0 is not listed), and for the callers of the small family: dynamic (T, h, w)
      zeros, object_positions (T, 0, 3), object_idents (T, 0), object_bytes 0.
    """
    h, w = self.image_hw
    T = poses_c2w.shape[0]
    if first_frame.shape[:2] != (h, w) or first_depth.shape != (h, w):
      raise InputError("generate", "first_frame", f"expected ({h}, {w}) to match the model, got "
                       f"{first_frame.shape[:2]} and depth {first_depth.shape}")
    if intrinsics.shape != (T, 3, 3):
      raise InputError("generate", "intrinsics", f"expected ({T}, 3, 3), got {intrinsics.shape}")
    if depths is None:
      raise InputError("generate", "depths", "the Wan rollout writes every latent with its "
                       "frame's given depth: pass the depth of all frames")
    depths = np.asarray(depths, np.float32)
    if depths.shape != (T, h, w):
      raise InputError("generate", "depths", f"expected ({T}, {h}, {w}), got {depths.shape}")
    geometry.check_poses(poses_c2w, "generate")
    if oracle_frames is not None:
      gt_rgb, gt_depth = (np.asarray(a) for a in oracle_frames)
      if gt_rgb.shape[1:] != (h, w, 3) or gt_depth.shape != gt_rgb.shape[:3] or len(gt_rgb) > T:
        raise InputError("generate", "oracle_frames", f"expected (N <= {T}, {h}, {w}, 3) frames "
                         f"and (N, {h}, {w}) depths, got {gt_rgb.shape} and {gt_depth.shape}")
    st = self.settings
    lh, lw = self.latent_hw
    K = jnp.asarray(intrinsics, jnp.float32)
    c2w = jnp.asarray(poses_c2w, jnp.float32)
    depth_all = jnp.asarray(depths)
    depth_all = depth_all.at[0].set(jnp.asarray(first_depth, jnp.float32))

    lat0 = self.encode(np.asarray(first_frame)[None])  # (1, h, w, 48)
    state = self.backend.init(self.memory_cfg) if initial_memory is None else initial_memory
    everything = lambda n: jnp.ones((n, h, w), bool)
    # The reference's LatentPointCloud.from_geometry: frame 0 with its given depth.
    state = self._write(state, lat0, depth_all[:1], K[:1], c2w[:1], everything(1),
                        jnp.zeros((1,), jnp.int32))
    bank = self._bank_init() if st.max_references else None

    rng = jax.random.key(seed)
    generated: list[jax.Array] = []  # every latent kept, in order (the reference's list)
    scenes: list[jax.Array] = []  # the memory read each was generated with
    latent_frames: list[int] = []
    frames, coverage, timings, num_refs = [], [], [], []
    plan = self.plan(T)
    t_first = t_start = time.perf_counter()
    for i, idx in enumerate(tqdm(plan, desc=f"generate wan [{self.backend_name}]",
                                 disable=not progress, unit="chunk")):
      t0 = time.perf_counter()
      cams = np.minimum(idx, T - 1)  # the last chunk is padded with the last camera
      Kc, c2wc = K[cams], c2w[cams]
      mem, cov = self._read(state, Kc, c2wc)
      scene = jnp.where(cov[..., None], mem.astype(jnp.float32), 0.0)
      first = lat0[0] if i == 0 else generated[-1]
      prec = prec_scene = refs = None
      if i and st.preceding_latents:
        stop = len(generated) - 1
        start = max(0, stop - st.preceding_latents)
        prec, prec_scene = jnp.stack(generated[start:stop]), jnp.stack(scenes[start:stop])
      if bank is not None and i:
        ref_lat, _, _, _, found = self._retrieve(bank, Kc, c2wc)
        n = int(np.sum(np.asarray(found)))  # found is a prefix: picks are best first
        refs = ref_lat[:n] if n else None
      num_refs.append(0 if refs is None else int(refs.shape[0]))
      if timed:
        jax.block_until_ready(scene)
      t_read = time.perf_counter() - t0
      rng, sub = jax.random.split(rng)
      lat = self.sample_chunk(sub, first, scene, references=refs, preceding=prec,
                              preceding_scene=prec_scene)
      rgb = self.decode(lat)  # (4L - 3, H, W, 3)
      if timed:
        jax.block_until_ready(rgb)
      t1 = time.perf_counter()

      new = slice(0, None) if i == 0 else slice(1, None)  # later chunks re-generate latent 0
      new_idx = idx[new]
      real = new_idx < T  # padded latents are never written
      w_lat = lat[new]
      if oracle_frames is not None and int(idx[0]) < len(gt_rgb):
        o_idx = np.minimum(np.arange(idx[0], idx[-1] + 1), len(gt_rgb) - 1)
        o_lat = self.encode(gt_rgb[o_idx])[new]
        use = jnp.asarray(new_idx < len(gt_rgb))[:, None, None, None]
        w_lat = jnp.where(use, o_lat, w_lat)
      w_cams = np.minimum(new_idx, T - 1)
      ids = jnp.asarray(new_idx, jnp.int32)
      static = jnp.asarray(real)[:, None, None] & everything(len(new_idx))
      state = self._write(state, w_lat, depth_all[w_cams], K[w_cams], c2w[w_cams], static, ids)
      if bank is not None:  # padded latents enter only with no valid point; nothing retrieves them
        bank = self._bank_write(bank, w_lat, depth_all[w_cams], K[w_cams], c2w[w_cams], static,
                                ids)
      if timed:
        jax.block_until_ready(jax.tree.leaves(state))
        timings.append(ChunkTiming(t_read + time.perf_counter() - t1, time.perf_counter() - t0,
                                   int(self.backend.nbytes(state))))
      elif i == 0:  # the first chunk compiles; the others are timed together
        jax.block_until_ready(jax.tree.leaves(state))
        t_first = time.perf_counter()
      n_real = int(np.sum(real))
      generated.extend(lat[new][:n_real])
      scenes.extend(scene[new][:n_real])
      latent_frames.extend(int(v) for v in new_idx[:n_real])
      # Video frames: chunk 0 all, later ones drop the repeated first frame; cut at T.
      first_out = 0 if i == 0 else 1
      vids = np.arange(int(idx[0]) + first_out, int(idx[-1]) + 1)
      keep = vids < T
      frames.append((rgb, first_out, keep))  # to the host after the last chunk
      # Frame f of the chunk belongs to latent ceil((f - start) / 4).
      coverage.append((cov, -(-(vids[keep] - int(idx[0])) // st.temporal)))

    frames, coverage = jax.device_get((frames, coverage))
    t_end = time.perf_counter()
    steady = (t_end - t_first) / (len(plan) - 1) if len(plan) > 1 else t_end - t_start
    rgb_all = np.concatenate([np.asarray(r[f:])[k] for r, f, k in frames], 0)
    cov_all = np.concatenate([np.asarray(c, np.float32)[o] for c, o in coverage], 0)
    cov_all[0] = 1.0
    return dict(
        # Truncation, as the reference's uint8 conversion.
        frames=np.floor((np.clip(rgb_all, -1, 1) + 1.0) * 127.5).astype(np.uint8),
        depths=None,
        coverage=cov_all,
        timings=timings,
        chunk_seconds=float(steady),
        cache_bytes=int(self.backend.nbytes(state)),
        reference_bytes=0 if bank is None else memory_lib.baselines.frame_bank_nbytes(bank),
        num_references=num_refs,
        latent_frames=np.asarray([0] if not latent_frames else latent_frames, np.int32),
        dynamic=np.zeros((T, lh, lw), np.float32),
        object_positions=np.zeros((T, 0, 3), np.float32),
        object_idents=np.zeros((T, 0), np.int32),
        object_bytes=0,
    )


def rollout_options(config: ml_collections.ConfigDict, caption: str | None,
                    empty_text: str | None, guidance_scale: float | None) -> dict:
  """:class:`WanRollout` keyword arguments from the command line's text-embedding files
  (checked against the DiT's text_dim; a bad file is a one-line error naming it and the
  flag's field) and guidance scale. Without ``empty_text`` the config's
  ``denoiser.empty_text`` file is used when it names one, else zeros."""
  dim, length = int(config.denoiser.model.text_dim), text_length(config)
  flag = "--empty_text_embedding"
  if not empty_text and config.denoiser.get("empty_text"):
    empty_text, flag = config.denoiser.empty_text, "denoiser.empty_text"
  return dict(
      text=(load_text_embedding(caption, dim, "--caption_embedding", length) if caption
            else None),
      empty_text=load_text_embedding(empty_text, dim, flag, length) if empty_text else None,
      guidance_scale=guidance_scale)


def load_or_pad(emb: np.ndarray, text_dim: int, length: int = TEXT_TOKENS) -> np.ndarray:
  """An in-memory (Lt, text_dim) embedding checked and zero-padded to (length, text_dim)."""
  emb = np.asarray(emb, np.float32)
  if emb.ndim != 2 or emb.shape[1] != text_dim or not 1 <= emb.shape[0] <= length:
    raise InputError("text embedding", "text", f"expected (Lt <= {length}, {text_dim}), "
                     f"got {emb.shape}")
  out = np.zeros((length, text_dim), np.float32)
  out[:len(emb)] = emb
  return out


def load_wan_world_model(denoiser_export: str, autoencoder_export: str | None = None):
  """(config, vae, dit) of a Wan-family export: a ``convert_wan`` DiT export or a fine-tune
  export of one (``wan_mirage.load_dit`` follows ``denoiser.base_checkpoint``).

  The VAE comes from ``autoencoder_export``, else the first ``denoiser.autoencoder_checkpoint``
  along the export chain (newest first; ``convert_wan`` sets it on the root export); it must be
  a Wan-family autoencoder export with the config the DiT was exported with.
  """
  from mirage_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from mirage_jax.models import wan_vae  # pylint: disable=g-import-not-at-top
  dit, config = wan_mirage.load_dit(denoiser_export)
  ae_path = autoencoder_export
  if not ae_path:
    chain = wan_mirage.export_chain(denoiser_export, config.denoiser.model)[::-1]
    ae_path = next((c.denoiser.get("autoencoder_checkpoint") for _, c in chain
                    if c.denoiser.get("autoencoder_checkpoint")), None)
  if not ae_path:
    raise InputError(denoiser_export, "denoiser.autoencoder_checkpoint",
                     "empty along the export chain: give --autoencoder")
  vae_params, ae_config, _ = checkpoint.load_export(ae_path)
  if ae_config.stage != "autoencoder":
    raise InputError(ae_path, "stage", f"expected an autoencoder export, got {ae_config.stage!r}")
  ae_family = ae_config.autoencoder.get("family", "small")
  if ae_family != "wan":
    raise InputError(ae_path, "autoencoder.family", f"the Wan DiT {denoiser_export} needs the "
                     f"Wan VAE, this export is family {ae_family!r}")
  if ae_config.autoencoder.to_dict() != config.autoencoder.to_dict():
    raise InputError(ae_path, "autoencoder", "not the VAE this DiT was exported with")
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: wan_vae.WanVAE(config.autoencoder, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, vae_params)
  return config, nnx.merge(graphdef, state), dit
