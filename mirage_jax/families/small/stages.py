"""The small family's training stages: the RGB-D autoencoder, then the DiT on its latents.

  * ``autoencoder``: the RGB-D VAE on single frames of the clips;
  * ``denoiser``: the frozen autoencoder (``config.denoiser.autoencoder_checkpoint``) encodes
    the clip; several earlier frames are written into the spatial memory with the same
    ``mirage_jax.memory`` write/read code the rollout uses, read into the target cameras, and
    the DiT learns flow matching on the target chunk with the context frames clean; its
    inputs come from ``conditioning.dit_inputs``, the function the world model's chunk step
    calls.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_pipelines import clip as clip_lib
from mirage_jax import checkpoint as ckpt_lib
from mirage_jax import diffusion
from mirage_jax import geometry
from mirage_jax import memory as memory_lib
from mirage_jax.families.small import conditioning
from mirage_jax.errors import InputError
from mirage_jax.families.small import autoencoder
from mirage_jax.families.small import denoiser
from mirage_jax.memory import objects as objects_lib
from mirage_jax.training.flops import model_flops
from mirage_jax.training.stage import Batch, StageBase, noise_levels, train_memory_config


def make_stage(config: ml_collections.ConfigDict, frozen: Any = None) -> StageBase:
  """The stage named by ``config.stage``; the denoiser needs the frozen autoencoder params
  (None: its export is checked now and loaded later by ``DenoiserStage.load_frozen``;
  "abstract": their shapes, for compiling ahead of time)."""
  if config.stage == "autoencoder":
    return AutoencoderStage(config)
  if config.stage == "denoiser":
    if isinstance(frozen, str) and frozen == "abstract":
      ae = nnx.eval_shape(lambda: autoencoder.Autoencoder(config.autoencoder, nnx.Rngs(0)))
      frozen = nnx.state(ae, nnx.Param).to_pure_dict()
    elif frozen is None:  # loaded by DenoiserStage.load_frozen(mesh), straight into its sharding
      _autoencoder_export(config)
    return DenoiserStage(config, frozen)
  raise InputError("config.stage", "stage", f"expected 'autoencoder' or 'denoiser', got {config.stage!r}")


class AutoencoderStage(StageBase):
  """Stage 1: the RGB-D VAE (and its dynamic head) on every frame of the windows."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.frozen: dict = {}
    self.fields = ("frames", "depths", "depth_valid") + (
        ("dynamic_masks",) if config.autoencoder.dynamic_head_width else ())

  def build(self, rngs: nnx.Rngs) -> nnx.Module:
    return autoencoder.Autoencoder(self.config.autoencoder, rngs)

  def loss(self, model, frozen, batch: Batch, rng):
    """batch: frames (B, T, H, W, 3) in [-1, 1], depths, depth_valid (B, T, H, W)[,
    dynamic_masks (B, T, H, W)]."""
    del frozen
    b, t, h, w, _ = batch["frames"].shape
    flat = {k: v.reshape((b * t,) + v.shape[2:]) for k, v in batch.items() if k in self.fields}
    loss, aux = autoencoder.loss(model, flat, rng)
    aux.pop("loss", None)
    return loss, aux

  def step_flops(self, batch_size: int) -> float:
    d = self.config.data
    h, w = d.resolution
    frames = jax.ShapeDtypeStruct((batch_size * d.num_frames, h, w, 3), jnp.float32)
    depths = jax.ShapeDtypeStruct((batch_size * d.num_frames, h, w), jnp.float32)
    fwd = model_flops(lambda: self.build(nnx.Rngs(0)),
                      lambda model, f, z: model(f, z, jax.random.key(0)), frames, depths)
    return 3.0 * fwd  # forward + backward (twice the forward)


class DenoiserStage(StageBase):
  """Stage 2: flow matching on the target chunk, conditioned on memory and clean context.

  A window of ``T = memory_frames + target_frames`` frames: the first ``memory_frames`` are
  encoded by the frozen autoencoder and written into the memory (``config.memory``), whose
  read into each target camera conditions the denoiser. Clean context (t = 0): the
  ``reference_frames`` memory frames that the rollout's rule retrieves for the targets
  (``memory_lib.references.retrieve_references`` on a bank of the memory frames, the last
  ``context_frames`` not eligible), then the last ``context_frames`` memory frames
  (``conditioning.dit_inputs``, as the rollout's chunk step). Scheduled sampling
  (``self_generated_memory``) draws memory frames with the rollout's sampler
  (``conditioning.sample``).
  """

  fields = ("frames", "depths", "intrinsics", "poses_c2w", "dynamic_masks", "depth_valid")

  def __init__(self, config: ml_collections.ConfigDict, frozen: Any):
    self.config = config
    d = config.denoiser
    res = config.data.resolution
    self.factor = factor = autoencoder.downsample_factor(config.autoencoder)
    self.latent_hw = (res[0] // factor, res[1] // factor)
    if d.memory_frames + d.target_frames != config.data.num_frames:
      raise InputError("config.denoiser", "target_frames", f"memory_frames ({d.memory_frames}) + "
                       f"target_frames ({d.target_frames}) must equal data.num_frames "
                       f"({config.data.num_frames})")
    if not 0 <= d.context_frames <= d.memory_frames:
      raise InputError("config.denoiser", "context_frames", "must be in [0, memory_frames]")
    self.refs = conditioning.reference_settings(config)
    if self.refs.frames > d.memory_frames:
      raise InputError("config.denoiser", "reference_frames",
                       f"must be <= memory_frames ({d.memory_frames}), got {self.refs.frames}")
    self.memory = memory_lib.get_backend(config.memory.backend)
    # The rollout's settings, but room for this window's points only (train_capacity).
    self.memory_cfg = train_memory_config(config, conditioning.memory_config(config),
                                          d.memory_frames)
    if not 0.0 <= d.cond_dropout < 1.0:
      raise InputError("config.denoiser", "cond_dropout", f"must be in [0, 1), got "
                       f"{d.cond_dropout}")
    self.noise_levels = noise_levels(config)  # (scheme, mixed probability), checked
    self.context_noise = float(d.context_noise)
    if not 0.0 <= self.context_noise < 1.0:
      raise InputError("config.denoiser", "context_noise", f"must be in [0, 1), got "
                       f"{d.context_noise}")
    self.self_generated = float(d.self_generated_memory)
    if not 0.0 <= self.self_generated <= 1.0:
      raise InputError("config.denoiser", "self_generated_memory", f"must be in [0, 1], got "
                       f"{d.self_generated_memory}")
    # The last g memory frames are generated from the first m - g, keeping >= 1 frame (and
    # the clean context) from the data.
    self.generated_frames = min(d.target_frames, d.memory_frames - max(d.context_frames, 1))
    if self.self_generated > 0 and self.generated_frames < 1:
      raise InputError("config.denoiser", "self_generated_memory", "needs memory_frames > "
                       f"max(context_frames, 1), got memory_frames={d.memory_frames}, "
                       f"context_frames={d.context_frames}")
    self.object_cfg = (conditioning.object_config(config)
                       if config.memory.backend in config.objects.backends else None)
    self.ae_graphdef = nnx.graphdef(nnx.eval_shape(
        lambda: autoencoder.Autoencoder(config.autoencoder, nnx.Rngs(0))))
    self.frozen = frozen

  def build(self, rngs: nnx.Rngs) -> nnx.Module:
    return denoiser.Denoiser(self.config.denoiser.model, rngs)

  def load_frozen(self, mesh: Mesh, rules) -> None:
    """Restores the frozen autoencoder straight into the step's (replicated) sharding on
    ``mesh``: every process reads it from the export, none receives it from another."""
    del rules
    self.frozen = load_frozen_autoencoder(self.config, NamedSharding(mesh, PartitionSpec()))

  def rollout_args(self, graphdef, ema) -> tuple:
    """(autoencoder, denoiser of the EMA params ``ema``) for the training rollouts."""
    dn = self.merge(graphdef, ema, None)
    ae = nnx.merge(self.ae_graphdef, nnx.State(self.frozen))
    return ae, dn

  def _encode(self, frozen, frames, depths):
    """(B, T, H, W, 3), (B, T, H, W) -> scaled posterior-mean latents (B, T, h, w, C)."""
    ae = nnx.merge(self.ae_graphdef, nnx.State(frozen))
    b, t, h, w, _ = frames.shape
    mean, _ = ae.encode(frames.reshape(b * t, h, w, 3), depths.reshape(b * t, h, w))
    latents = mean.reshape((b, t) + mean.shape[1:]) * self.config.denoiser.latent_scale
    return jax.lax.stop_gradient(latents)

  def _condition(self, latents, batch, memory_frames=None):
    """The DiT's inputs of the window's targets, as the rollout builds them for a chunk.

    Per clip: the memory (the object slots and the reference bank when used) written from
    the first ``memory_frames`` (default the config's) frames as the rollout would hold them
    after those frames; the targets are the rest; then ``conditioning.dit_inputs`` with the
    last ``context_frames`` memory frames as the clean context.

    Args:
      latents: (B, T, h, w, C); batch: depths, intrinsics, poses_c2w, dynamic_masks (B, T, ...),
        optional depth_valid (B, T, H, W) (absent: dense depth).
    Returns:
      ``conditioning.dit_inputs``' cond with a leading (B,) axis.
    """
    d = self.config.denoiser
    m = d.memory_frames if memory_frames is None else memory_frames
    nc, k = d.context_frames, self.refs.frames
    frame_ids = jnp.arange(m, dtype=jnp.int32)
    # The window's rays in one batched call, as before the conditioning was shared with the
    # rollout (per-clip calls inside batch_map may round differently in the last bit).
    window_rays = geometry.plucker_rays(
        memory_lib.splatting.latent_intrinsics(self.memory_cfg, batch["intrinsics"]),
        batch["poses_c2w"], *self.latent_hw)  # (B, T, h, w, 6)

    def one_clip(lat, depth, K, c2w, dyn, valid, rays):
      static = clip_lib.liftable(dyn[:m], valid[:m])  # depth holes never enter memory
      state = self.memory.init(self.memory_cfg)
      state = self.memory.write(state, lat[:m], depth[:m], K[:m], c2w[:m], static, frame_ids)
      mem, coverage = self.memory.read(state, K[m:], c2w[m:])
      objects = bank = None
      if self.object_cfg is not None:  # the slots the rollout would hold after these frames
        moving = autoencoder.dynamic_target(dyn[:m], self.factor)
        objects = objects_lib.observe(objects_lib.init(self.object_cfg), lat[:m], depth[:m],
                                      K[:m], c2w[:m], moving, frame_ids)
      if k:
        bank = memory_lib.frame_bank.write(
            memory_lib.references.reference_bank_init(self.memory_cfg, m), lat[:m],
            depth[:m], K[:m], c2w[:m], static, frame_ids)
      ctx = slice(m - nc, m)
      cond, _ = conditioning.dit_inputs(
          self.memory_cfg, mem, coverage, K[m:], c2w[m:], lat[ctx], K[ctx], c2w[ctx],
          objects=objects, frame_index=jnp.arange(m, lat.shape[0], dtype=jnp.int32),
          bank=bank, start=m, num_context=nc, num_references=k, target_rays=rays[m:],
          context_rays=rays[ctx])
      return cond

    valid = batch.get("depth_valid")
    if valid is None:
      valid = jnp.ones_like(batch["dynamic_masks"])
    return memory_lib.batch_map(one_clip, latents, batch["depths"], batch["intrinsics"],
                                batch["poses_c2w"], batch["dynamic_masks"], valid, window_rays)

  def _generate_memory(self, model, frozen, latents, batch, rng):
    """Scheduled sampling of the memory writes: the last g memory frames as the rollout
    would make them, from the first m - g (the rollout's sampler, decoded and, with
    ``sampler.reencode_latents``, encoded again); no gradient flows through them.

    Args:
      latents: (B, T, h, w, C) encoded window; batch: the window's fields.
    Returns:
      latents (B, g, h, w, C) and decoded metric depths (B, g, H, W) of frames m - g .. m - 1.
    """
    d, s = self.config.denoiser, self.config.sampler
    m, g = d.memory_frames, self.generated_frames
    part = {k: batch[k][:, :m] for k in ("depths", "intrinsics", "poses_c2w", "dynamic_masks",
                                         "depth_valid") if k in batch}
    cond = self._condition(latents[:, :m], part, m - g)
    b = latents.shape[0]
    noise = jax.random.normal(rng, (b, g) + latents.shape[2:], latents.dtype)
    # The rollout's sampler without its guidance (sampler.guidance_scale): scheduled
    # sampling has always drawn the conditional branch only.
    gen = conditioning.sample(model, d.prediction, cond, noise, s)
    ae = nnx.merge(self.ae_graphdef, nnx.State(frozen))
    rgb, depth = ae.decode(gen.reshape((b * g,) + gen.shape[2:]) / d.latent_scale)
    rgb, depth = rgb.reshape((b, g) + rgb.shape[1:]), depth.reshape((b, g) + depth.shape[1:])
    if s.reencode_latents:  # what the rollout writes
      gen = self._encode(frozen, rgb, depth)
    return jax.lax.stop_gradient(gen), jax.lax.stop_gradient(depth)

  def loss(self, model, frozen, batch: Batch, rng):
    d = self.config.denoiser
    latents = self._encode(frozen, batch["frames"], batch["depths"])
    if self.self_generated > 0:
      g_rng, u_rng, rng = jax.random.split(rng, 3)
      gen, gen_depth = self._generate_memory(model, frozen, latents, batch, g_rng)
      m, g = d.memory_frames, self.generated_frames
      use = jax.random.bernoulli(u_rng, self.self_generated, latents.shape[:1])
      pick = lambda x, new: x.at[:, m - g:m].set(
          jnp.where(use.reshape((-1,) + (1,) * (new.ndim - 1)), new, x[:, m - g:m]))
      latents = pick(latents, gen.astype(latents.dtype))
      batch = dict(batch, depths=pick(batch["depths"], gen_depth.astype(batch["depths"].dtype)))
    cond = self._condition(latents, batch)
    x0 = latents[:, d.memory_frames:]
    t_rng, n_rng = jax.random.split(rng)
    t = diffusion.sample_levels(t_rng, *x0.shape[:2], d.time_shift, *self.noise_levels)
    noise = jax.random.normal(n_rng, x0.shape, x0.dtype)
    memory, coverage, context = cond["memory"], cond["coverage"], cond["context"]
    if self.context_noise > 0:
      context = diffusion.noise_context(jax.random.fold_in(rng, 3), context, self.context_noise)
    if d.cond_dropout > 0:  # trains the unconditional branch guidance uses
      memory, coverage = diffusion.drop_conditioning(jax.random.fold_in(rng, 2),
                                                     d.cond_dropout, memory, coverage)
    velocity, x0_pred = denoiser.predict(
        model, d.prediction, diffusion.add_noise(x0, noise, t), t, cond["rays"],
        memory, coverage, context, cond["context_rays"])
    if d.prediction == "x0_prior":  # x0 regression (= velocity loss weighted by t^2)
      loss = jnp.mean(jnp.square(x0_pred - x0))
    else:
      loss = diffusion.flow_matching_loss(velocity, x0, noise, t, weighting=d.time_weighting)
    prior_mse = jnp.mean(jnp.square(denoiser.memory_prior(cond["memory"], cond["coverage"],
                                                          cond["context"]) - x0))
    return loss, {"memory_coverage": cond["coverage"].mean(), "prior_mse": prior_mse,
                  "x0_mse": jnp.mean(jnp.square(x0_pred - x0))}

  def step_flops(self, batch_size: int) -> float:
    d, data = self.config.denoiser, self.config.data
    hh, ww = self.latent_hw
    dit = denoiser.denoiser_flops(d.model, batch_size, d.target_frames,
                                  d.context_frames + self.refs.frames, hh, ww)
    h, w = data.resolution
    n = batch_size * data.num_frames
    encode = model_flops(lambda: autoencoder.Autoencoder(self.config.autoencoder, nnx.Rngs(0)),
                         lambda ae, f, z: ae.encode(f, z),
                         jax.ShapeDtypeStruct((n, h, w, 3), jnp.float32),
                         jax.ShapeDtypeStruct((n, h, w), jnp.float32))
    return 3.0 * dit + encode  # the frozen encoder runs forward only


def _autoencoder_export(config: ml_collections.ConfigDict) -> str:
  path = config.denoiser.autoencoder_checkpoint
  if not path:
    raise InputError("config.denoiser.autoencoder_checkpoint", "autoencoder_checkpoint",
                     "the denoiser stage needs a stage-1 export (python -m mirage_jax.export)")
  return path


def load_frozen_autoencoder(config: ml_collections.ConfigDict,
                            shardings: Any = None) -> Any:
  """Params (float32) of the stage-1 export named by ``config.denoiser.autoencoder_checkpoint``.

  Args:
    shardings: where to restore them (one ``Sharding`` or a matching pytree; see
      ``checkpoint.load_export``); each process reads only its shards, so a mesh-wide
      sharding needs no cross-host transfer. Default: one local device.
  """
  path = _autoencoder_export(config)
  params, ae_config, _ = ckpt_lib.load_export(path, shardings, dtype=jnp.float32)
  # Compare as JSON (the export's config went through JSON: tuples became lists).
  if json.loads(ae_config.autoencoder.to_json()) != json.loads(config.autoencoder.to_json()):
    raise InputError(path, "autoencoder", "the export's autoencoder config differs from "
                     "config.autoencoder")
  return params
