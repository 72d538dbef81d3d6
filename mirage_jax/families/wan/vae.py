"""The Wan2.2 video VAE (TI2V-5B) in Flax NNX: 16x space, 4x time, 48 latent channels.

Frames (B, T, H, W, 3) in [-1, 1] with T = 1 + 4k and H, W multiples of 16 become latents
(B, 1 + k, H/16, W/16, 48). The first frame has a latent of its own; each later latent
frame summarises 4 video frames.

Structure (channels last; ``d`` the encoder width, ``D`` the decoder width):
  encoder: 2x2 patchify (3 -> 12 channels, order (c r q)), causal 3x3x3 conv to d, four
  levels of residual blocks (widths d, 2d, 4d, 4d), each level but the last ending in a
  spatial /2 (pad right/bottom by one, 3x3 stride-2 conv) that is also /2 in time on levels
  1 and 2; every level adds an ``avg_down`` shortcut of its input (space/time to channels,
  then a mean over channel groups). Middle: res block, single-head per-frame attention, res
  block. Head: RMS norm, SiLU, causal conv to 2 * 48 (mean, log-variance), then a 1x1x1 conv.
  decoder: 1x1x1 conv, causal conv to 4D, the same middle, four levels (widths 4D, 4D, 2D,
  D) of residual blocks each but the last ending in a nearest 2x spatial upsample + 3x3 conv,
  doubled in time on levels 0 and 1 (a causal time conv to two frames' channels); levels
  that upsample add a ``dup_up`` shortcut (channels to space/time). Head: RMS norm, SiLU,
  causal conv to 12 channels, unpatchify, clamp to [-1, 1].

Causality and chunking. Every time-mixing convolution sees only past frames: a 3-tap causal
conv pads time with two zero frames on the left (zero padding in space). The original runs
the encoder on frame 0 alone and then on chunks of 4 frames, and the decoder one latent frame
at a time, carrying per-layer caches of the last input frames between calls. Here every
module is ``(x, cache) -> (y, cache)``; ``cache=None`` means "start of the stream". The
chunked path runs chunk 0 with ``cache=None`` and the remaining equal-sized chunks under
``jax.lax.scan`` with the cache pytree as the carry (static shapes, jit-able). The same
modules called once on the whole clip with ``cache=None`` give the whole-clip result, which
equals the chunked one (tests/test_wan_vae.py checks it):
  * causal conv: cache = the last 2 input frames (zeros before the stream starts);
  * temporal downsample: the stream's first frame passes through, then every stride-2 window
    of 3 frames is convolved (cache: the last frame);
  * temporal upsample: the stream's first frame passes through undoubled; later frames go
    through a causal time conv (its own stream, starting after frame 0) whose 2C output
    channels are two consecutive frames;
  * ``dup_up`` drops its first ``factor_t - 1`` frames at the stream start.

Latents are normalised with 48 per-channel constants of the released model (not in the
.pth): ``z = (mu - mean) / std``; ``decode`` undoes it first.

Training (``families.wan.stages.WanVAEStage``) runs the whole-clip path on the posterior
sample; ``cfg.remat`` (optional) recomputes each level's and middle block's activations in
the backward pass.

Weights: ``original_layout(cfg)`` maps our parameters to the keys of ``Wan2.2_VAE.pth``
(names of ``wan2_2/modules/vae2_2.py``); ``load_original(model, get)`` fills a model from an
original state dict.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mirage_jax.errors import InputError
from mirage_jax import sharding
from mirage_jax.nn import attention as attention_lib
from mirage_jax.nn import layers
from mirage_jax.nn import params as params_lib
from mirage_jax.families.wan import original_layout as ol
from mirage_jax.sharding import constrain

_ACT = ("batch", "frames", "height", "width", "act_embed")
_CACHE_T = 2  # frames a 3-tap causal conv remembers

# Per-channel latent statistics of the released Wan2.2 VAE (they live in code, not in the .pth).
LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)


# ----------------------------------------------------------------------------- config


_VARIANTS = {
    # name: (encoder width, decoder width)
    "ti2v_5b": (160, 256),
    "tiny": (16, 16),
}


def wan_vae_config(variant: str = "ti2v_5b") -> ml_collections.ConfigDict:
  """'ti2v_5b' (the released Wan2.2_VAE.pth: 196 tensors, 704,688,668 params) or 'tiny'
  (widths 16/16, CPU tests)."""
  if variant not in _VARIANTS:
    raise InputError("wan_vae_config", "variant",
                     f"unknown variant {variant!r}; known: {sorted(_VARIANTS)}")
  enc, dec = _VARIANTS[variant]
  cfg = ml_collections.ConfigDict()
  cfg.variant = variant
  cfg.z_dim = 48
  cfg.in_channels = 3  # RGB only
  cfg.patch_size = 2
  cfg.encoder_dim = enc
  cfg.decoder_dim = dec
  cfg.dim_mult = (1, 2, 4, 4)
  cfg.encoder_res_blocks = 2
  cfg.decoder_res_blocks = 3
  cfg.temporal_downsample = (False, True, True)  # per encoder level; the decoder mirrors it
  cfg.latents_mean = LATENTS_MEAN
  cfg.latents_std = LATENTS_STD
  cfg.tile_size = (30, 52)  # latent rows, cols (Mirage inference)
  cfg.tile_stride = (15, 26)
  cfg.attention = "auto"  # attention.IMPLS (the middle blocks' per-frame attention)
  cfg.dtype = "float32"
  cfg.param_dtype = "float32"
  # Optional ``cfg.remat`` (training, e.g. experiments/wan22_pretrain.py): 'none' (absent:
  # the same) or a ``layers.REMAT_POLICIES`` name, applied to each encoder/decoder level and
  # middle block (see :func:`_run`).
  return cfg


def _check_config(cfg) -> None:
  where = "wan_vae config"
  if cfg.patch_size != 2 or cfg.in_channels != 3:
    raise InputError(where, "patch_size", "the Wan2.2 VAE is RGB with a 2x2 patchify")
  if len(cfg.dim_mult) != 4 or len(cfg.temporal_downsample) != 3:
    raise InputError(where, "dim_mult", "needs 4 levels and 3 temporal_downsample flags")
  for name in ("latents_mean", "latents_std"):
    if len(cfg[name]) != cfg.z_dim:
      raise InputError(where, name, f"needs {cfg.z_dim} values, got {len(cfg[name])}")
  remat = cfg.get("remat", "none")
  if remat != "none" and remat not in layers.REMAT_POLICIES:
    raise InputError(where, "remat", f"expected 'none' or one of "
                     f"{sorted(layers.REMAT_POLICIES)}, got {remat!r}")


def _run(module: nnx.Module, x: jax.Array, cache, remat: str):
  """``module(x, cache)``, under ``jax.checkpoint`` with policy ``remat`` unless 'none': the
  backward pass then recomputes the block's activations instead of keeping them (training
  at high resolution; the forward result is the same)."""
  if remat == "none":
    return module(x, cache)
  fn = nnx.remat(lambda m, x, c: m(x, c), policy=layers.REMAT_POLICIES[remat],
                 prevent_cse=False)
  return fn(module, x, cache)


def spatial_factor(cfg) -> int:
  """Pixels per latent cell along H and W (16)."""
  return cfg.patch_size * 2 ** (len(cfg.dim_mult) - 1)


def temporal_factor(cfg) -> int:
  """Video frames per latent frame after the first (4)."""
  return 2 ** sum(bool(t) for t in cfg.temporal_downsample)


# ----------------------------------------------------------------------------- layers


def _conv3d(x: jax.Array, kernel: jax.Array, stride: tuple[int, int, int],
            padding: Sequence[tuple[int, int]]) -> jax.Array:
  """x: (B, T, H, W, Ci), kernel: (kt, kh, kw, Ci, Co) -> (B, T', H', W', Co).

  On the CPU, as the sum over the kt time taps of 2D convolutions of every frame: XLA's CPU
  backend runs 2D convolutions through its fast kernels but 3D ones through a generic loop,
  5x (16 channels, 11x32x48) to 2.5x (64 channels, 5x8x12) slower on one core. Same result
  up to the order of the sums (~1e-7).
  """
  if sharding.target_platform() != "cpu":
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=stride, padding=tuple(padding),
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  (pt0, pt1), space_pad = padding[0], tuple(padding[1:])
  st = stride[0]
  if pt0 or pt1:
    x = jnp.pad(x, ((0, 0), (pt0, pt1), (0, 0), (0, 0), (0, 0)))
  kt, b = kernel.shape[0], x.shape[0]
  t_out = (x.shape[1] - kt) // st + 1
  y = None
  for dt in range(kt):
    frames = x[:, dt:dt + st * (t_out - 1) + 1:st]  # (B, T', H, W, Ci)
    yt = jax.lax.conv_general_dilated(
        frames.reshape(b * t_out, *frames.shape[2:]), kernel[dt], window_strides=stride[1:],
        padding=space_pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = yt if y is None else y + yt
  return y.reshape(b, t_out, *y.shape[1:])


class CausalConv3d(nnx.Module):
  """3D convolution, causal in time (past frames only), zero 'same' padding in space."""

  def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int, int] = (3, 3, 3), *,
               rngs: nnx.Rngs, dtype, param_dtype):
    self.kernel = layers.param(rngs, nnx.initializers.lecun_normal(), (*kernel, in_ch, out_ch),
                               (None, None, None, "conv_in", "conv_out"), param_dtype)
    self.bias = layers.param(rngs, nnx.initializers.zeros_init(), (out_ch,), ("conv_out",),
                             param_dtype)
    self.kt = kernel[0]
    self.space_pad = (kernel[1] // 2, kernel[2] // 2)
    self.dtype = dtype

  def valid(self, x: jax.Array, stride_t: int = 1) -> jax.Array:
    """No padding in time: x (B, T, H, W, in_ch) -> (B, (T - kt) // stride_t + 1, H, W, out_ch)."""
    ph, pw = self.space_pad
    y = _conv3d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), (stride_t, 1, 1),
                ((0, 0), (ph, ph), (pw, pw)))
    return y + self.bias[...].astype(self.dtype)

  def __call__(self, x: jax.Array, cache: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """One chunk of a frame stream.

    Args:
      x: (B, T, H, W, in_ch) the chunk's frames.
      cache: (B, kt - 1, H, W, in_ch) the stream's previous input frames, None at its start
        (= zero frames, the causal padding).
    Returns:
      (B, T, H, W, out_ch) and the cache for the next chunk.
    """
    x = x.astype(self.dtype)
    if cache is None:
      cache = jnp.zeros((x.shape[0], self.kt - 1, *x.shape[2:]), self.dtype)
    xc = jnp.concatenate([cache, x], axis=1)
    return self.valid(xc), xc[:, xc.shape[1] - (self.kt - 1):]


class FrameConv(nnx.Module):
  """3x3 2D convolution applied to every frame."""

  def __init__(self, in_ch: int, out_ch: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    self.kernel = layers.param(rngs, nnx.initializers.lecun_normal(), (3, 3, in_ch, out_ch),
                               (None, None, "conv_in", "conv_out"), param_dtype)
    self.bias = layers.param(rngs, nnx.initializers.zeros_init(), (out_ch,), ("conv_out",),
                             param_dtype)
    self.dtype = dtype

  def __call__(self, x: jax.Array, stride: int = 1,
               padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))) -> jax.Array:
    """x: (B, T, H, W, in_ch) -> (B, T, H', W', out_ch)."""
    y = _conv3d(x.astype(self.dtype), self.kernel[...].astype(self.dtype)[None],
                (1, stride, stride), ((0, 0), *padding))
    return y + self.bias[...].astype(self.dtype)


def _pointwise(in_ch: int, out_ch: int, *, rngs, dtype, param_dtype) -> layers.Dense:
  """A 1x1(x1) convolution is a Dense over channels."""
  return layers.Dense(in_ch, out_ch, ("conv_in", "conv_out"), rngs=rngs, dtype=dtype,
                      param_dtype=param_dtype)


class ChannelRMSNorm(nnx.Module):
  """``x / max(|x|_2, 1e-12) * sqrt(C) * scale`` over channels (the original's RMS_norm)."""

  def __init__(self, ch: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    self.scale = layers.param(rngs, nnx.initializers.ones_init(), (ch,), (None,), param_dtype)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (..., ch) -> same shape, in ``dtype`` (the norm itself in f32)."""
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
    y = x32 / jnp.maximum(norm, 1e-12) * math.sqrt(x.shape[-1]) * self.scale[...]
    return y.astype(self.dtype)


class ResBlock(nnx.Module):
  """RMS norm, SiLU, causal conv, RMS norm, SiLU, causal conv, plus a (1x1x1) shortcut."""

  def __init__(self, in_ch: int, out_ch: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = ChannelRMSNorm(in_ch, **kw)
    self.conv1 = CausalConv3d(in_ch, out_ch, **kw)
    self.norm2 = ChannelRMSNorm(out_ch, **kw)
    self.conv2 = CausalConv3d(out_ch, out_ch, **kw)
    self.shortcut = _pointwise(in_ch, out_ch, **kw) if in_ch != out_ch else None
    self.dtype = dtype

  def __call__(self, x: jax.Array, cache):
    """x: (B, T, H, W, in_ch) -> (B, T, H, W, out_ch); cache: (conv1, conv2) caches or None."""
    c1, c2 = (None, None) if cache is None else cache
    x = x.astype(self.dtype)
    skip = x if self.shortcut is None else self.shortcut(x)
    h, c1 = self.conv1(jax.nn.silu(self.norm1(x)), c1)
    h, c2 = self.conv2(jax.nn.silu(self.norm2(h)), c2)
    return skip + h, (c1, c2)


class FrameAttention(nnx.Module):
  """Single-head self-attention over the H*W cells of each frame, residual."""

  def __init__(self, ch: int, *, rngs: nnx.Rngs, dtype, param_dtype, impl: str = "auto"):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm = ChannelRMSNorm(ch, **kw)
    self.qkv = _pointwise(ch, 3 * ch, **kw)
    self.proj = _pointwise(ch, ch, **kw)
    self.dtype = dtype
    self.impl = attention_lib.check_impl(impl)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, T, H, W, C) -> same shape."""
    b, t, h, w, c = x.shape
    x = x.astype(self.dtype)
    qkv = self.qkv(self.norm(x)).reshape(b * t, h * w, 3, 1, c)  # channels: q | k | v
    o = attention_lib.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], impl=self.impl)
    return x + self.proj(o.reshape(b, t, h, w, c))


def _interleave_time(y: jax.Array) -> jax.Array:
  """(B, T, H, W, 2C) whose channel halves are two frames -> (B, 2T, H, W, C)."""
  b, t, h, w, c2 = y.shape
  y = y.reshape(b, t, h, w, 2, c2 // 2)
  return jnp.moveaxis(y, 4, 2).reshape(b, 2 * t, h, w, c2 // 2)


class Downsample(nnx.Module):
  """Spatial /2 (zero pad right and bottom by one, 3x3 stride-2 conv); optionally time /2."""

  def __init__(self, ch: int, temporal: bool, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.conv = FrameConv(ch, ch, **kw)
    self.time_conv = CausalConv3d(ch, ch, (3, 1, 1), **kw) if temporal else None

  def __call__(self, x: jax.Array, cache):
    """x: (B, T, H, W, C) -> (B, T', H/2, W/2, C); cache: (B, 1, H/2, W/2, C) or None.

    At the stream start the first frame passes through and every later stride-2 window of 3
    frames is convolved (T' = 1 + (T - 1) // 2); later chunks prepend the cached last frame
    (T' = T // 2).
    """
    x = self.conv(x, stride=2, padding=((0, 1), (0, 1)))
    if self.time_conv is None:
      return x, None
    if cache is None:
      y = x[:, :1]
      if x.shape[1] >= 3:
        y = jnp.concatenate([y, self.time_conv.valid(x, stride_t=2)], axis=1)
    else:
      y = self.time_conv.valid(jnp.concatenate([cache, x], axis=1), stride_t=2)
    return y, x[:, -1:]


class Upsample(nnx.Module):
  """Optionally time x2 (causal time conv to two frames' channels), then nearest 2x + 3x3 conv."""

  def __init__(self, ch: int, temporal: bool, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.time_conv = CausalConv3d(ch, 2 * ch, (3, 1, 1), **kw) if temporal else None
    self.conv = FrameConv(ch, ch, **kw)
    self.dtype = dtype

  def __call__(self, x: jax.Array, cache):
    """x: (B, T, H, W, C) -> (B, T', 2H, 2W, C); cache: (B, 2, H, W, C) or None.

    At the stream start the first frame is not doubled (T' = 2T - 1) and the time conv's own
    stream starts at frame 1; later chunks give T' = 2T.
    """
    if self.time_conv is not None:
      if cache is None:
        first, rest = x[:, :1].astype(self.dtype), x[:, 1:]
        if rest.shape[1]:
          y, cache = self.time_conv(rest, None)
          x = jnp.concatenate([first, _interleave_time(y)], axis=1)
        else:
          x = first
          cache = jnp.zeros((x.shape[0], _CACHE_T, *x.shape[2:]), self.dtype)
      else:
        y, cache = self.time_conv(x, cache)
        x = _interleave_time(y)
    x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
    return self.conv(x), cache


def avg_down(x: jax.Array, out_ch: int, factor_t: int, factor_s: int) -> jax.Array:
  """Parameter-free shortcut: (factor_t, factor_s, factor_s) blocks to channels, then the mean
  over groups of consecutive channels.

  Time is zero-padded on the left to a multiple of ``factor_t``.
  x: (B, T, H, W, C) -> (B, ceil(T / factor_t), H / factor_s, W / factor_s, out_ch).
  """
  b, t, h, w, c = x.shape
  pad = (-t) % factor_t
  if pad:
    x = jnp.pad(x, ((0, 0), (pad, 0), (0, 0), (0, 0), (0, 0)))
    t += pad
  ft, fs = factor_t, factor_s
  x = x.reshape(b, t // ft, ft, h // fs, fs, w // fs, fs, c)
  # Expanded channel index = c * (ft fs fs) + (it fs fs + ih fs + iw).
  x = jnp.transpose(x, (0, 1, 3, 5, 7, 2, 4, 6)).reshape(b, t // ft, h // fs, w // fs, -1)
  group = x.shape[-1] // out_ch
  return x.reshape(*x.shape[:-1], out_ch, group).astype(jnp.float32).mean(-1).astype(x.dtype)


def dup_up(x: jax.Array, out_ch: int, factor_t: int, factor_s: int, first: bool) -> jax.Array:
  """Parameter-free shortcut, the inverse arrangement of ``avg_down`` with channels repeated.

  x: (B, T, H, W, C) -> (B, T * factor_t, H * factor_s, W * factor_s, out_ch); at the stream
  start (``first``) the first ``factor_t - 1`` frames are dropped.
  """
  b, t, h, w, c = x.shape
  ft, fs = factor_t, factor_s
  repeats = out_ch * ft * fs * fs // c
  x = jnp.repeat(x, repeats, axis=-1).reshape(b, t, h, w, out_ch, ft, fs, fs)
  x = jnp.transpose(x, (0, 1, 5, 2, 6, 3, 7, 4)).reshape(b, t * ft, h * fs, w * fs, out_ch)
  return x[:, ft - 1:] if first else x


class DownLevel(nnx.Module):
  """Encoder level: residual blocks, optional downsample, plus the ``avg_down`` shortcut."""

  def __init__(self, in_ch: int, out_ch: int, num_blocks: int, down: bool, temporal: bool, *,
               rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.blocks = nnx.List([ResBlock(in_ch if j == 0 else out_ch, out_ch, **kw)
                            for j in range(num_blocks)])
    self.resample = Downsample(out_ch, temporal, **kw) if down else None
    self.out_ch = out_ch
    self.factor_t = 2 if temporal else 1
    self.factor_s = 2 if down else 1

  def __call__(self, x: jax.Array, cache):
    """x: (B, T, H, W, in_ch) -> (B, T', H', W', out_ch); cache: tuple per block + resample."""
    caches = [None] * (len(self.blocks) + 1) if cache is None else list(cache)
    h = x
    for j, block in enumerate(self.blocks):
      h, caches[j] = block(h, caches[j])
    if self.resample is not None:
      h, caches[-1] = self.resample(h, caches[-1])
    if self.factor_t * self.factor_s > 1 or x.shape[-1] != self.out_ch:
      h = h + avg_down(x.astype(h.dtype), self.out_ch, self.factor_t, self.factor_s)
    else:
      h = h + x.astype(h.dtype)  # a 1x1x1 mean over groups of one: identity
    return constrain(h, _ACT), tuple(caches)


class UpLevel(nnx.Module):
  """Decoder level: residual blocks, optional upsample, plus the ``dup_up`` shortcut when it
  upsamples."""

  def __init__(self, in_ch: int, out_ch: int, num_blocks: int, up: bool, temporal: bool, *,
               rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.blocks = nnx.List([ResBlock(in_ch if j == 0 else out_ch, out_ch, **kw)
                            for j in range(num_blocks)])
    self.resample = Upsample(out_ch, temporal, **kw) if up else None
    self.out_ch = out_ch
    self.factor_t = 2 if temporal else 1

  def __call__(self, x: jax.Array, cache):
    """x: (B, T, H, W, in_ch) -> (B, T', H', W', out_ch); cache: tuple per block + resample."""
    first = cache is None
    caches = [None] * (len(self.blocks) + 1) if first else list(cache)
    h = x
    for j, block in enumerate(self.blocks):
      h, caches[j] = block(h, caches[j])
    if self.resample is not None:
      h, caches[-1] = self.resample(h, caches[-1])
      h = h + dup_up(x.astype(h.dtype), self.out_ch, self.factor_t, 2, first)
    return constrain(h, _ACT), tuple(caches)


class _Middle(nnx.Module):
  """Res block, per-frame attention, res block."""

  def __init__(self, ch: int, *, rngs: nnx.Rngs, dtype, param_dtype, impl: str = "auto"):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.res1 = ResBlock(ch, ch, **kw)
    self.attn = FrameAttention(ch, impl=impl, **kw)
    self.res2 = ResBlock(ch, ch, **kw)

  def __call__(self, x, cache):
    c1, c2 = (None, None) if cache is None else cache
    x, c1 = self.res1(x, c1)
    x, c2 = self.res2(self.attn(x), c2)
    return constrain(x, _ACT), (c1, c2)


class Encoder(nnx.Module):
  """Patchified frames (B, T, H/2, W/2, 12) -> (B, T_lat, H/16, W/16, 2 * z_dim)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    dims = [cfg.encoder_dim * m for m in (1, *cfg.dim_mult)]
    n = len(cfg.dim_mult)
    self.conv_in = CausalConv3d(cfg.in_channels * cfg.patch_size ** 2, dims[0], **kw)
    self.levels = nnx.List([
        DownLevel(dims[i], dims[i + 1], cfg.encoder_res_blocks, down=i != n - 1,
                  temporal=i != n - 1 and bool(cfg.temporal_downsample[i]), **kw)
        for i in range(n)])
    self.middle = _Middle(dims[-1], impl=cfg.get("attention", "auto"), **kw)
    self.norm_out = ChannelRMSNorm(dims[-1], **kw)
    self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, **kw)
    self.remat = cfg.get("remat", "none")

  def __call__(self, x: jax.Array, cache):
    """x: one chunk (or the whole clip) of patchified frames; cache: a pytree or None."""
    cache = cache or {}
    new = {}
    x = constrain(x, _ACT)
    x, new["conv_in"] = self.conv_in(x, cache.get("conv_in"))
    levels = cache.get("levels", (None,) * len(self.levels))
    new["levels"] = [None] * len(self.levels)
    for i, level in enumerate(self.levels):
      x, new["levels"][i] = _run(level, x, levels[i], self.remat)
    new["levels"] = tuple(new["levels"])
    x, new["middle"] = _run(self.middle, x, cache.get("middle"), self.remat)
    x, new["conv_out"] = self.conv_out(jax.nn.silu(self.norm_out(x)), cache.get("conv_out"))
    return x, new


class Decoder(nnx.Module):
  """Latents (B, T_lat, h, w, z_dim) -> patchified frames (B, 4 T_lat - 3, 8h, 8w, 12)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    mult = tuple(cfg.dim_mult)
    dims = [cfg.decoder_dim * m for m in (mult[-1], *mult[::-1])]
    n = len(mult)
    temporal_up = tuple(cfg.temporal_downsample)[::-1]
    self.conv_in = CausalConv3d(cfg.z_dim, dims[0], **kw)
    self.middle = _Middle(dims[0], impl=cfg.get("attention", "auto"), **kw)
    self.levels = nnx.List([
        UpLevel(dims[i], dims[i + 1], cfg.decoder_res_blocks, up=i != n - 1,
                temporal=i != n - 1 and bool(temporal_up[i]), **kw)
        for i in range(n)])
    self.norm_out = ChannelRMSNorm(dims[-1], **kw)
    self.conv_out = CausalConv3d(dims[-1], cfg.in_channels * cfg.patch_size ** 2, **kw)
    self.remat = cfg.get("remat", "none")

  def __call__(self, x: jax.Array, cache):
    cache = cache or {}
    new = {}
    x = constrain(x, _ACT)
    x, new["conv_in"] = self.conv_in(x, cache.get("conv_in"))
    x, new["middle"] = _run(self.middle, x, cache.get("middle"), self.remat)
    levels = cache.get("levels", (None,) * len(self.levels))
    new["levels"] = [None] * len(self.levels)
    for i, level in enumerate(self.levels):
      x, new["levels"][i] = _run(level, x, levels[i], self.remat)
    new["levels"] = tuple(new["levels"])
    x, new["conv_out"] = self.conv_out(jax.nn.silu(self.norm_out(x)), cache.get("conv_out"))
    return x, new


# ----------------------------------------------------------------------------- patchify


def patchify(video: jax.Array, p: int = 2) -> jax.Array:
  """(B, T, H, W, C) -> (B, T, H/p, W/p, C p p), channel index ``c p^2 + r p + q`` for the
  pixel (p h + q, p w + r) (the original's (c r q) order: column offset before row offset)."""
  b, t, h, w, c = video.shape
  x = video.reshape(b, t, h // p, p, w // p, p, c)
  return jnp.transpose(x, (0, 1, 2, 4, 6, 5, 3)).reshape(b, t, h // p, w // p, c * p * p)


def unpatchify(x: jax.Array, p: int = 2) -> jax.Array:
  """Inverse of :func:`patchify`: (B, T, h, w, C p p) -> (B, T, p h, p w, C)."""
  b, t, h, w, cpp = x.shape
  x = x.reshape(b, t, h, w, cpp // (p * p), p, p)  # (c, r, q)
  return jnp.transpose(x, (0, 1, 2, 6, 3, 5, 4)).reshape(b, t, h * p, w * p, cpp // (p * p))


# ----------------------------------------------------------------------------- tiling


def tile_tasks(rows: int, cols: int, size: tuple[int, int], stride: tuple[int, int]
               ) -> list[tuple[int, int, int, int]]:
  """Tiles (r0, r1, c0, c1) of a (rows, cols) grid as Mirage inference cuts them; r1 and c1
  may pass the edge (the tile is then cut short). A start is skipped when the previous tile
  already reaches the edge."""
  def starts(n, sz, st):
    return [s for s in range(0, n, st) if not (s - st >= 0 and s - st + sz >= n)]
  return [(r, r + size[0], c, c + size[1]) for r in starts(rows, size[0], stride[0])
          for c in starts(cols, size[1], stride[1])]


def _ramp(length: int, at_start: bool, at_end: bool, border: int) -> np.ndarray:
  """1D blend weights: linear ramps (1/border .. 1) over ``border`` cells at inner edges."""
  m = np.ones((length,), np.float32)
  ramp = (np.arange(border, dtype=np.float32) + 1) / border
  if not at_start:
    m[:border] = ramp[:length]
  if not at_end:
    m[max(length - border, 0):] = ramp[::-1][max(border - length, 0):]
  return m


def tile_mask(shape: tuple[int, int], bounds: tuple[bool, bool, bool, bool],
              border: tuple[int, int]) -> np.ndarray:
  """(rows, cols) blend weights of one tile: min of the row and column ramps.

  bounds: (top, bottom, left, right) edges of the tile that are edges of the whole frame
  (no ramp there).
  """
  r = _ramp(shape[0], bounds[0], bounds[1], border[0])
  c = _ramp(shape[1], bounds[2], bounds[3], border[1])
  return np.minimum(r[:, None], c[None, :])


def _check_tiles(size, stride, where: str) -> tuple[tuple[int, int], tuple[int, int]]:
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != 2 or len(stride) != 2 or not all(0 < st < sz for sz, st in zip(size, stride)):
    raise InputError(where, "tile_size/tile_stride",
                     f"need 0 < stride < size on both axes, got size {size} stride {stride}")
  return size, stride


def _blend_tiles(run: Callable[[tuple[int, int, int, int]], jax.Array],
                 tasks, out_shape, scale: int, border: tuple[int, int]) -> jax.Array:
  """Sum of ``run(task) * mask`` over tiles, divided by the summed masks.

  ``run`` returns a tile (B, T, h, w, C) whose cell (i, j) lands at output cell
  (r0 * scale + i, c0 * scale + j); out_shape: (B, T, H, W, C).
  """
  values = jnp.zeros(out_shape, jnp.float32)
  weight = np.zeros(out_shape[2:4], np.float32)
  rows, cols = out_shape[2] // scale, out_shape[3] // scale
  for task in tasks:
    r0, r1, c0, c1 = task
    tile = run(task).astype(jnp.float32)
    h, w = tile.shape[2:4]
    mask = tile_mask((h, w), (r0 == 0, r1 >= rows, c0 == 0, c1 >= cols), border)
    y, x = r0 * scale, c0 * scale
    values = values.at[:, :, y:y + h, x:x + w].add(tile * mask[:, :, None])
    weight[y:y + h, x:x + w] += mask
  return values / weight[:, :, None]


# ----------------------------------------------------------------------------- model


# Compiled entry points. Tiles of one shape share one compiled encoder/decoder (a 1280x704
# clip has 6 tiles of 4 shapes); under an outer jit these become nested calls.
@nnx.jit(static_argnames=("chunked",))
def jit_encode(model: "WanVAE", video: jax.Array, chunked: bool = True) -> jax.Array:
  """``model.encode(video, chunked=chunked)`` compiled (normalised latents)."""
  return model.encode(video, chunked=chunked)


@nnx.jit(static_argnames=("chunked", "clamp"))
def jit_decode(model: "WanVAE", latents: jax.Array, chunked: bool = True,
               clamp: bool = True) -> jax.Array:
  """``model.decode(latents, chunked=chunked, clamp=clamp)`` compiled (normalised latents)."""
  return model.decode(latents, chunked=chunked, clamp=clamp)


class WanVAE(nnx.Module):
  """The Wan2.2 VAE. See the module docstring for the layout and the chunked execution."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    _check_config(cfg)
    self.cfg = cfg
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.encoder = Encoder(cfg, **kw)
    self.quant_conv = _pointwise(2 * cfg.z_dim, 2 * cfg.z_dim, **kw)
    self.post_quant_conv = _pointwise(cfg.z_dim, cfg.z_dim, **kw)
    self.decoder = Decoder(cfg, **kw)
    self.dtype = dtype

  # -- latent normalisation

  def normalize(self, mu: jax.Array) -> jax.Array:
    """Raw mean (..., z_dim) -> normalised latents ``(mu - mean) / std`` (f32)."""
    mean = jnp.asarray(self.cfg.latents_mean, jnp.float32)
    inv_std = 1.0 / jnp.asarray(self.cfg.latents_std, jnp.float32)
    return (mu.astype(jnp.float32) - mean) * inv_std

  def denormalize(self, z: jax.Array) -> jax.Array:
    """Normalised latents (..., z_dim) -> raw ``z * std + mean`` (f32)."""
    mean = jnp.asarray(self.cfg.latents_mean, jnp.float32)
    inv_std = 1.0 / jnp.asarray(self.cfg.latents_std, jnp.float32)
    return z.astype(jnp.float32) / inv_std + mean

  # -- encode

  def _check_video(self, video, where: str) -> None:
    f = spatial_factor(self.cfg)
    if video.ndim != 5 or video.shape[-1] != self.cfg.in_channels:
      raise InputError(where, "video", f"expected (B, T, H, W, {self.cfg.in_channels}), "
                       f"got {tuple(video.shape)}")
    b, t, h, w, _ = video.shape
    if t < 1 or (t - 1) % temporal_factor(self.cfg):
      raise InputError(where, "video", f"frames must be 1 + {temporal_factor(self.cfg)}k, got {t}")
    if h % f or w % f or not h or not w:
      raise InputError(where, "video", f"height and width must be multiples of {f}, got {h}x{w}")

  def encode_moments(self, video: jax.Array, *, chunked: bool = True
                     ) -> tuple[jax.Array, jax.Array]:
    """Raw posterior moments.

    Args:
      video: (B, T, H, W, 3) in [-1, 1], T = 1 + 4k, H and W multiples of 16.
      chunked: frame 0, then chunks of 4 frames under ``lax.scan`` (as the original);
        False: the whole clip in one pass (same result, more memory).
    Returns:
      mu, logvar: (B, 1 + k, H/16, W/16, z_dim) each, f32, unnormalised.
    """
    self._check_video(video, "WanVAE.encode")
    x = patchify(video.astype(self.dtype), self.cfg.patch_size)
    if chunked:
      out = self._encode_chunked(x)
    else:
      out, _ = self.encoder(x, None)
    out = self.quant_conv(out).astype(jnp.float32)
    return out[..., :self.cfg.z_dim], out[..., self.cfg.z_dim:]

  def _encode_chunked(self, x: jax.Array) -> jax.Array:
    b, t, h, w, c = x.shape
    step = temporal_factor(self.cfg)
    first, cache = self.encoder(x[:, :1], None)
    k = (t - 1) // step
    if k == 0:
      return first
    chunks = jnp.moveaxis(x[:, 1:].reshape(b, k, step, h, w, c), 1, 0)

    def body(cache, chunk):
      y, cache = self.encoder(chunk, cache)
      return cache, y

    _, ys = jax.lax.scan(body, cache, chunks)  # (k, B, 1, h', w', C)
    ys = jnp.moveaxis(ys, 0, 1).reshape(b, k, *ys.shape[3:])
    return jnp.concatenate([first, ys.astype(first.dtype)], axis=1)

  def encode(self, video: jax.Array, *, chunked: bool = True,
             normalize: bool = True) -> jax.Array:
    """video (B, T, H, W, 3) in [-1, 1] -> latents (B, (T-1)//4 + 1, H/16, W/16, z_dim) f32:
    the posterior mean, normalised ``(mu - mean) / std`` unless ``normalize=False``."""
    mu, _ = self.encode_moments(video, chunked=chunked)
    return self.normalize(mu) if normalize else mu

  # -- decode

  def decode(self, latents: jax.Array, *, chunked: bool = True, normalized: bool = True,
             clamp: bool = True) -> jax.Array:
    """Latents -> video.

    Args:
      latents: (B, T_lat, h, w, z_dim), normalised (``normalized=False``: raw mu).
      chunked: one latent frame at a time under ``lax.scan`` (as the original); False: the
        whole clip in one pass (same result).
      clamp: clamp the output to [-1, 1] (the original does; tiling blends unclamped tiles).
    Returns:
      (B, 4 T_lat - 3, 16 h, 16 w, 3) f32.
    """
    if latents.ndim != 5 or latents.shape[-1] != self.cfg.z_dim or latents.shape[1] < 1:
      raise InputError("WanVAE.decode", "latents",
                       f"expected (B, T, h, w, {self.cfg.z_dim}), got {tuple(latents.shape)}")
    z = self.denormalize(latents) if normalized else latents
    x = self.post_quant_conv(z.astype(self.dtype))
    if chunked:
      out = self._decode_chunked(x)
    else:
      out, _ = self.decoder(x, None)
    video = unpatchify(out, self.cfg.patch_size).astype(jnp.float32)
    return jnp.clip(video, -1.0, 1.0) if clamp else video

  def _decode_chunked(self, x: jax.Array) -> jax.Array:
    b, t = x.shape[:2]
    first, cache = self.decoder(x[:, :1], None)
    if t == 1:
      return first

    def body(cache, frame):
      y, cache = self.decoder(frame[:, None], cache)
      return cache, y

    _, ys = jax.lax.scan(body, cache, jnp.moveaxis(x[:, 1:], 1, 0))  # (t-1, B, 4, H, W, C)
    ys = jnp.moveaxis(ys, 0, 1).reshape(b, -1, *ys.shape[3:])
    return jnp.concatenate([first, ys.astype(first.dtype)], axis=1)

  # -- tiled (Mirage inference)

  def tiled_encode(self, video: jax.Array, tile_size: Sequence[int] | None = None,
                   tile_stride: Sequence[int] | None = None, *, chunked: bool = True
                   ) -> jax.Array:
    """``encode`` over overlapping spatial tiles blended with linear ramps, as Mirage inference.

    Args:
      video: (B, T, H, W, 3) as for ``encode``.
      tile_size, tile_stride: in latent cells (default ``cfg.tile_size`` / ``cfg.tile_stride``,
        (30, 52) / (15, 26)); the ramps are ``size - stride`` cells wide.
    Returns:
      normalised latents (B, (T-1)//4 + 1, H/16, W/16, z_dim); one tile == ``encode``.
    """
    self._check_video(video, "WanVAE.tiled_encode")
    size, stride = _check_tiles(tile_size or self.cfg.tile_size,
                                tile_stride or self.cfg.tile_stride, "WanVAE.tiled_encode")
    f = spatial_factor(self.cfg)
    b, t, h, w, _ = video.shape
    rows, cols = h // f, w // f
    tasks = tile_tasks(rows, cols, size, stride)
    run = lambda k: jit_encode(self, video[:, :, k[0] * f:k[1] * f, k[2] * f:k[3] * f],
                               chunked=chunked)
    out_shape = (b, (t - 1) // temporal_factor(self.cfg) + 1, rows, cols, self.cfg.z_dim)
    border = (size[0] - stride[0], size[1] - stride[1])
    return _blend_tiles(run, tasks, out_shape, 1, border)

  def tiled_decode(self, latents: jax.Array, tile_size: Sequence[int] | None = None,
                   tile_stride: Sequence[int] | None = None, *, chunked: bool = True
                   ) -> jax.Array:
    """``decode`` over overlapping latent tiles, blended unclamped, then clamped to [-1, 1].

    Args:
      latents: (B, T_lat, h, w, z_dim) normalised.
      tile_size, tile_stride: in latent cells (defaults from the config); the ramps are
        ``16 (size - stride)`` pixels wide.
    Returns:
      (B, 4 T_lat - 3, 16 h, 16 w, 3); one tile == ``decode``.
    """
    if latents.ndim != 5 or latents.shape[-1] != self.cfg.z_dim:
      raise InputError("WanVAE.tiled_decode", "latents",
                       f"expected (B, T, h, w, {self.cfg.z_dim}), got {tuple(latents.shape)}")
    size, stride = _check_tiles(tile_size or self.cfg.tile_size,
                                tile_stride or self.cfg.tile_stride, "WanVAE.tiled_decode")
    f = spatial_factor(self.cfg)
    b, t, rows, cols, _ = latents.shape
    tasks = tile_tasks(rows, cols, size, stride)
    run = lambda k: jit_decode(self, latents[:, :, k[0]:k[1], k[2]:k[3]], chunked=chunked,
                               clamp=False)
    out_shape = (b, 4 * t - 3, rows * f, cols * f, self.cfg.in_channels)
    border = ((size[0] - stride[0]) * f, (size[1] - stride[1]) * f)
    return jnp.clip(_blend_tiles(run, tasks, out_shape, f, border), -1.0, 1.0)


# ----------------------------------------------------------------------------- weights


def _w3(key: str, cin: int, cout: int, k=(3, 3, 3)) -> dict[str, ol.OriginalTensor]:
  """A Conv3d (out, in, kt, kh, kw) -> our (kt, kh, kw, in, out) kernel + bias."""
  return {"kernel": ol.single(f"{key}.weight", (cout, cin, *k), perm=(2, 3, 4, 1, 0)),
          "bias": ol.single(f"{key}.bias", (cout,))}


def _w2(key: str, cin: int, cout: int) -> dict[str, ol.OriginalTensor]:
  """A 3x3 Conv2d (out, in, kh, kw) -> our (kh, kw, in, out) kernel + bias."""
  return {"kernel": ol.single(f"{key}.weight", (cout, cin, 3, 3), perm=(2, 3, 1, 0)),
          "bias": ol.single(f"{key}.bias", (cout,))}


def _w1(key: str, cin: int, cout: int, spatial_dims: int) -> dict[str, ol.OriginalTensor]:
  """A 1x1 (x1) conv (out, in, 1, ...) -> our Dense (in, out) kernel + bias."""
  perm = (1, 0) + tuple(range(2, 2 + spatial_dims))
  return {"kernel": ol.single(f"{key}.weight", (cout, cin) + (1,) * spatial_dims,
                              (cin, cout), perm=perm),
          "bias": ol.single(f"{key}.bias", (cout,))}


def _gamma(key: str, ch: int, spatial_dims: int) -> dict[str, ol.OriginalTensor]:
  return {"scale": ol.single(f"{key}.gamma", (ch,) + (1,) * spatial_dims, (ch,))}


def _res_block(key: str, cin: int, cout: int) -> dict[str, Any]:
  """The original ResidualBlock: residual.{0: norm, 2: conv, 3: norm, 6: conv}, shortcut."""
  out = {"norm1": _gamma(f"{key}.residual.0", cin, 3),
         "conv1": _w3(f"{key}.residual.2", cin, cout),
         "norm2": _gamma(f"{key}.residual.3", cout, 3),
         "conv2": _w3(f"{key}.residual.6", cout, cout)}
  if cin != cout:
    out["shortcut"] = _w1(f"{key}.shortcut", cin, cout, 3)
  return out


def _middle(key: str, ch: int) -> dict[str, Any]:
  return {"res1": _res_block(f"{key}.middle.0", ch, ch),
          "attn": {"norm": _gamma(f"{key}.middle.1.norm", ch, 2),
                   "qkv": _w1(f"{key}.middle.1.to_qkv", ch, 3 * ch, 2),
                   "proj": _w1(f"{key}.middle.1.proj", ch, ch, 2)},
          "res2": _res_block(f"{key}.middle.2", ch, ch)}


def original_layout(cfg) -> dict[ol.ParamPath, ol.OriginalTensor]:
  """Our parameter paths (str keys, as in ``nnx.state(model)``) -> tensors of
  ``Wan2.2_VAE.pth`` in the naming of ``wan2_2/modules/vae2_2.py`` (``encoder.*``,
  ``decoder.*``, ``conv1`` = our quant_conv, ``conv2`` = our post_quant_conv)."""
  _check_config(cfg)
  n = len(cfg.dim_mult)
  z, pc = cfg.z_dim, cfg.in_channels * cfg.patch_size ** 2

  enc = [cfg.encoder_dim * m for m in (1, *cfg.dim_mult)]
  levels = {}
  for i in range(n):
    key = f"encoder.downsamples.{i}.downsamples"
    lv: dict[str, Any] = {"blocks": {
        str(j): _res_block(f"{key}.{j}", enc[i] if j == 0 else enc[i + 1], enc[i + 1])
        for j in range(cfg.encoder_res_blocks)}}
    if i != n - 1:
      rkey = f"{key}.{cfg.encoder_res_blocks}"
      lv["resample"] = {"conv": _w2(f"{rkey}.resample.1", enc[i + 1], enc[i + 1])}
      if cfg.temporal_downsample[i]:
        lv["resample"]["time_conv"] = _w3(f"{rkey}.time_conv", enc[i + 1], enc[i + 1], (3, 1, 1))
    levels[str(i)] = lv
  encoder = {"conv_in": _w3("encoder.conv1", pc, enc[0]), "levels": levels,
             "middle": _middle("encoder", enc[-1]),
             "norm_out": _gamma("encoder.head.0", enc[-1], 3),
             "conv_out": _w3("encoder.head.2", enc[-1], 2 * z)}

  mult = tuple(cfg.dim_mult)
  dec = [cfg.decoder_dim * m for m in (mult[-1], *mult[::-1])]
  temporal_up = tuple(cfg.temporal_downsample)[::-1]
  levels = {}
  for i in range(n):
    key = f"decoder.upsamples.{i}.upsamples"
    lv = {"blocks": {
        str(j): _res_block(f"{key}.{j}", dec[i] if j == 0 else dec[i + 1], dec[i + 1])
        for j in range(cfg.decoder_res_blocks)}}
    if i != n - 1:
      rkey = f"{key}.{cfg.decoder_res_blocks}"
      lv["resample"] = {"conv": _w2(f"{rkey}.resample.1", dec[i + 1], dec[i + 1])}
      if temporal_up[i]:
        lv["resample"]["time_conv"] = _w3(f"{rkey}.time_conv", dec[i + 1], 2 * dec[i + 1],
                                          (3, 1, 1))
    levels[str(i)] = lv
  decoder = {"conv_in": _w3("decoder.conv1", z, dec[0]), "middle": _middle("decoder", dec[0]),
             "levels": levels, "norm_out": _gamma("decoder.head.0", dec[-1], 3),
             "conv_out": _w3("decoder.head.2", dec[-1], pc)}

  return params_lib.flat_paths({"encoder": encoder, "quant_conv": _w1("conv1", 2 * z, 2 * z, 3),
                   "post_quant_conv": _w1("conv2", z, z, 3), "decoder": decoder})


def load_original(model: WanVAE, get: Callable[[str], Any]) -> None:
  """Fills ``model``'s parameters in place from an original state dict.

  Args:
    model: a WanVAE, concrete or abstract (``nnx.eval_shape``, see :func:`from_original`).
    get: ``original key -> array-like`` in the original naming and shape (e.g.
      ``sd.__getitem__`` of a dict of numpy arrays); a missing key (KeyError) or a wrong
      shape is an InputError naming the key.
  """
  layout = original_layout(model.cfg)
  shapes = {k: t.original_shape for t in layout.values() for k in t.keys}

  def checked(key):
    try:
      value = np.asarray(get(key))
    except KeyError:
      raise InputError("WanVAE.load_original", key, "missing from the original weights") from None
    if value.shape != shapes[key]:
      raise InputError("WanVAE.load_original", key,
                       f"shape {value.shape}, expected {shapes[key]}")
    return value

  arrays = ol.load_params(layout, checked)
  state = nnx.state(model, nnx.Param)
  flat = []
  seen = set()
  for path, var in state.flat_state():
    key = tuple(str(p) for p in path)
    if key not in arrays:
      raise InputError("WanVAE.load_original", "/".join(key), "no original tensor maps here")
    value = np.asarray(arrays[key])
    if value.shape != tuple(var.shape):
      raise InputError("WanVAE.load_original", "/".join(key),
                       f"shape {value.shape} vs parameter {tuple(var.shape)}")
    flat.append((path, var.replace(jnp.asarray(value, var.dtype))))
    seen.add(key)
  extra = sorted(set(arrays) - seen)
  if extra:
    raise InputError("WanVAE.load_original", "/".join(extra[0]), "not a parameter of the model")
  nnx.update(model, nnx.State.from_flat_path(flat))


def from_original(cfg, get: Callable[[str], Any]) -> WanVAE:
  """A WanVAE built without random initialisation and filled from an original state dict
  (see :func:`load_original`)."""
  model = nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0)))
  load_original(model, get)
  return model


def load_export(path: str, field: str = "autoencoder_checkpoint"
                ) -> tuple[WanVAE, ml_collections.ConfigDict]:
  """The Wan VAE of an autoencoder export (``convert_wan``'s ``EXPORT/vae``), local or gs://.

  Args:
    path: the export directory. field: the config field or flag that named it (for errors).
  Returns:
    (the VAE with the exported params, the export's training config).
  """
  from mirage_jax import checkpoint, families, paths  # pylint: disable=g-import-not-at-top
  if not path or not paths.isdir(path):
    raise InputError(path or "<empty>", field, "no such export directory (a Wan VAE export: "
                     "convert_wan's EXPORT/vae)")
  params, config, _ = checkpoint.load_export(path)
  if config.get("stage") != "autoencoder" or families.family_name(config) != "wan":
    raise InputError(path, "family",
                     f"not a Wan VAE export (stage {config.get('stage')!r}, family "
                     f"{families.family_name(config)!r})")
  return from_params(config.autoencoder, params), config


def from_params(cfg, params) -> WanVAE:
  """The WanVAE of config ``cfg`` with ``params`` (nested dict of arrays, as exported)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def calibrated_config(config: dict, params: Any, videos: Iterable[jax.Array],
                      where: str = "latent statistics") -> dict:
  """A Wan VAE run's config (JSON dict) with ``autoencoder.latents_mean/std`` measured by its
  VAE ``params`` on ``videos`` (:func:`latent_statistics`): the export of a VAE trained from
  scratch then normalises its own latents. ``where`` names the caller in errors."""
  from mirage_jax import families  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(config)
  if cfg.get("stage") != "autoencoder" or families.family_name(cfg) != "wan":
    raise InputError(where, "stage", f"latent statistics are measured for a Wan VAE run only "
                     f"(this one: stage {cfg.get('stage')!r}, family {families.family_name(cfg)!r})")
  mean, std = latent_statistics(from_params(cfg.autoencoder, params), videos)
  config["autoencoder"]["latents_mean"] = [float(v) for v in mean]
  config["autoencoder"]["latents_std"] = [float(v) for v in std]
  return config


def latent_statistics(vae: WanVAE, videos: Iterable[jax.Array]) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation, (z_dim,) each, of the raw posterior means of
  ``videos`` (an iterable of (B, T, H, W, 3) arrays in [-1, 1]): the ``latents_mean`` /
  ``latents_std`` that :meth:`WanVAE.normalize` uses. The released constants are the real
  Wan VAE's; a VAE trained from scratch has latents of its own scale, and the DiT's flow
  matching (noise ~ N(0, I)) wants them near zero mean and unit variance."""
  graphdef, state = nnx.split(vae)
  encode = jax.jit(lambda s, v: nnx.merge(graphdef, s).encode(v, normalize=False))
  total = np.zeros(vae.cfg.z_dim, np.float64)
  total_sq = np.zeros(vae.cfg.z_dim, np.float64)
  count = 0
  for video in videos:
    mu = np.asarray(encode(state, jnp.asarray(video)), np.float64).reshape(-1, vae.cfg.z_dim)
    total += mu.sum(0)
    total_sq += np.square(mu).sum(0)
    count += mu.shape[0]
  if not count:
    raise InputError("latent_statistics", "videos", "no video to measure")
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
  return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)

