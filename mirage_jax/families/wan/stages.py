"""The Wan family's training stages.

  * ``denoiser`` (:class:`WanStage`): the Wan2.2 DiT on pre-encoded latent clips: fine-tuning
    Mirage (VACE and/or LoRA) on a frozen base, or training the base itself (pretraining from
    scratch, or full fine-tuning);
  * ``autoencoder`` (:class:`WanVAEStage`): the Wan2.2 VAE (encoder + decoder) on RGB clips of
    1 + 4 k frames, from scratch or continuing a VAE export (a ``convert_wan`` one of the
    released weights, or an export of this stage).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mirage_jax import diffusion
from mirage_jax import memory as memory_lib
from mirage_jax import sharding
from mirage_jax.errors import InputError
from mirage_jax.families.wan import conditioning as wan_mirage
from mirage_jax.families.wan import dit as wan_dit
from mirage_jax.families.wan import exports
from mirage_jax.families.wan import vae as wan_vae
from mirage_jax.training.flops import model_flops
from mirage_jax.training.stage import Batch, StageBase, noise_levels, train_memory_config


def make_stage(config: ml_collections.ConfigDict, frozen: Any = None) -> StageBase:
  """The stage named by ``config.stage``: 'denoiser' (:class:`WanStage`; ``frozen``: see
  there) or 'autoencoder' (:class:`WanVAEStage`)."""
  if config.stage == "autoencoder":
    return WanVAEStage(config, frozen)
  if config.stage != "denoiser":
    raise InputError("config.stage", "stage", f"expected 'autoencoder' or 'denoiser', got "
                     f"{config.stage!r}")
  return WanStage(config, frozen)


class WanStage(StageBase):
  """Training the WanDiT: Mirage fine-tuning on a frozen Wan2.2 base (the reference's
  ``scripts/train.py``), or the base itself.

  ``config.family == 'wan'``. What trains is ``config.denoiser.train_stages``, any of
  'vace', 'lora' (as the reference's ``--stage``) and 'base' (every other param: the Wan DiT
  itself). The params that do not train are frozen and come from
  ``config.denoiser.base_checkpoint`` (a ``convert_wan`` DiT export, or an export of a run
  on one, followed to its root); they go through the step as ``frozen["base"]``,
  FSDP-sharded by the mesh rules like trainable params but with no optimizer state (empty
  when everything trains). A trainable part found in the base export starts from it; one not
  found starts as the reference initialises it (VACE: PyTorch-default random weights with
  ``after_proj`` zero; LoRA: A random, B zero). With 'base' in train_stages and no
  base_checkpoint the run starts from scratch: every param from the random init
  (``config.seed``), the frozen ones included (a frozen VACE branch then adds zero: its
  ``after_proj`` is zero; frozen LoRA likewise: B is zero).

  ``model.vace == False`` (a plain Wan DiT, pretraining): the loss is plain Wan TI2V flow
  matching on the same sequence, without the memory read and the VACE input; the memory
  config, the camera fields and the control latents (so the VAE) are not used.

  Batches are pre-encoded latent clips (``data_pipelines.latent_clips``; nothing is encoded
  per step). Per clip: the memory (``config.memory.backend``) is written from the source
  latent frames (``config.denoiser.memory_write``: 'first_target', the reference's: the
  clean first target latent with its depth; 'preceding': the preceding latents; 'both') and
  read into the target + preceding cameras; the VACE input is that read and the encoded
  all-ones control (``wan_mirage.vace_context``); the DiT sees ``[references | noisy target
  | preceding]`` with per-frame timesteps (``wan_mirage.predict``, the forward pass the
  world model's sampler makes; without VACE: no ``vace``); loss as
  ``wan_mirage.flow_loss``. Captions are
  dropped (replaced by the empty-prompt embedding) with probability
  ``config.denoiser.caption_dropout`` and wherever the clip has none.
  """

  FIELDS = ("target_latents", "preceding_latents", "reference_latents", "depths",
            "static_masks", "intrinsics", "poses_c2w", "text", "has_text")
  # What only the memory read needs (a DiT without VACE reads no memory).
  GEOMETRY = ("depths", "static_masks", "intrinsics", "poses_c2w")
  MEMORY_WRITE = ("first_target", "preceding", "both")

  def __init__(self, config: ml_collections.ConfigDict, frozen: Any = None):
    self.config = config
    d = config.denoiser
    self.cfg = d.model
    self.wm, self.wan_dit = wan_mirage, wan_dit
    if not 5 <= d.target_frames or (d.target_frames - 1) % 4:
      raise InputError("config.denoiser", "target_frames", f"must be 1 + 4 k (k >= 1) video "
                       f"frames, got {d.target_frames}")
    if d.preceding_frames < 0 or d.reference_frames < 0:
      raise InputError("config.denoiser", "preceding_frames", "must be >= 0 (and "
                       "reference_frames >= 0)")
    if not 0.0 <= float(d.caption_dropout) <= 1.0:
      raise InputError("config.denoiser", "caption_dropout", f"a probability in [0, 1], got "
                       f"{d.caption_dropout}")
    self.uses_vace = bool(self.cfg.vace)  # False: a plain Wan DiT, no memory, no VACE input
    if self.uses_vace and d.memory_write not in self.MEMORY_WRITE:
      raise InputError("config.denoiser", "memory_write", f"expected one of "
                       f"{self.MEMORY_WRITE}, got {d.memory_write!r}")
    if self.uses_vace and d.memory_write != "first_target" and not d.preceding_frames:
      raise InputError("config.denoiser", "memory_write", "needs preceding_frames > 0")
    h, w = (int(r) for r in config.data.resolution)
    if h % 32 or w % 32:
      raise InputError("config.data", "resolution", f"{(h, w)}: must be multiples of 32 (16x "
                       "VAE, 2x2 DiT patches)")
    self.latent_hw = (h // 16, w // 16)
    self.num_target = (d.target_frames - 1) // 4 + 1
    self.num_preceding = (((d.preceding_frames - 1) // 4 + 1) if d.preceding_frames else 0)
    self.num_reference = int(d.reference_frames)
    try:
      self.trainable = wan_dit.trainable_filter(self.cfg, tuple(d.train_stages))
    except InputError as e:
      raise InputError("config.denoiser", "train_stages", e.problem) from e
    if self.trainable is nnx.Nothing:
      raise InputError("config.denoiser", "train_stages", f"{tuple(d.train_stages)} trains "
                       "nothing with this model (vace off or lora_rank 0)")
    want_ch = 96 + (1 if d.vace_coverage else 0)
    if self.uses_vace and self.cfg.vace_in_channels != want_ch:
      raise InputError("config.denoiser.model", "vace_in_channels", f"the VACE input has "
                       f"{want_ch} channels (memory 48 + control 48"
                       f"{' + coverage 1' if d.vace_coverage else ''}); model has "
                       f"vace_in_channels={self.cfg.vace_in_channels}")
    self.from_scratch = "base" in d.train_stages and not d.base_checkpoint
    self.noise_levels = noise_levels(config)
    if self.uses_vace:
      self.memory = memory_lib.get_backend(config.memory.backend)
      self.memory_cfg = train_memory_config(config, wan_mirage.memory_config(config),
                                            len(self._memory_sources()))
    model = nnx.eval_shape(lambda: self.build(nnx.Rngs(0)))
    self._graphdef_full, trainable, rest = nnx.split(model, self.trainable, ...)
    self.base_abstract = rest.to_pure_dict()  # {} when everything trains
    self.base_specs = nnx.get_partition_spec(rest).to_pure_dict()
    self.initial_params = None
    f_lat = self.num_target + self.num_preceding
    if frozen == "abstract":  # shapes only (AOT)
      sds = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
      self.frozen = {"base": self.base_abstract,
                     "empty_text": sds((d.text_len, self.cfg.text_dim))}
      if self.uses_vace:
        self.frozen["control"] = sds((f_lat,) + self.latent_hw + (48,))
    elif frozen is not None:
      self.frozen = frozen
    else:
      self.frozen = None  # loaded by load_frozen(mesh), which needs the mesh

  # --------------------------------------------------------------------------- params

  def build(self, rngs: nnx.Rngs) -> nnx.Module:
    return self.wan_dit.WanDiT(self.cfg, rngs=rngs)

  def merge(self, graphdef, params, frozen) -> nnx.Module:
    return nnx.merge(graphdef, nnx.State(params), nnx.State(frozen["base"]))

  def frozen_shardings(self, mesh: Mesh, rules) -> dict:
    replicated = NamedSharding(mesh, PartitionSpec())
    with sharding.use_rules(rules):
      base = sharding.logical_to_sharding(self.base_specs, mesh, rules, self.base_abstract,
                                          params=True)
    out = {"base": base, "empty_text": replicated}
    if self.uses_vace:
      out["control"] = replicated
    return out

  def load_frozen(self, mesh: Mesh, rules) -> None:
    """Loads the frozen base (sharded; from the random init when training from scratch),
    the control latents (with VACE) and the empty-prompt embedding; sets ``self.frozen``
    and ``self.initial_params`` (trainable params the base export has)."""
    d = self.config.denoiser
    if not d.base_checkpoint and not self.from_scratch:
      raise InputError("config.denoiser.base_checkpoint", "base_checkpoint", "the Wan "
                       "fine-tuning stage needs a Wan DiT export (python -m "
                       "mirage_jax.convert_wan), unless train_stages has 'base' (from scratch)")
    shard = self.frozen_shardings(mesh, rules)["base"]
    if self.from_scratch:
      base, n_initial = self._init_frozen(mesh, rules, shard), 0
    else:
      base, n_initial = self._load_base(mesh, rules, shard)
    replicated = NamedSharding(mesh, PartitionSpec())
    self.frozen = {"base": base, "empty_text": jax.device_put(self._empty_text(), replicated)}
    if self.uses_vace:
      self.frozen["control"] = jax.device_put(self._control(), replicated)
    logging.info("Wan base from %s: %d frozen params; %d trainable params start from it",
                 d.base_checkpoint or "the random init (from scratch)",
                 len(exports.flat_paths(self.base_abstract)), n_initial)

  def _init_frozen(self, mesh: Mesh, rules, shard) -> dict:
    """The frozen params at the random init of ``config.seed`` (the one ``init_state`` gives
    the trainable ones), created in their shardings; {} when everything trains."""
    if not self.base_abstract:
      return {}

    def init():
      _, _, rest = nnx.split(self.build(nnx.Rngs(self.config.seed)), self.trainable, ...)
      return rest.to_pure_dict()

    with jax.set_mesh(mesh), sharding.use_rules(rules):
      return jax.jit(init, out_shardings=shard)()

  def _load_base(self, mesh: Mesh, rules, shard) -> tuple[dict, int]:
    """(frozen params from the base export chain, the number of trainable params found
    there: set as ``self.initial_params``)."""
    d = self.config.denoiser
    model = nnx.eval_shape(lambda: self.build(nnx.Rngs(0)))
    _, trainable, rest = nnx.split(model, self.trainable, ...)
    t_specs = nnx.get_partition_spec(trainable).to_pure_dict()
    t_abs = trainable.to_pure_dict()
    with sharding.use_rules(rules):
      t_shard = sharding.logical_to_sharding(t_specs, mesh, rules, t_abs)
    abstract = {}
    for tree, sh in ((rest.to_pure_dict(), shard), (t_abs, t_shard)):
      flat_a, flat_s = exports.flat_paths(tree), exports.flat_paths(sh)
      for p, a in flat_a.items():
        abstract[p] = jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=flat_s[p])
    loaded = exports.load_dit_params(d.base_checkpoint, self.cfg, abstract)
    base_paths = set(exports.flat_paths(rest.to_pure_dict()))
    missing = sorted(base_paths - set(loaded))
    if missing:
      raise InputError(d.base_checkpoint, "/".join(missing[0]), "missing from the base export "
                       f"(and not trained by train_stages {tuple(d.train_stages)}): "
                       f"{len(missing)} frozen params absent")
    base = exports.nest({p: v for p, v in loaded.items() if p in base_paths})
    initial = {p: v for p, v in loaded.items() if p not in base_paths}
    self.initial_params = exports.nest(initial) if initial else None
    return base, len(initial)

  def rollout_args(self, graphdef, ema) -> tuple:
    """(no autoencoder, the EMA params ``ema`` over the frozen base gathered to the host, the
    empty-prompt embedding) for the training rollouts."""
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    frozen = multihost_utils.process_allgather(self.frozen, tiled=True)
    dn = self.merge(graphdef, ema, frozen)
    return None, dn, dict(empty_text=np.asarray(frozen["empty_text"]))

  def _data_side(self, name: str):
    if self.config.data.dataset != "wan_latents":
      return None
    from data_pipelines import latent_clips  # pylint: disable=g-import-not-at-top
    return latent_clips.load_side_array(self.config.data.data_dir, name)

  def _control(self) -> np.ndarray:
    """(Tl + Pl, h, w, 48): the dataset's control_latents.npy, else encoded with the VAE
    export ``config.denoiser.autoencoder_checkpoint``."""
    from data_pipelines import latent_clips  # pylint: disable=g-import-not-at-top
    want = (self.num_target + self.num_preceding,) + self.latent_hw + (48,)
    control = self._data_side(latent_clips.CONTROL)
    if control is not None:
      if self.config.data.drop_preceding:
        control = control[:want[0]]  # causal VAE: the target part is the video's start
      if control.shape != want:
        raise InputError(os.path.join(self.config.data.data_dir, latent_clips.CONTROL),
                         "control_latents", f"shape {control.shape}, the config needs {want}")
      return np.asarray(control, np.float32)
    from mirage_jax.families.wan import vae as wan_vae  # pylint: disable=g-import-not-at-top
    vae, _ = wan_vae.load_export(self.config.denoiser.autoencoder_checkpoint)
    return np.asarray(self.wm.control_latents(vae, want[0], *self.latent_hw))

  def _empty_text(self) -> np.ndarray:
    """(text_len, D) umT5 embedding of "" that dropped captions become:
    ``config.denoiser.empty_text`` (.npy (Lt <= text_len, D), zero-padded), else the
    dataset's empty_text.npy, else the base export chain's file or the known text encoder's
    ``empty()`` (``world_model.empty_prompt``), else zeros with a warning (umT5's embedding
    of "" is not zero)."""
    from data_pipelines import latent_clips  # pylint: disable=g-import-not-at-top
    from mirage_jax.families.wan import world_model  # pylint: disable=g-import-not-at-top
    d = self.config.denoiser
    want = (d.text_len, self.cfg.text_dim)
    if not d.empty_text:
      empty = self._data_side(latent_clips.EMPTY_TEXT)
      if empty is not None:
        if empty.shape != want:
          raise InputError(self.config.data.data_dir, "empty_text", f"shape {empty.shape}, "
                           f"the config needs {want}")
        return np.asarray(empty, np.float32)
    empty, _ = world_model.empty_prompt(self.config, what="caption dropout in training")
    return np.zeros(want, np.float32) if empty is None else np.asarray(empty, np.float32)

  # --------------------------------------------------------------------------- input

  @property
  def fields(self) -> tuple[str, ...]:
    return tuple(f for f in self.FIELDS if (f != "reference_latents" or self.num_reference)
                 and (self.uses_vace or f not in self.GEOMETRY))

  def batch_shapes(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    b = self.config.data.batch_size
    h, w = self.latent_hw
    tl, pl, r = self.num_target, self.num_preceding, self.num_reference
    f = tl + pl
    return {"target_latents": ((b, tl, h, w, 48), jnp.float32),
            "preceding_latents": ((b, pl, h, w, 48), jnp.float32),
            "reference_latents": ((b, r, h, w, 48), jnp.float32),
            "depths": ((b, f, h, w), jnp.float32), "static_masks": ((b, f, h, w), jnp.uint8),
            "intrinsics": ((b, f, 3, 3), jnp.float32), "poses_c2w": ((b, f, 4, 4), jnp.float32),
            "text": ((b, self.config.denoiser.text_len, self.cfg.text_dim), jnp.float32),
            "has_text": ((b,), jnp.bool_)}

  def check_source(self, source, where: str) -> None:
    """The latent dataset's metadata must match the config's shapes."""
    meta = getattr(source, "metadata", None)
    if meta is None:
      return
    d = self.config.denoiser
    want = dict(target_frames=d.target_frames, preceding_frames=d.preceding_frames,
                latent_hw=list(self.latent_hw), text_len=d.text_len,
                text_dim=self.cfg.text_dim)
    if self.config.data.drop_preceding:  # the dataset's preceding latents unused
      if d.preceding_frames:
        raise InputError("config.data", "drop_preceding", "needs config.denoiser."
                         f"preceding_frames = 0, got {d.preceding_frames}")
      del want["preceding_frames"]
    for k, v in want.items():
      if meta.get(k) != v:
        raise InputError(where, k, f"{meta.get(k)!r} in the latent dataset, {v!r} in the "
                         "config")
    if meta.get("num_references", 0) < self.num_reference:
      raise InputError(where, "num_references", f"the dataset has {meta.get('num_references')}"
                       f" references per clip, config.denoiser.reference_frames is "
                       f"{self.num_reference}")

  # --------------------------------------------------------------------------- loss

  def _memory_sources(self) -> list[int]:
    """Indices into [target | preceding] latent frames the memory is written from."""
    tl, pl = self.num_target, self.num_preceding
    return {"first_target": [0], "preceding": list(range(tl, tl + pl)),
            "both": [0] + list(range(tl, tl + pl))}[self.config.denoiser.memory_write]

  def memory_read(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(B, Tl + Pl, h, w, 48) memory read (zeros in holes) and coverage (B, Tl + Pl, h, w)."""
    src = np.asarray(self._memory_sources())
    lat = jnp.concatenate([batch["target_latents"], batch["preceding_latents"]], axis=1)

    def one(lat, depth, static, K, c2w):
      return self.wm.splat_memory(self.memory, self.memory_cfg, lat[src], depth[src],
                                  K[src], c2w[src], static[src].astype(bool), K, c2w)

    return memory_lib.batch_map(one, lat, batch["depths"], batch["static_masks"],
                                batch["intrinsics"], batch["poses_c2w"])

  def loss(self, model, frozen, batch: Batch, rng):
    d = self.config.denoiser
    x0 = batch["target_latents"].astype(jnp.float32)
    b = x0.shape[0]
    k_sig, k_noise, k_drop, k_lora = jax.random.split(rng, 4)
    sigmas = self.wm.sample_sigmas(k_sig, b, self.num_target, d.time_shift, d.first_frame_clean,
                                   *self.noise_levels)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    noisy = diffusion.add_noise(x0, noise, sigmas)
    metrics = {}
    vace = None
    if self.uses_vace:
      memory, coverage = self.memory_read(batch)
      vace = self.wm.vace_context(memory, frozen["control"],
                                  coverage if d.vace_coverage else None)
      metrics["memory_coverage"] = coverage.astype(jnp.float32).mean()
    text, drop = self.caption_text(batch["text"], batch["has_text"], frozen["empty_text"],
                                   k_drop)
    refs = batch["reference_latents"] if self.num_reference else None
    pred = self.wm.predict(model, refs, noisy, batch["preceding_latents"], sigmas, text, vace,
                           deterministic=False, rngs=nnx.Rngs(dropout=k_lora))
    loss = self.wm.flow_loss(pred, x0, noise, d.first_frame_clean)
    return loss, dict(metrics, caption_dropped=drop.astype(jnp.float32).mean())

  def caption_text(self, text: jax.Array, has_text: jax.Array, empty: jax.Array,
                   rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Caption dropout: the DiT's text (B, Lt, D), each row of ``text`` replaced by the
    empty-prompt embedding ``empty`` (Lt, D) with probability
    ``config.denoiser.caption_dropout`` (one Bernoulli draw of ``rng`` per row, so the same
    step key drops the same rows) and wherever ``has_text`` (B,) is False; and the (B,) bool
    rows replaced."""
    p = float(self.config.denoiser.caption_dropout)
    drop = jax.random.bernoulli(rng, p, has_text.shape) | ~has_text.astype(bool)
    return self.wm.caption_or_empty(text, empty, drop), drop

  def step_flops(self, batch_size: int) -> float:
    h, w = self.latent_hw
    f = self.num_reference + self.num_target + self.num_preceding
    args = (jax.ShapeDtypeStruct((batch_size, f, h, w, 48), jnp.float32),
            jax.ShapeDtypeStruct((batch_size, f), jnp.float32),
            jax.ShapeDtypeStruct((batch_size, self.config.denoiser.text_len, self.cfg.text_dim),
                                 jnp.float32))
    if self.uses_vace:
      args += (jax.ShapeDtypeStruct((batch_size, f - self.num_reference, h, w,
                                     self.cfg.vace_in_channels), jnp.float32),)
    fwd = model_flops(lambda: self.build(nnx.Rngs(0)),
                      lambda m, x, t, c, v=None: m(x, t, c, num_reference=self.num_reference,
                                                   vace_context=v), *args)
    # Backward = the activations' gradients (~1x forward, through the whole DiT: the VACE
    # hints feed every later block) + the weights' gradients (~1x forward when every weight
    # trains). Full training: exactly the usual 3x forward; with a frozen base its weight
    # gradients are not formed, so 3x is an upper bound there.
    return 3.0 * fwd


# ============================================================================= the VAE


def vae_loss_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``config.autoencoder_loss`` (absent fields: their defaults), checked.

  Fields: ``l1_weight`` (3.0) and ``kl_weight`` (3e-6), the Wan report's weights of its L1
  reconstruction and KL terms; ``sample_posterior`` (True): decode ``mu + sigma * eps``
  (False: decode ``mu``, a plain autoencoder).
  """
  defaults = dict(l1_weight=3.0, kl_weight=3e-6, sample_posterior=True)
  given = config.get("autoencoder_loss") or {}
  given = given.to_dict() if hasattr(given, "to_dict") else dict(given)
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise InputError("config.autoencoder_loss", unknown[0], f"unknown field; known: "
                     f"{sorted(defaults)}")
  out = {**defaults, **dict(given)}
  for name in ("l1_weight", "kl_weight"):
    if not out[name] >= 0:
      raise InputError("config.autoencoder_loss", name, f"must be >= 0, got {out[name]!r}")
  if out["l1_weight"] == 0:
    raise InputError("config.autoencoder_loss", "l1_weight", "must be > 0 (the only "
                     "reconstruction term)")
  return out


class WanVAEStage(StageBase):
  """Training the Wan2.2 VAE (``families.wan.vae.WanVAE``, encoder + decoder) on RGB clips.

  ``config.family == 'wan'``, ``config.stage == 'autoencoder'``. Batches: the video
  pipeline's ``frames`` (B, T, H, W, 3), RGB in [-1, 1] (uint8 on the way to the device,
  converted in the step), with T = ``config.data.num_frames`` = 1 + 4 k and H, W =
  ``config.data.resolution`` multiples of 16 (the VAE's 4x time and 16x space factors).

  Loss (per clip, then the batch mean). The Wan report (Wan: Open and Advanced Large-Scale
  Video Generative Models, arXiv 2503.20314, "Wan-VAE / Training") trains the VAE with "L1
  reconstruction loss, KL loss, and LPIPS perceptual loss, weighted by coefficients of 3,
  3e-6, and 3", on 128x128 5-frame clips after inflating a 2D image VAE, and then fine-tunes
  with a GAN loss from a 3D discriminator. Neither the Wan2.1 nor the Wan2.2 repository
  publishes VAE training code, so the normalisation of the terms is not known; here:

    loss = l1_weight * mean|x - D(z)| + kl_weight * sum KL(q(z|x) || N(0, I)) / #pixel values

  i.e. the L1 mean over pixel values and the KL summed over latent elements and divided by
  the same count: the per-sample-sum convention of the LDM autoencoders (whose KL weight,
  1e-6, is of this order) rescaled to O(1). ``z = mu + exp(logvar / 2) * eps`` from the
  encoder's moments (``WanVAE.encode_moments``: mean and log-variance, as the released
  encoder's 2 x 48 output channels), logvar clipped to [-30, 20] as LDM's posterior does;
  the decoder runs on raw (unnormalised) z, without the inference clamp to [-1, 1] (it would
  stop the gradient of saturated pixels). Weights: ``config.autoencoder_loss``
  (:func:`vae_loss_settings`).

  Left out: LPIPS needs a pretrained VGG/AlexNet whose weights cannot be fetched here and no
  maintained JAX LPIPS package with bundled weights is installed; the GAN term is the
  report's last fine-tuning stage only. Without them reconstructions are blurrier than the
  released VAE's; L1 + KL is the report's recipe minus the perceptual term.

  Start: random init, or ``config.autoencoder_checkpoint``, a Wan VAE export (``convert_wan``'s
  ``EXPORT/vae`` or an export of this stage) of the same sizes, restored straight into the
  params' shardings (``load_frozen``). The export of a run (``python -m mirage_jax.export``)
  is a Wan VAE export like a converted one: ``families.wan.vae.load_export`` loads it and
  ``data_pipelines.encode_latents --vae`` encodes with it, normalising with
  ``config.autoencoder.latents_mean/std`` (the released constants unless changed; a VAE
  trained from scratch has its own latent statistics, the ``latent_std`` metric shows their
  scale).

  Sharding: the params' logical axes through ``config.logical_rules`` (FSDP), activations
  constrained to ("batch", ...) inside the VAE; remat: ``config.autoencoder.remat`` (per
  level and middle block); precision: ``config.autoencoder.dtype`` / ``param_dtype``.
  """

  fields = ("frames",)

  def __init__(self, config: ml_collections.ConfigDict, frozen: Any = None):
    self.config = config
    d = config.data
    t = int(d.num_frames)
    step = wan_vae.temporal_factor(config.autoencoder)
    if t < 1 or (t - 1) % step:
      raise InputError("config.data", "num_frames", f"the Wan VAE takes 1 + {step} k frames "
                       f"(1, 5, 9, ...), got {t}")
    f = wan_vae.spatial_factor(config.autoencoder)
    h, w = (int(r) for r in d.resolution)
    if h < f or w < f or h % f or w % f:
      raise InputError("config.data", "resolution", f"{(h, w)}: height and width must be "
                       f"positive multiples of {f} (the VAE's spatial factor)")
    self.loss_settings = vae_loss_settings(config)
    self.checkpoint = config.autoencoder_checkpoint or ""
    # With an export to start from, ``load_frozen`` (called when frozen is None) reads it.
    self.frozen = None if self.checkpoint and frozen != "abstract" else {}
    self.initial_params = None

  def build(self, rngs: nnx.Rngs) -> nnx.Module:
    return wan_vae.WanVAE(self.config.autoencoder, rngs=rngs)

  def load_frozen(self, mesh: Mesh, rules) -> None:
    """Sets ``initial_params`` from ``config.autoencoder_checkpoint``, each param restored
    straight into its sharding on ``mesh`` (nothing is frozen: ``frozen`` becomes {})."""
    from mirage_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
    from mirage_jax import families, paths  # pylint: disable=g-import-not-at-top
    self.frozen = {}
    path = self.checkpoint
    if not path:
      return
    field = "autoencoder_checkpoint"
    if not paths.isdir(path):
      raise InputError(path, field, "no such export directory (a Wan VAE export: "
                       "convert_wan's EXPORT/vae, or python -m mirage_jax.export of this stage)")
    cfg = ckpt_lib.export_config(path)
    where = paths.join(path, "config.json")
    if cfg.get("stage") != "autoencoder" or families.family_name(cfg) != "wan":
      raise InputError(where, "family", f"not a Wan VAE export (stage {cfg.get('stage')!r}, "
                       f"family {families.family_name(cfg)!r})")
    mine = self.config.autoencoder
    for name in ("z_dim", "in_channels", "patch_size", "encoder_dim", "decoder_dim",
                 "dim_mult", "encoder_res_blocks", "decoder_res_blocks", "temporal_downsample"):
      a, b = cfg.autoencoder.get(name), mine.get(name)
      norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
      if norm(a) != norm(b):
        raise InputError(where, f"autoencoder.{name}", f"{a!r} in the export, {b!r} in the "
                         "config: an export of another VAE")
    _, params = nnx.split(nnx.eval_shape(lambda: self.build(nnx.Rngs(0))), nnx.Param)
    abstract = params.to_pure_dict()
    with sharding.use_rules(rules):
      shardings = sharding.logical_to_sharding(
          nnx.get_partition_spec(params).to_pure_dict(), mesh, rules, abstract, params=True)
    # The export names list entries '0', '1', ...; the state's pure dict has int keys.
    loaded, _, step = ckpt_lib.load_export(path, exports.nest(exports.flat_paths(shardings)),
                                           dtype=jnp.dtype(mine.param_dtype))

    def like(tree, stored):
      return {k: like(v, stored[str(k)]) if isinstance(v, dict) else stored[str(k)]
              for k, v in tree.items()}
    self.initial_params = like(abstract, loaded)
    logging.info("Wan VAE starts from %s (step %d)", path, step)

  def loss(self, model, frozen, batch: Batch, rng):
    """batch: frames (B, T, H, W, 3) in [-1, 1]. Returns the loss and metrics: ``l1`` (mean
    |x - D(z)|), ``kl`` (per latent element), ``psnr`` (dB, of the clamped reconstruction,
    range [-1, 1], mean over clips), ``latent_std`` (std of the posterior means) and
    ``logvar`` (their mean log-variance)."""
    del frozen
    s = self.loss_settings
    video = batch["frames"].astype(jnp.float32)
    mu, logvar = model.encode_moments(video, chunked=False)  # (B, T_lat, h, w, z) each
    logvar = jnp.clip(logvar, -30.0, 20.0)
    z = mu
    if s["sample_posterior"]:
      z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mu.shape, mu.dtype)
    recon = model.decode(z, normalized=False, chunked=False, clamp=False)
    per_value = video[0].size
    l1 = jnp.mean(jnp.abs(recon - video))
    kl_elem = 0.5 * (jnp.square(mu) + jnp.exp(logvar) - 1.0 - logvar)
    kl_per_clip = jnp.sum(kl_elem, axis=(1, 2, 3, 4)) / per_value
    loss = s["l1_weight"] * l1 + s["kl_weight"] * jnp.mean(kl_per_clip)
    mse = jnp.mean(jnp.square(jnp.clip(recon, -1.0, 1.0) - video), axis=(1, 2, 3, 4))
    psnr = jnp.mean(10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10)))
    return loss, {"l1": l1, "kl": jnp.mean(kl_elem), "psnr": psnr,
                  "latent_std": jnp.std(mu), "logvar": jnp.mean(logvar)}

  def step_flops(self, batch_size: int) -> float:
    d = self.config.data
    h, w = d.resolution
    video = jax.ShapeDtypeStruct((batch_size, d.num_frames, h, w, 3), jnp.float32)
    fwd = model_flops(lambda: self.build(nnx.Rngs(0)),
                      lambda m, v: m.decode(m.encode_moments(v, chunked=False)[0],
                                            normalized=False, chunked=False, clamp=False),
                      video)
    return 3.0 * fwd  # forward + backward (twice the forward)
