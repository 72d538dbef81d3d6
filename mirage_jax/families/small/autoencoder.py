"""RGB-D VAE: frames + metric depth <-> a small-KL latent at 1/4 or 1/8 resolution.

Depth is encoded as normalised log-depth,

  d_n = clip((log(depth) - log(depth_ref)) / depth_log_scale, -1, 1),

so depths from ``depth_ref * exp(-depth_log_scale)`` to ``depth_ref * exp(depth_log_scale)``
(0.14 m to 7.4 m with the defaults 1 m and 2) map to [-1, 1], with equal relative precision
at every range. The decoder predicts ``d_n`` and returns metric depth
``depth_ref * exp(depth_log_scale * tanh(raw))``, always > 0 and inside that range.

Per-frame (image) VAE: no temporal compression. Video latents are per-frame latents stacked
on the time axis.

Dynamic head (``dynamic_head_width`` > 0): a small conv net on the *latents* predicts, per
latent cell, the logit that the cell shows moving content. It reads latents, not pixels, so
the rollout can apply it to generated latents as well as to the encoded first frame; its
loss does not reach the encoder (the latent space stays a pure reconstruction code). The
rollout keeps cells it marks as moving out of the static memory (``rollout.Rollout``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mirage_jax.nn import layers


def autoencoder_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  """Size preset: 'tiny' (CPU tests and laptop runs) or 'base'."""
  sizes = {"tiny": (32, (1, 2, 2)), "base": (128, (1, 2, 4, 4))}
  if variant not in sizes:
    raise ValueError(f"unknown autoencoder variant {variant!r}; known: {sorted(sizes)}")
  width, mults = sizes[variant]
  cfg = ml_collections.ConfigDict()
  cfg.latent_channels = 8
  cfg.base_channels = width
  cfg.channel_mults = mults  # one entry per resolution; len - 1 = log2(downsample)
  cfg.num_res_blocks = 1
  cfg.depth_ref = 1.0  # metres
  cfg.depth_log_scale = 2.0
  cfg.kl_weight = 1e-6
  cfg.depth_weight = 1.0
  cfg.rgb_loss = "l1"  # 'l1' | 'l2'
  cfg.dynamic_head_width = 32  # 0 = no dynamic head
  cfg.dynamic_weight = 0.1  # weight of its loss (the head alone receives it)
  cfg.dynamic_pos_weight = 4.0  # moving cells are rare: weight of the positive class
  cfg.dtype = "float32"
  cfg.param_dtype = "float32"
  return cfg


def downsample_factor(cfg) -> int:
  """Spatial downsampling of the latent (2 ** (len(channel_mults) - 1))."""
  return 2 ** (len(cfg.channel_mults) - 1)


def normalize_depth(depth: jax.Array, cfg) -> jax.Array:
  """(B, H, W) metric depth -> normalised log-depth in [-1, 1]."""
  logd = jnp.log(jnp.maximum(depth, 1e-6)) - math.log(cfg.depth_ref)
  return jnp.clip(logd / cfg.depth_log_scale, -1.0, 1.0)


def denormalize_depth(depth_n: jax.Array, cfg) -> jax.Array:
  """Normalised log-depth (any shape) -> metric depth (> 0)."""
  return cfg.depth_ref * jnp.exp(cfg.depth_log_scale * depth_n)


class ResBlock(nnx.Module):
  """GroupNorm-SiLU-Conv x2 with a 1x1 skip when the width changes."""

  def __init__(self, in_ch: int, out_ch: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = nnx.GroupNorm(in_ch, num_groups=min(8, in_ch), dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
    self.conv1 = layers.Conv(in_ch, out_ch, 3, **kw)
    self.norm2 = nnx.GroupNorm(out_ch, num_groups=min(8, out_ch), dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
    self.conv2 = layers.Conv(out_ch, out_ch, 3, **kw)
    self.skip = layers.Conv(in_ch, out_ch, 1, **kw) if in_ch != out_ch else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, in_ch) -> (B, H, W, out_ch)."""
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    return (x if self.skip is None else self.skip(x)) + h


class Autoencoder(nnx.Module):
  """Convolutional RGB-D VAE (see module docstring for the depth encoding)."""

  def __init__(self, cfg, rngs: nnx.Rngs):
    if cfg.rgb_loss not in ("l1", "l2"):
      raise ValueError(f"rgb_loss must be 'l1' or 'l2', got {cfg.rgb_loss!r}")
    self.cfg = cfg
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    widths = [cfg.base_channels * m for m in cfg.channel_mults]
    # Encoder: conv_in, then per level res blocks and a stride-2 conv (except the last level).
    self.enc_in = layers.Conv(4, widths[0], 3, **kw)
    enc = []
    for i, w in enumerate(widths):
      w_in = widths[max(i - 1, 0)]
      enc.extend(ResBlock(w_in if j == 0 else w, w, **kw) for j in range(cfg.num_res_blocks))
      if i < len(widths) - 1:
        enc.append(layers.Conv(w, w, 3, stride=2, **kw))
    self.enc = nnx.List(enc)
    self.enc_norm = nnx.GroupNorm(widths[-1], num_groups=min(8, widths[-1]), dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    self.enc_out = layers.Conv(widths[-1], 2 * cfg.latent_channels, 3, **kw)
    # Decoder mirrors it with nearest-neighbour 2x upsampling + conv.
    self.dec_in = layers.Conv(cfg.latent_channels, widths[-1], 3, **kw)
    dec = []
    rev = widths[::-1]
    for i, w in enumerate(rev):
      w_in = rev[max(i - 1, 0)]
      dec.extend(ResBlock(w_in if j == 0 else w, w, **kw) for j in range(cfg.num_res_blocks))
      if i < len(rev) - 1:
        dec.append(layers.Conv(w, w, 3, **kw))  # applied after upsampling
    self.dec = nnx.List(dec)
    self.dec_norm = nnx.GroupNorm(widths[0], num_groups=min(8, widths[0]), dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    self.dec_out = layers.Conv(widths[0], 4, 3, **kw)
    width = int(cfg.get("dynamic_head_width", 0))  # exports made before the head lack it
    head = None
    if width:
      logits = layers.Conv(width, 1, 3, zero_init=True, **kw)
      # Start at the prior "1% of cells move": an untrained head keeps everything static.
      logits.bias.value = jnp.full((1,), -math.log(99.0), param_dtype)
      head = nnx.List([layers.Conv(cfg.latent_channels, width, 3, **kw),
                       layers.Conv(width, width, 3, **kw), logits])
    self.dynamic = nnx.data(head)

  @property
  def has_dynamic_head(self) -> bool:
    return self.dynamic is not None

  def dynamic_logits(self, latents: jax.Array) -> jax.Array:
    """Latents (B, h, w, latent_channels) (unscaled) -> logits (B, h, w) that a cell moves."""
    h = latents
    for i, layer in enumerate(self.dynamic):
      h = layer(h) if i == 0 else layer(jax.nn.silu(h))
    return h[..., 0].astype(jnp.float32)

  def encode(self, frames: jax.Array, depth: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Posterior parameters.

    Args:
      frames: (B, H, W, 3) RGB in [-1, 1]; H, W divisible by the downsample factor.
      depth: (B, H, W) metric z-depth (> 0).
    Returns:
      mean, logvar: each (B, H/f, W/f, latent_channels), float32.
    """
    f = downsample_factor(self.cfg)
    if frames.shape[1] % f or frames.shape[2] % f:
      raise ValueError(f"image size {frames.shape[1:3]} not divisible by downsample {f}")
    x = jnp.concatenate([frames, normalize_depth(depth, self.cfg)[..., None]], -1)
    h = self.enc_in(x)
    for layer in self.enc:
      h = layer(h)
    h = self.enc_out(jax.nn.silu(self.enc_norm(h))).astype(jnp.float32)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Latents (B, h, w, latent_channels) -> rgb (B, H, W, 3) in [-1, 1], depth (B, H, W) metric."""
    rgb, depth_n = self.decode_normalized(latents)
    return rgb, denormalize_depth(depth_n, self.cfg)

  def decode_normalized(self, latents: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Like :meth:`decode` but depth as normalised log-depth (B, H, W) in [-1, 1]."""
    h = self.dec_in(latents)
    for layer in self.dec:
      if isinstance(layer, layers.Conv):
        b, hh, ww, c = h.shape
        h = jax.image.resize(h, (b, 2 * hh, 2 * ww, c), "nearest")
      h = layer(h)
    out = jnp.tanh(self.dec_out(jax.nn.silu(self.dec_norm(h))).astype(jnp.float32))
    return out[..., :3], out[..., 3]

  def __call__(self, frames, depth, rng):
    """Encode, sample the posterior, decode. Returns (rgb, depth_n, mean, logvar)."""
    mean, logvar = self.encode(frames, depth)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    rgb, depth_n = self.decode_normalized(z)
    return rgb, depth_n, mean, logvar


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, 1)) summed over latent dims, averaged over the batch."""
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return kl.reshape(kl.shape[0], -1).sum(-1).mean()


def dynamic_target(masks: jax.Array, factor: int) -> jax.Array:
  """Object-id masks (B, H, W) -> (B, H/f, W/f) bool: a cell moves if any of its pixels does.

  Any, not most: a cell wrongly kept static puts part of an object into the static memory
  (a ghost), a cell wrongly marked moving only leaves a hole that later views fill.
  """
  b, h, w = masks.shape
  blocks = (masks > 0).reshape(b, h // factor, factor, w // factor, factor)
  return blocks.any(axis=(2, 4))


def dynamic_loss(model: Autoencoder, mean: jax.Array, masks: jax.Array) -> tuple[jax.Array, dict]:
  """Class-weighted BCE of the dynamic head on stop-gradient latents.

  Args:
    mean: (B, h, w, C) posterior means. masks: (B, H, W) object ids (0 = static).
  Returns:
    (scalar loss, {dynamic_bce, dynamic_iou}): IoU of the thresholded prediction (1 when
    neither prediction nor target has a moving cell).
  """
  cfg = model.cfg
  target = dynamic_target(masks, downsample_factor(cfg))
  logits = model.dynamic_logits(jax.lax.stop_gradient(mean))
  pos = target.astype(jnp.float32)
  bce = -(cfg.dynamic_pos_weight * pos * jax.nn.log_sigmoid(logits)
          + (1.0 - pos) * jax.nn.log_sigmoid(-logits))
  pred = logits > 0
  inter, union = jnp.sum(pred & target), jnp.sum(pred | target)
  iou = jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)
  return jnp.mean(bce), {"dynamic_bce": jnp.mean(bce), "dynamic_iou": iou}


def loss(model: Autoencoder, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
  """VAE loss: RGB reconstruction + depth reconstruction (normalised space) + weighted KL,
  plus the dynamic head's weighted BCE when the model has the head.

  Args:
    model: the autoencoder.
    batch: {'frames': (B, H, W, 3) float in [-1, 1], 'depths': (B, H, W) metric depth,
      'dynamic_masks': (B, H, W) uint8 object ids (needed with the dynamic head),
      optional 'depth_valid': (B, H, W) 0/1 (0: a depth hole, not supervised)}.
    rng: PRNG key for the posterior sample.
  Returns:
    (scalar loss, metrics dict of scalars: rgb, depth, kl, depth_abs_rel[, dynamic_bce,
    dynamic_iou]).
  """
  cfg = model.cfg
  frames, depth = batch["frames"], batch["depths"]
  rgb, depth_n, mean, logvar = model(frames, depth, rng)
  diff = rgb - frames
  rgb_loss = jnp.mean(jnp.abs(diff)) if cfg.rgb_loss == "l1" else jnp.mean(jnp.square(diff))
  # Depth holes (sky, edges) supervise nothing: means over observed pixels only. Written so
  # that all-observed batches give the plain means bit for bit (where() selects, mean(1) = 1).
  observed = (batch["depth_valid"] != 0) if batch.get("depth_valid") is not None else None
  def depth_mean(err):
    if observed is None:
      return jnp.mean(err)
    return jnp.mean(jnp.where(observed, err, 0.0)) / jnp.maximum(jnp.mean(observed.astype(err.dtype)), 1e-6)
  depth_loss = depth_mean(jnp.abs(depth_n - normalize_depth(depth, cfg)))
  kl = kl_divergence(mean, logvar)
  total = rgb_loss + cfg.depth_weight * depth_loss + cfg.kl_weight * kl
  abs_rel = depth_mean(jnp.abs(denormalize_depth(depth_n, cfg) - depth) / depth)
  metrics = {"rgb": rgb_loss, "depth": depth_loss, "kl": kl, "depth_abs_rel": abs_rel}
  if model.has_dynamic_head:
    dyn, dyn_metrics = dynamic_loss(model, mean, batch["dynamic_masks"])
    total = total + cfg.dynamic_weight * dyn
    metrics.update(dyn_metrics)
  return total, {"loss": total, **metrics}
