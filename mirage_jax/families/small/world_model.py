"""The small family's world model: RGB-D autoencoder + DiT behind ``world_model.WorldModel``.

Per chunk of ``target_frames`` cameras, ONE jitted call (:meth:`WorldModel.step`, run by the
driver ``mirage_jax.rollout.Rollout``):

  1. read     the memory into the chunk's cameras -> projected latents + coverage;
  2. denoise  from noise with the DiT, conditioned on memory (object slots drawn over it),
              Plücker rays and clean context (t = 0): ``reference_frames`` earlier latents
              retrieved by voxel IoU (the reference's rule,
              ``memory.references.retrieve_references``), then the last ``context_frames``
              generated latents; then decode RGB-D;
  3. write    the new latents back into memory with the *generated* depth (no external depth
              model; with ``config.memory.depth_from_memory``, tied to the memory's depth
              where the read covers, ``conditioning.anchor_depth``), leaving out cells the
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

The memory backend (``voxel`` ours, ``mirage`` the reference's append-only cloud, the
baselines) is chosen by name. Steps 1-2 build the DiT's inputs with
``conditioning.dit_inputs`` (object slots over the read, reference retrieval, context with
references first, Plücker rays) and sample with ``conditioning.sample``: the denoiser stage's
loss (``stages.DenoiserStage``) calls the same two functions on memory written with the same
``conditioning.memory_config`` + write/read, so the model is trained as it is run.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from data_pipelines import clip as clip_lib
from mirage_jax import checkpoint, families, world_model
from mirage_jax import memory as memory_lib
from mirage_jax.depth import estimator as depth_estimator
from mirage_jax.errors import InputError
from mirage_jax.families.small import autoencoder, conditioning, denoiser
from mirage_jax.memory import objects as objects_lib


def load_model(path: str, shardings: Any = None) -> tuple[nnx.Module, ml_collections.ConfigDict]:
  """The trained model of a small-family export (autoencoder or denoiser, by its stage).

  Args:
    path: export directory (``python -m mirage_jax.export``), local or gs://.
    shardings: optional params shardings (see ``checkpoint.load_export``).
  Returns:
    (model with the exported params, the training config).
  """
  params, config, _ = checkpoint.load_export(path, shardings)
  builds = {"autoencoder": lambda: autoencoder.Autoencoder(config.autoencoder, nnx.Rngs(0)),
            "denoiser": lambda: denoiser.Denoiser(config.denoiser.model, nnx.Rngs(0))}
  if config.stage not in builds:
    raise InputError(path, "stage", f"unknown stage {config.stage!r} in the export's config")
  graphdef, state = nnx.split(nnx.eval_shape(builds[config.stage]))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state), config


class WorldModel(world_model.WorldModel):
  """One autoencoder, one denoiser and one memory backend (see the module docstring).

  Args:
    config: the denoiser's training config (sizes, sampler, memory settings); upgraded
      (:meth:`upgrade`) here.
    ae: the trained autoencoder. dn: the trained denoiser.
    backend: memory backend name (default ``config.memory.backend``).
    mask_dynamic: keep cells the autoencoder's dynamic head marks as moving out of the
      static memory (default: the backend is in ``config.memory.mask_dynamic``); needs a
      model with the head.
    object_slots: carry moving content in object slots (default: the backend is in
      ``config.objects.backends``); implies ``mask_dynamic``.
    text, empty_text, guidance_scale: the Wan family's options, refused when given.
    memory_overrides: fields of ``MemoryConfig`` to change (e.g. ``capacity``).
  """

  name = "small"
  needs_depths = False
  has_depth_head = True
  moving_content = True
  given_context = True
  benchmarks = ("revisit", "memory_maze", "objects", "scaling")
  depth_estimators = ("decoder", "given", "depth_anything")

  def __init__(self, config: ml_collections.ConfigDict, ae: nnx.Module, dn: nnx.Module,
               backend: str | None = None, *, mask_dynamic: bool | None = None,
               object_slots: bool | None = None, text=None, empty_text=None,
               guidance_scale: float | None = None,
               depth: depth_estimator.DepthOptions | None = None, **memory_overrides):
    for flag, value in (("caption_embedding", text), ("empty_text_embedding", empty_text),
                        ("guidance_scale", guidance_scale)):
      if value is not None:
        raise InputError(f"--{flag}", flag, "only the Wan family takes it; this export is of "
                         "the small family")
    config = self.upgrade(config)
    if config.family != self.name:
      raise InputError("config.denoiser.model", "family", f"{config.family!r} exports run "
                       "through their own family's WorldModel (this is the small family's)")
    self.config = config
    d = config.denoiser
    self.chunk = int(d.target_frames)
    self.num_context = int(d.context_frames)
    self.latent_scale = float(d.latent_scale)
    self.sampler = config.sampler
    self.reencode = bool(config.sampler.reencode_latents)
    self.prediction = d.prediction
    if self.prediction == "x0_prior" and self.sampler.method != "euler":
      raise InputError("config.sampler", "method", "prediction='x0_prior' samples with 'euler' "
                       f"(its velocity is undefined at t = 0), got {self.sampler.method!r}")
    self.backend_name = backend or config.memory.backend
    self.write_new_only = self.backend_name in config.memory.write_new_only
    self.memory_cfg = conditioning.memory_config(config, **memory_overrides)
    # Where written depth comes from: the decoder's (default), the input's, or a depth model.
    depth = depth or self.depth_options()
    if depth.estimator not in self.depth_estimators:
      raise InputError("--depth_estimator", "depth_estimator", f"the small family takes "
                       f"{self.depth_estimators}, got {depth.estimator!r}")
    self.given_depth = depth.estimator == "given"
    self.depth_model = depth_estimator.Monocular.from_options(depth)
    self.needs_depths = self.given_depth
    self.needs_first_depth = self.depth_model is None or self.depth_model.needs_first_depth
    # Anchoring to the memory's depth is the decoder's alignment.
    self.depth_from_memory = (depth.estimator == "decoder"
                              and self.backend_name in config.memory.depth_from_memory)
    self.depth_rescale = bool(config.memory.depth_from_memory_rescale)
    if self.depth_from_memory and self.backend_name != "voxel":
      raise InputError("config.memory", "depth_from_memory", f"the {self.backend_name!r} backend "
                       "reads no depth; only 'voxel' takes its depth from the memory")
    if object_slots is None:
      object_slots = self.backend_name in config.objects.backends
    if mask_dynamic is None:
      mask_dynamic = object_slots or self.backend_name in config.memory.mask_dynamic
    if (mask_dynamic or object_slots) and not ae.has_dynamic_head:
      raise InputError("generate", "mask_dynamic", "the autoencoder has no dynamic head "
                       "(config.autoencoder.dynamic_head_width = 0): cannot tell moving content")
    self.mask_dynamic, self.object_slots = bool(mask_dynamic or object_slots), bool(object_slots)
    self.dynamic_threshold = float(config.memory.dynamic_threshold)
    self.object_cfg = conditioning.object_config(config) if self.object_slots else None
    self.image_hw = (self.memory_cfg.image_height, self.memory_cfg.image_width)
    self.latent_hw = (self.memory_cfg.latent_height, self.memory_cfg.latent_width)
    self.ae_graphdef, self.ae_state = nnx.split(ae)
    self.dn_graphdef, self.dn_state = nnx.split(dn)
    self.backend = memory_lib.get_backend(self.backend_name, encode_fn=self._encode_rgb)
    self.refs = conditioning.reference_settings(config)

  # --------------------------------------------------------------------------- config, loading

  upgrade = staticmethod(conditioning.upgrade)
  memory_config = staticmethod(conditioning.memory_config)

  @staticmethod
  def load(denoiser_export: str, autoencoder_export: str | None = None
           ) -> tuple[ml_collections.ConfigDict, nnx.Module, nnx.Module]:
    """(config, autoencoder, denoiser) of a small-family denoiser export.

    The autoencoder comes from ``autoencoder_export`` or else from the path the denoiser was
    trained with (``config.denoiser.autoencoder_checkpoint``).
    """
    dn, config = load_model(denoiser_export)
    ae_path = autoencoder_export or config.denoiser.autoencoder_checkpoint
    ae_family = families.family_name(checkpoint.export_config(ae_path))
    if ae_family != "small":
      raise InputError(ae_path, "family", f"the denoiser {denoiser_export} is of the "
                       f"small family and needs its RGB-D autoencoder, this export is {ae_family!r}")
    ae, ae_config = load_model(ae_path)
    if ae_config.stage != "autoencoder" or ae_config.autoencoder.to_dict() != config.autoencoder.to_dict():
      raise InputError(ae_path, "autoencoder", "not the autoencoder this denoiser was trained with")
    return conditioning.upgrade(config), ae, dn

  @staticmethod
  def check_guidance(config: ml_collections.ConfigDict, scale: float | None = None) -> None:
    """Refuses classifier-free guidance when training never trained its unconditional branch
    (no memory: ``denoiser.cond_dropout`` > 0). ``scale``: the flag, or None for the
    export's ``config.sampler.guidance_scale``."""
    config = conditioning.upgrade(config)
    world_model.refuse_untrained_guidance(config, scale, "cond_dropout")

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

  def _encode_rgb(self, rgb01):
    """rgb_points' re-encoder: rendered rgb (F, H, W, 3) in [0, 1] -> latents (F, h, w, C).

    The RGB cloud carries no depth channel, so the encoder sees a constant 2 m depth: the
    baseline pays for re-encoding as Spatia/Voyager do, with the RGB content only.
    """
    depth = jnp.full(rgb01.shape[:-1], 2.0, jnp.float32)
    return self._encode_impl(self.ae_state, rgb01 * 2.0 - 1.0, depth)

  def _denoise_impl(self, ae_state, dn_state, cond, rng):
    """One chunk from noise.

    Args:
      cond: ``conditioning.dit_inputs``' cond of the chunk (no batch axis).
    Returns:
      latents (T, h, w, C), rgb (T, H, W, 3) in [-1, 1], depth (T, H, W) metric.
    """
    dn = nnx.merge(self.dn_graphdef, dn_state)
    cond = {k: v[None] for k, v in cond.items()}
    noise = jax.random.normal(rng, cond["memory"].shape, jnp.float32)
    latents = conditioning.sample(dn, self.prediction, cond, noise, self.sampler,
                                  self.sampler.guidance_scale or None)[0]
    ae = nnx.merge(self.ae_graphdef, ae_state)
    rgb, depth = ae.decode(latents / self.latent_scale)
    return latents, rgb, depth

  # --------------------------------------------------------------------------- one chunk step

  def _start_impl(self, ae_state, depth_state, state, frame0, depth0, valid0, K0, c2w0, rng):
    """Frame 0 of one trajectory into the memories: the carry of :meth:`_chunk_impl`.

    Args:
      state: the memory state frame 0 is written into (empty or pre-filled).
      frame0: (H, W, 3) in [-1, 1]. depth0: (H, W) metric (all zeros when not given: the
        depth model's estimate). valid0: (H, W) bool where depth0 was observed (a latent
        cell with a hole is not lifted). K0: (3, 3). c2w0: (4, 4).
      rng: (2,) uint32 key data of the trajectory's sampling key.
    Returns:
      carry: dict of memory, rng, ctx (Nc, h, w, C), ctx_K, ctx_c2w, and objects / bank /
      depth_fit when used; frame 0's outputs: rgb (1, H, W, 3), depth (1, H, W), coverage
      (1, h, w), dynamic (1, h, w), positions (1, S, 3), idents (1, S).
    """
    fit = None
    if self.depth_model is not None:
      depth0, fit = self.depth_model.first(depth_state, frame0, depth0)
    K, c2w, given = K0[None], c2w0[None], depth0[None]
    lat0 = self._encode_impl(ae_state, frame0[None], given)
    dyn0 = self._dynamic_impl(ae_state, lat0)
    observed = self._observed(valid0[None])
    moving0 = (dyn0 >= self.dynamic_threshold) & self.mask_dynamic
    static0 = clip_lib.liftable(moving0, observed)
    ids = jnp.zeros((1,), jnp.int32)
    carry = dict(memory=self.backend.write(state, lat0, given, K, c2w, static0, ids,
                                           rgb=(frame0[None] + 1.0) / 2.0), rng=rng)
    if fit is not None:
      carry["depth_fit"] = fit
    positions, idents = jnp.zeros((1, 0, 3), jnp.float32), jnp.zeros((1, 0), jnp.int32)
    if self.object_slots:
      objects = objects_lib.observe(objects_lib.init(self.object_cfg), lat0, given, K, c2w,
                                    moving0 & observed, ids)
      positions = objects_lib.predict(objects, 0)[None]
      idents = jnp.where(objects.valid, objects.ident, -1)[None]
      carry["objects"] = objects
    if self.refs.frames:
      carry["bank"] = memory_lib.frame_bank.write(
          memory_lib.references.reference_bank_init(self.memory_cfg, self.refs.bank), lat0, given, K, c2w, static0, ids)
    # Context: the last generated latents; at the start, the first frame repeated.
    nc = self.num_context
    carry.update(ctx=jnp.repeat(lat0, nc, 0), ctx_K=jnp.repeat(K, nc, 0),
                 ctx_c2w=jnp.repeat(c2w, nc, 0))
    rgb0, d0 = nnx.merge(self.ae_graphdef, ae_state).decode(lat0 / self.latent_scale)
    if self.depth_model is not None or self.given_depth:
      d0 = given  # the depth frame 0 was written with
    return carry, dict(rgb=rgb0, depth=d0, coverage=jnp.ones_like(dyn0), dynamic=dyn0,
                       positions=positions, idents=idents)

  def _chunk_impl(self, ae_state, dn_state, depth_state, carry, chunk, *, oracle: bool):
    """One chunk of one trajectory: read -> denoise (whole sampler) -> decode -> write.

    Args:
      depth_state: the depth model's state (None without one).
      carry: as :meth:`_start_impl` returns it.
      chunk: K (F, 3, 3), c2w (F, 4, 4), depth (F, H, W) the given depth (with the given
        depth only), frame (F,) int32 frame indices (a short chunk is
        padded with its last camera), start () int32 first frame, real () int32 frames
        that exist (padded frames are never written; 0: the trajectory has ended, nothing
        changes). With ``oracle``: use (F,) bool frames written from ground truth, their
        o_lat (F, h, w, C), o_rgb (F, H, W, 3) in [-1, 1], o_depth (F, H, W), and given
        (F,) bool frames (a subset of use) that are also the next chunk's clean context.
      oracle: static; without it no frame is written from ground truth.
    Returns:
      the new carry; outputs: latents (F, h, w, C), rgb (F, H, W, 3) in [-1, 1], depth
      (F, H, W) (the depth written: decoded, given or estimated), coverage (F, h, w) bool, dynamic (F, h, w), positions (F, S, 3), idents
      (F, S), references (k,) frame index of each reference (-1 = fallback; k = 0 without).
    """
    Kc, c2wc, ids = chunk["K"], chunk["c2w"], chunk["frame"]
    real = (jnp.arange(self.chunk) < chunk["real"])[:, None, None]
    mem_depth = None
    if self.depth_from_memory or (self.depth_model is not None and self.backend.reads_depth):
      mem, cov, mem_depth = self.backend.read(carry["memory"], Kc, c2wc, with_depth=True)
    else:
      mem, cov = self.backend.read(carry["memory"], Kc, c2wc)
    static_cov = cov
    positions = jnp.zeros((self.chunk, 0, 3), jnp.float32)
    idents = jnp.zeros((self.chunk, 0), jnp.int32)
    objects = carry.get("objects")
    if self.object_slots:  # where each slot is at each frame (outputs only)
      positions = jax.vmap(lambda f: objects_lib.predict(objects, f))(ids)
      idents = jnp.broadcast_to(jnp.where(objects.valid, objects.ident, -1), positions.shape[:2])
    ctx, ctx_K, ctx_c2w = carry["ctx"], carry["ctx_K"], carry["ctx_c2w"]
    cond, info = conditioning.dit_inputs(
        self.memory_cfg, mem, cov, Kc, c2wc, ctx, ctx_K, ctx_c2w, objects=objects,
        frame_index=ids, bank=carry.get("bank"), start=chunk["start"],
        num_context=self.num_context, num_references=self.refs.frames)
    cov, ref_frames = info["coverage"], info["references"]
    key, sub = jax.random.split(jax.random.wrap_key_data(carry["rng"]))
    lat, rgb, depth = self._denoise_impl(ae_state, dn_state, cond, sub)
    if self.reencode:  # back onto the encoder's latents: off-manifold error stops compounding
      lat = self._encode_impl(ae_state, rgb, depth)
    if self.depth_from_memory:  # the static read's depth: object slots carry none
      depth = conditioning.anchor_depth(depth, mem_depth, static_cov, rescale=self.depth_rescale)
    fit = carry.get("depth_fit")
    if self.given_depth:
      depth = chunk["depth"]
    elif self.depth_model is not None:
      depth, fit, _ = self.depth_model.chunk(depth_state, rgb, mem_depth, static_cov, fit)
    dyn = self._dynamic_impl(ae_state, lat)
    w_lat, w_rgb, w_depth, w_dyn = lat, rgb, depth, dyn
    # Where the written depth was observed: given depth and ground truth may have holes.
    observed = chunk["valid"] if self.given_depth else None
    if oracle:  # a chunk straddling N mixes the two
      use = chunk["use"]
      pick = lambda o, g: jnp.where(use.reshape((-1,) + (1,) * (o.ndim - 1)), o, g)
      w_lat, w_rgb, w_depth = (pick(chunk[k], g) for k, g in
                               (("o_lat", lat), ("o_rgb", rgb), ("o_depth", depth)))
      observed = pick(chunk["o_valid"], True if observed is None else observed)
      w_dyn = self._dynamic_impl(ae_state, w_lat)
    if observed is not None:
      observed = self._observed(observed)
    moving = (w_dyn >= self.dynamic_threshold) & real
    static = real & clip_lib.liftable(moving & self.mask_dynamic, observed)
    if self.write_new_only:
      # Covered cells were copied from memory: writing them back only adds drift (unless
      # the chunk is written from ground truth).
      static = static & (~cov | use.any()) if oracle else static & ~cov
    new = dict(carry, rng=jax.random.key_data(key), memory=self.backend.write(
        carry["memory"], w_lat, w_depth, Kc, c2wc, static, ids, rgb=(w_rgb + 1.0) / 2.0))
    if fit is not None:
      new["depth_fit"] = fit
    if self.object_slots:
      seen = use if oracle else jnp.zeros((self.chunk,), bool)
      new["objects"] = objects_lib.observe(carry["objects"], w_lat, w_depth, Kc, c2wc,
                                           moving if observed is None else moving & observed,
                                           ids, seen)
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

  # --------------------------------------------------------------------------- the driver's

  def params(self) -> tuple:
    depth_state = None if self.depth_model is None else self.depth_model.state
    return (self.ae_state, self.dn_state, depth_state)

  def start(self, params, state, frame0, depth0, valid0, K0, c2w0, rng):
    return self._start_impl(params[0], params[2], state, frame0, depth0, valid0, K0, c2w0, rng)

  def _observed(self, valid):
    """(F, H, W) bool where the depth was observed -> (F, h, w): a latent cell with a hole
    is not (its lifted depth is sampled inside the cell)."""
    return memory_lib.splatting.mask_at(valid, *self.latent_hw)

  def step(self, params, carry, chunk, *, oracle: bool):
    return self._chunk_impl(*params, carry, chunk, oracle=oracle)

  def encode_oracle(self, params, arrays):
    """arrays: o_rgb (F, H, W, 3) in [-1, 1], o_depth (F, H, W) -> latents (F, h, w, C)."""
    return self._encode_impl(params[0], *arrays)

  def num_chunks(self, num_frames: int) -> int:
    """Chunks of ``target_frames`` after frame 0."""
    return len(range(1, num_frames, self.chunk))

  def chunk_inputs(self, c, lengths, num_chunks, Ks, poses, depths, valids):
    """Chunk ``c`` covers frames ``1 + c F ..``; each row padded with its last camera
    (padded frames are never written); ``real`` frames exist (0: the row has ended)."""
    F = self.chunk
    start = 1 + c * F
    idx = np.minimum(start + np.arange(F)[None], lengths[:, None] - 1)  # (Bp, F)
    real = np.clip(lengths - start, 0, F)
    Bp = len(lengths)
    chunk = dict(K=np.stack([Ks[r][i] for r, i in enumerate(idx)]),
                 c2w=np.stack([poses[r][i] for r, i in enumerate(idx)]),
                 frame=idx.astype(np.int32), start=np.full((Bp,), start, np.int32),
                 real=real.astype(np.int32))
    if self.given_depth:
      chunk["depth"] = np.stack([depths[r][i] for r, i in enumerate(idx)]).astype(np.float32)
      chunk["valid"] = world_model.observed_rows(valids, idx, self.image_hw)
    return chunk, dict(idx=idx, real=real)

  def oracle_chunk(self, encode, gts, order, plan, given, ctx_given) -> dict[str, Any]:
    """use (Bp, F), o_lat, o_rgb, o_depth, o_valid (zeros / ones when no row takes ground
    truth in this chunk) and given (Bp, F) the frames that are also the next chunks' clean
    context."""
    h, w = self.image_hw
    lh, lw = self.latent_hw
    idx = plan["idx"]
    Bp, F = idx.shape
    use = idx < given[:, None]
    o_rgb = np.zeros((Bp, F, h, w, 3), np.float32)
    o_depth = np.ones((Bp, F, h, w), np.float32)
    o_valid = np.ones((Bp, F, h, w), bool)
    for row, b in enumerate(order):
      if given[row] and use[row].any():  # padded with the last ground-truth frame
        gi = np.minimum(idx[row], given[row] - 1)
        o_rgb[row] = gts[b][0][gi].astype(np.float32) / 127.5 - 1.0
        o_depth[row] = gts[b][1][gi]
        if gts[b][2] is not None:
          o_valid[row] = gts[b][2][gi]
    if use.any():
      o_lat = encode((o_rgb, o_depth))
    else:
      o_lat = np.zeros((Bp, F, lh, lw, self.memory_cfg.latent_channels), np.float32)
    return dict(use=use, o_lat=o_lat, o_rgb=o_rgb, o_depth=o_depth, o_valid=o_valid,
                given=idx < ctx_given[:, None])

  def written(self, chunk, out) -> tuple:
    lat, depth = out["latents"], out["depth"]
    if "use" in chunk:  # what the step wrote: ground truth where given
      pick = lambda o, g: jnp.where(chunk["use"].reshape(chunk["use"].shape + (1,) * (o.ndim - 2)), o, g)
      lat, depth = pick(chunk["o_lat"], lat), pick(chunk["o_depth"], depth)
    static = jnp.broadcast_to((jnp.arange(self.chunk)[None] < chunk["real"][:, None])[..., None, None],
                              depth.shape)
    rgb = (out["rgb"] + 1.0) / 2.0
    return lat, depth, chunk["K"], chunk["c2w"], static, chunk["frame"], rgb

  def trajectory_result(self, b, T, first, outs, plans, carry) -> dict[str, Any]:
    """frames (T, H, W, 3) uint8 (rounded), depths (T, H, W), coverage (T, h, w), dynamic
    (T, h, w), object_positions (T, S, 3), object_idents (T, S), object_bytes, references
    (chunks, k) (see ``rollout.Rollout.generate``)."""
    take = lambda x: x[b]
    keep = [(o, p["real"][b]) for o, p in zip(outs, plans) if p["real"][b] > 0]
    cat = lambda k, dtype: np.concatenate(
        [first[k][b]] + [o[k][b][:n] for o, n in keep], 0).astype(dtype)
    rgb_all = cat("rgb", np.float32)
    objects = jax.tree.map(take, carry["objects"]) if self.object_slots else None
    refs = [o["references"][b] for o, _ in keep]
    return dict(
        frames=np.round((np.clip(rgb_all, -1, 1) + 1.0) * 127.5).astype(np.uint8),
        depths=cat("depth", np.float32),
        coverage=cat("coverage", np.float32),
        dynamic=cat("dynamic", np.float32),
        object_positions=cat("positions", np.float32),
        object_idents=cat("idents", np.int32),
        object_bytes=objects_lib.nbytes(objects) if objects is not None else 0,
        references=(np.stack(refs) if refs else np.zeros((0, self.refs.frames))).astype(np.int32),
    )
