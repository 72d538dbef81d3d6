"""The Wan2.2-TI2V-5B DiT with Mirage's VACE branch and LoRA adapters, in Flax NNX.

A port of the reference's networks (DiffSynth ``WanModel`` + ``VaceWanModel`` + PEFT LoRA in
github.com/microsoft/LatentSpatialMemory) with the same math, so the released weights load through
:func:`original_layout` and give the reference's outputs.

Token sequence. Latent frames ``(B, F, H, W, C)`` are cut into (1, 2, 2) patches, tokens in
(frame, row, column) order. Mirage puts ``R`` reference frames first, then the ``T`` target
and ``P`` preceding frames. Reference tokens take RoPE time positions ``-R..-1`` and row
positions ``h..2h-1`` (``h`` = token rows), the others time positions ``0..F-R-1`` and rows
``0..h-1``; columns are ``0..w-1`` everywhere.

Timesteps are per latent frame (TI2V: every token carries its frame's timestep). The
reference repeats the timestep over the frame's tokens and computes ``t_mod`` per token; we
compute it per frame and broadcast inside the blocks, which is the same numbers for
(F * 6 * dim) memory instead of (F * h * w * 6 * dim).

Block (shift, scale, gate chunks of ``modulation + t_mod``)::

  x += g1 * SelfAttn(LN1(x) * (1 + sc1) + sh1)     # q/k RMSNorm over all heads, 3D RoPE
  x += CrossAttn(LN3(x), text)                     # LN3 with affine, no RoPE, no mask
  x += g2 * FFN(LN2(x) * (1 + sc2) + sh2)          # GELU (tanh)

VACE: a second stack of blocks on the non-reference tokens, started from
``before_proj(vace_patch_embedding(vace_context)) + x``; block ``n`` emits
``after_proj(c)``, added (times ``vace_scale``) to the non-reference tokens after main block
``vace_layers[n]``. LoRA: ``W x + (alpha / rank) * B A dropout(x)`` on the self- and
cross-attention q, k, v, o and both FFN linears of every main block (not VACE).

Numerics. The reference computes the sinusoidal time embedding and RoPE in float64. RoPE
angles depend only on static shapes, so their cos/sin tables are computed here in float64
with numpy and stored as float32 constants. The time embedding depends on traced timesteps:
:func:`sinusoidal_embedding` evaluates it in float32 with exact-product argument splitting
and a three-part 2*pi reduction (max abs error vs float64 4.3e-7 for t in [0, 1000], where a
plain float32 ``cos(t * f)`` is off by up to ~6e-5; measured in tests/test_wan_dit.py).
``precision`` (``nn.layers.PRECISIONS``, as the small family): 'bf16' runs matmuls,
attention and the residual stream in bf16 (as the reference does), 'f32' all in float32,
'f32_residual' bf16 matmuls and attention but a float32 residual stream (between and
inside blocks, and the VACE branch's); norms, RoPE and the modulation arithmetic are
float32 under every policy. Configs from before the field have ``dtype`` (both the compute
and the stream dtype).

Layers are stacked (leading ``layers`` axis, ``nnx.vmap``) and run with ``jax.lax.scan``
(or a Python loop, ``scan_layers=False``) under ``layers.maybe_remat``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, traverse_util

from mirage_jax.errors import InputError
from mirage_jax.nn import attention as attention_lib
from mirage_jax.nn import layers
from mirage_jax.nn import params as params_lib
from mirage_jax.families.wan import original_layout as ol
from mirage_jax.sharding import constrain

_TOKENS = ("batch", "tokens", "act_embed")
_HEADS = ("batch", "tokens", "act_heads", None)
_WHERE = "wan_dit.WanDiT"


# ----------------------------------------------------------------------------- config


def wan_dit_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  """Size preset: 'ti2v_5b' (the released Wan2.2-TI2V-5B + Mirage VACE/LoRA) or 'tiny'.

  'tiny' (tests): 2 heads of 24, 4 layers, VACE after layers 0 and 2, no LoRA (set
  ``lora_rank`` > 0 to add adapters), float32.
  """
  cfg = ml_collections.ConfigDict()
  cfg.patch_size = (1, 2, 2)
  cfg.in_channels = 48
  cfg.out_channels = 48
  cfg.freq_dim = 256
  cfg.eps = 1e-6
  cfg.rope_theta = 10000.0
  cfg.rope_positions = 1024  # the reference's RoPE table length (positions -1024..1023)
  cfg.vace = True
  cfg.vace_in_channels = 96
  cfg.vace_scale = 1.0
  cfg.lora_dropout = 0.05
  cfg.scan_layers = True
  cfg.attention = "auto"  # attention.IMPLS: 'auto' = Pallas splash on TPU, XLA elsewhere
  cfg.param_dtype = "float32"
  if variant == "ti2v_5b":
    cfg.dim = 3072
    cfg.num_layers = 30
    cfg.num_heads = 24
    cfg.ffn_dim = 14336
    cfg.text_dim = 4096
    cfg.vace_layers = tuple(range(0, 30, 2))
    cfg.lora_rank = 32
    cfg.lora_alpha = 32.0
    # The reference trains with per-block gradient checkpointing (saves block inputs only).
    cfg.remat = "full"
    cfg.precision = "bf16"
  elif variant == "tiny":
    cfg.dim = 48
    cfg.num_layers = 4
    cfg.num_heads = 2
    cfg.ffn_dim = 96
    cfg.text_dim = 32
    cfg.vace_layers = (0, 2)
    cfg.lora_rank = 0
    cfg.lora_alpha = 8.0
    cfg.remat = "none"
    cfg.precision = "f32"
  else:
    raise ValueError(f"unknown wan_dit variant {variant!r}; known: ['ti2v_5b', 'tiny']")
  return cfg


def _validate(cfg) -> None:
  if cfg.dim % cfg.num_heads:
    raise ValueError(f"wan_dit: dim {cfg.dim} not divisible by num_heads {cfg.num_heads}")
  head_dim = cfg.dim // cfg.num_heads
  if head_dim % 2 or (head_dim // 3) % 2:
    raise ValueError(f"wan_dit: head_dim {head_dim} must be even with head_dim // 3 even "
                     "(RoPE splits it t/h/w into complex pairs)")
  if tuple(cfg.patch_size)[0] != 1:
    raise ValueError(f"wan_dit: temporal patch must be 1 (timesteps are per latent frame), "
                     f"got patch_size {tuple(cfg.patch_size)}")
  if cfg.freq_dim % 2:
    raise ValueError(f"wan_dit: freq_dim {cfg.freq_dim} must be even")
  if cfg.vace:
    v = tuple(cfg.vace_layers)
    if not v or v[0] != 0 or list(v) != sorted(set(v)) or v[-1] >= cfg.num_layers:
      raise ValueError(f"wan_dit: vace_layers {v} must be increasing, start at 0 and be "
                       f"< num_layers {cfg.num_layers}")
  layers.precision_dtypes(cfg)  # raises on an unknown policy
  if cfg.lora_rank < 0 or not 0.0 <= cfg.lora_dropout < 1.0:
    raise ValueError(f"wan_dit: bad LoRA settings rank {cfg.lora_rank}, "
                     f"dropout {cfg.lora_dropout}")


def _head_dim_split(head_dim: int) -> tuple[int, int, int]:
  """RoPE channels of one head for (time, rows, columns): d - 2(d//3), d//3, d//3."""
  hw = head_dim // 3
  return head_dim - 2 * hw, hw, hw


# ----------------------------------------------------------------------------- numerics


def _round_bits(x, bits: int) -> np.ndarray:
  """``x`` (float64) rounded to ``bits`` significant bits."""
  m, e = np.frexp(np.asarray(x, np.float64))
  return np.ldexp(np.round(m * 2.0 ** bits), e - bits)


def sinusoidal_embedding(t: jax.Array, dim: int) -> jax.Array:
  """The reference's ``[cos(t f_i), sin(t f_i)]``, ``f_i = 10000^(-i / (dim/2))``, in f32.

  The reference evaluates this in float64; a float32 ``t * f`` of ~1000 carries an absolute
  error of ~3e-5 rad. Here ``t = n + r`` (n integer) and each frequency is split into parts
  of 12 significant bits, so ``n * f_hi`` and ``n * f_mid`` are exact in float32 for
  ``|t| < 4096``; the argument is reduced modulo 2*pi (also split in three parts) before the
  small remainders are added, and cos/sin see an argument of at most ~4 rad.

  Args:
    t: (...) timesteps (0..1000 scale), any float dtype.
    dim: even embedding size.
  Returns:
    (..., dim) float32.
  """
  half = dim // 2
  freqs = np.power(10000.0, -np.arange(half, dtype=np.float64) / half)
  f_hi = _round_bits(freqs, 12)
  f_mid = _round_bits(freqs - f_hi, 12)
  f_lo = freqs - f_hi - f_mid
  two_pi = 2.0 * np.pi
  c1 = _round_bits(two_pi, 12)
  c2 = _round_bits(two_pi - c1, 12)
  c3 = two_pi - c1 - c2
  f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))

  t = t.astype(jnp.float32)[..., None]
  n = jnp.floor(t)
  r = t - n
  a_hi = n * f32(f_hi)  # exact
  a_mid = n * f32(f_mid)  # exact
  k = jnp.round((a_hi + a_mid) * np.float32(1.0 / two_pi))
  angle = a_hi - k * np.float32(c1)  # exact: k * c1 exact, operands close
  angle = angle - k * np.float32(c2)
  angle = angle + a_mid
  angle = angle - k * np.float32(c3)
  angle = angle + (n * f32(f_lo) + r * f32(freqs))
  return jnp.concatenate([jnp.cos(angle), jnp.sin(angle)], axis=-1)


def rope_tables(cfg, frames: int, rows: int, cols: int, num_reference: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
  """cos/sin of the 3D RoPE angles of every token, computed in float64.

  Args:
    frames: token frames F (references included); rows, cols: tokens per frame h x w.
    num_reference: R, the first R frames are references (see module docstring).
  Returns:
    (cos, sin), each (F * rows * cols, head_dim // 2) float32, tokens in (f, h, w) order.
  """
  head_dim = cfg.dim // cfg.num_heads
  parts = _head_dim_split(head_dim)
  inv = [1.0 / cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64)[: d // 2] / d)
         for d in parts]
  r = num_reference
  t_pos = np.concatenate([np.arange(-r, 0), np.arange(frames - r)]).astype(np.float64)
  h_pos = np.arange(rows, dtype=np.float64)
  w_pos = np.arange(cols, dtype=np.float64)
  is_ref = np.arange(frames) < r
  # (F, h, w, pairs) angles, each part broadcast along the other two axes.
  a_t = np.broadcast_to((t_pos[:, None] * inv[0])[:, None, None], (frames, rows, cols, len(inv[0])))
  h_all = h_pos[None, :] + np.where(is_ref, rows, 0)[:, None]  # (F, h): references at h..2h-1
  a_h = np.broadcast_to((h_all[..., None] * inv[1])[:, :, None], (frames, rows, cols, len(inv[1])))
  a_w = np.broadcast_to((w_pos[:, None] * inv[2])[None, None], (frames, rows, cols, len(inv[2])))
  angles = np.concatenate([a_t, a_h, a_w], axis=-1).reshape(frames * rows * cols, -1)
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates interleaved channel pairs (2j, 2j+1) of every head, in float32.

  Args:
    x: (B, N, heads, head_dim); cos, sin: (N, head_dim // 2).
  Returns:
    (B, N, heads, head_dim) in x.dtype.
  """
  xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
  re_, im = xf[..., 0], xf[..., 1]
  c, s = cos[None, :, None, :], sin[None, :, None, :]
  out = jnp.stack([re_ * c - im * s, re_ * s + im * c], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def _layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """LayerNorm without affine over the last axis, in float32."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


# ----------------------------------------------------------------------------- modules


class LoRAParam(nnx.Param):
  """A LoRA adapter matrix (A or B): a Param type of its own so filters can pick adapters."""


def _torch_uniform(fan_in: int) -> layers.Initializer:
  """PyTorch's default Linear/Conv init (kaiming_uniform with a=sqrt(5)): U(+-1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _normal_scaled(scale: float) -> layers.Initializer:
  def init(key, shape, dtype=jnp.float32):
    return scale * jax.random.normal(key, shape, dtype)
  return init


class Linear(nnx.Module):
  """``y = x . W + b`` contracting the trailing ``in_shape`` axes, with an optional LoRA.

  The kernel is ``in_shape + out_shape`` (e.g. (dim, heads, head_dim) for q), so heads and
  MLP units carry their own logical axis names. The LoRA adds
  ``(alpha / rank) * (dropout(x) . A) . B`` with A ``in_shape + (rank,)`` and B
  ``(rank,) + out_shape`` (PEFT's init: A like a Linear of ``rank`` outputs, B zero).
  """

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int],
               in_axes: Sequence[str | None], out_axes: Sequence[str | None], *,
               rngs: nnx.Rngs, lora_rank: int = 0, lora_alpha: float = 1.0,
               lora_dropout: float = 0.0, zero_init: bool = False, dtype=jnp.float32,
               param_dtype=jnp.float32):
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    in_axes, out_axes = tuple(in_axes), tuple(out_axes)
    fan_in = math.prod(in_shape)
    init = nnx.initializers.zeros_init() if zero_init else _torch_uniform(fan_in)
    self.kernel = layers.param(rngs, init, in_shape + out_shape, in_axes + out_axes, param_dtype)
    self.bias = layers.param(rngs, init, out_shape, out_axes, param_dtype)
    self.n_in = len(in_shape)
    self.dtype = dtype
    self.lora_scale = (lora_alpha / lora_rank) if lora_rank else 0.0
    self.lora_dropout = lora_dropout
    if lora_rank:
      self.lora_a = LoRAParam(_torch_uniform(fan_in)(rngs.params(), in_shape + (lora_rank,),
                                                     param_dtype),
                              out_sharding=in_axes + (None,), eager_sharding=False)
      self.lora_b = LoRAParam(jnp.zeros((lora_rank,) + out_shape, param_dtype),
                              out_sharding=(None,) + out_axes, eager_sharding=False)
    else:
      self.lora_a = None
      self.lora_b = None

  def _contract(self, x: jax.Array, w: jax.Array, n: int) -> jax.Array:
    return jnp.tensordot(x, w.astype(self.dtype), axes=(tuple(range(x.ndim - n, x.ndim)),
                                                        tuple(range(n))))

  def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """x: (..., *in_shape) -> (..., *out_shape) in ``dtype``.

    ``dropout_key``: a PRNG key to apply the LoRA dropout (training); None: no dropout.
    """
    x = x.astype(self.dtype)
    y = self._contract(x, self.kernel[...], self.n_in) + self.bias[...].astype(self.dtype)
    if self.lora_a is not None:
      xa = x
      if dropout_key is not None and self.lora_dropout > 0.0:
        keep = jax.random.bernoulli(dropout_key, 1.0 - self.lora_dropout, x.shape)
        xa = jnp.where(keep, x / (1.0 - self.lora_dropout), 0).astype(self.dtype)
      low = self._contract(xa, self.lora_a[...], self.n_in)
      y = y + self.lora_scale * self._contract(low, self.lora_b[...], 1)
    return y


class Attention(nnx.Module):
  """Self- or cross-attention with q/k RMSNorm over all heads together (the reference's)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, lora_rank: int, dtype, param_dtype):
    d, heads = cfg.dim, cfg.num_heads
    hd = d // heads
    kw = dict(rngs=rngs, lora_rank=lora_rank, lora_alpha=cfg.lora_alpha,
              lora_dropout=cfg.lora_dropout, dtype=dtype, param_dtype=param_dtype)
    self.q = Linear((d,), (heads, hd), ("embed",), ("heads", "head_dim"), **kw)
    self.k = Linear((d,), (heads, hd), ("embed",), ("heads", "head_dim"), **kw)
    self.v = Linear((d,), (heads, hd), ("embed",), ("heads", "head_dim"), **kw)
    self.o = Linear((heads, hd), (d,), ("heads", "head_dim"), ("embed",), **kw)
    ones = nnx.initializers.ones_init()
    self.norm_q = layers.param(rngs, ones, (heads, hd), ("heads", "head_dim"), param_dtype)
    self.norm_k = layers.param(rngs, ones, (heads, hd), ("heads", "head_dim"), param_dtype)
    self.eps = cfg.eps
    self.dtype = dtype
    # Exports written before the field existed lack it.
    self.impl = attention_lib.check_impl(cfg.get("attention", "auto"))

  def _rms(self, x: jax.Array, scale: nnx.Param) -> jax.Array:
    # Over (heads, head_dim) = the whole dim; normalised in f32, cast, then scaled (the
    # reference's order).
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=(-2, -1), keepdims=True) + self.eps)
    return y.astype(self.dtype) * scale[...].astype(self.dtype)

  def __call__(self, x: jax.Array, kv: jax.Array, rope: tuple[jax.Array, jax.Array] | None,
               keys: Sequence[jax.Array | None] = (None,) * 4,
               kv_mask: jax.Array | None = None) -> jax.Array:
    """x: (B, N, dim) queries; kv: (B, M, dim); rope: cos/sin (N, head_dim/2) or None.

    ``keys``: 4 dropout keys (q, k, v, o LoRA) or Nones. ``kv_mask``: (B, M) bool or None,
    False = a padded token no query attends to. Returns (B, N, dim).
    """
    q = self._rms(self.q(x, keys[0]), self.norm_q)
    k = self._rms(self.k(kv, keys[1]), self.norm_k)
    v = self.v(kv, keys[2])
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    q = constrain(q, _HEADS)
    o = attention_lib.attention(q, k, v, impl=self.impl, kv_mask=kv_mask)
    o = constrain(o, _HEADS)
    return self.o(o, keys[3])


class Block(nnx.Module):
  """One DiT block (see the module docstring); ``lora_rank`` 0 for VACE blocks."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, lora_rank: int, dtype, param_dtype):
    d = cfg.dim
    kw = dict(rngs=rngs, lora_rank=lora_rank, dtype=dtype, param_dtype=param_dtype)
    self.modulation = layers.param(rngs, _normal_scaled(d ** -0.5), (6, d), (None, "embed"),
                                   param_dtype)
    self.self_attn = Attention(cfg, **kw)
    self.cross_attn = Attention(cfg, **kw)
    self.norm3_scale = layers.param(rngs, nnx.initializers.ones_init(), (d,), ("embed",),
                                    param_dtype)
    self.norm3_bias = layers.param(rngs, nnx.initializers.zeros_init(), (d,), ("embed",),
                                   param_dtype)
    lkw = dict(rngs=rngs, lora_rank=lora_rank, lora_alpha=cfg.lora_alpha,
               lora_dropout=cfg.lora_dropout, dtype=dtype, param_dtype=param_dtype)
    self.ffn_in = Linear((d,), (cfg.ffn_dim,), ("embed",), ("mlp",), **lkw)
    self.ffn_out = Linear((cfg.ffn_dim,), (d,), ("mlp",), ("embed",), **lkw)
    self.eps = cfg.eps
    self.dtype = dtype
    self.residual_dtype = layers.precision_dtypes(cfg)[1]

  def __call__(self, x: jax.Array, text: jax.Array, t_mod: jax.Array,
               rope: tuple[jax.Array, jax.Array], key: jax.Array | None = None,
               token_mask: jax.Array | None = None) -> jax.Array:
    """One block.

    Args:
      x: (B, F * P, dim) tokens, F frames of P tokens each.
      text: (B, Lt, dim) embedded text.
      t_mod: (B, F, 6, dim) per-frame time modulation (shared by all blocks).
      rope: cos, sin (F * P, head_dim / 2).
      key: PRNG key for this block's LoRA dropout, or None.
      token_mask: (B, F * P) bool or None; self-attention ignores tokens where False (only
        self-attention mixes tokens, so those tokens cannot change the others).
    Returns:
      (B, F * P, dim) in the residual dtype (``precision``).
    """
    b, n, d = x.shape
    f = t_mod.shape[1]
    keys = [None] * 10 if key is None else list(jax.random.split(key, 10))
    mod = self.modulation[...].astype(jnp.float32) + t_mod.astype(jnp.float32)
    sh1, sc1, g1, sh2, sc2, g2 = (mod[:, :, i, None, :] for i in range(6))  # (B, F, 1, d)
    frames = lambda a: a.reshape(b, f, n // f, d)
    tokens = lambda a: a.reshape(b, n, d)

    y = tokens(_layer_norm(frames(x), self.eps) * (1.0 + sc1) + sh1).astype(self.dtype)
    y = self.self_attn(y, y, rope, keys[0:4], token_mask)
    x = (x + tokens(frames(y.astype(jnp.float32)) * g1)).astype(self.residual_dtype)

    y = _layer_norm(x, self.eps) * self.norm3_scale[...] + self.norm3_bias[...]
    x = x + self.cross_attn(y.astype(self.dtype), text, None, keys[4:8])
    x = constrain(x.astype(self.residual_dtype), _TOKENS)

    y = tokens(_layer_norm(frames(x), self.eps) * (1.0 + sc2) + sh2).astype(self.dtype)
    y = jax.nn.gelu(self.ffn_in(y, keys[8]), approximate=True)
    y = self.ffn_out(constrain(y, ("batch", "tokens", "act_mlp")), keys[9])
    x = (x + tokens(frames(y.astype(jnp.float32)) * g2)).astype(self.residual_dtype)
    return constrain(x, _TOKENS)


class VaceBlock(Block):
  """A VACE block: a DiT block (no LoRA) whose output also goes through ``after_proj``."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype, param_dtype):
    super().__init__(cfg, rngs=rngs, lora_rank=0, dtype=dtype, param_dtype=param_dtype)
    # Zero: a fresh branch adds nothing to the DiT (the reference's training init).
    self.after_proj = Linear((cfg.dim,), (cfg.dim,), ("embed",), ("mlp",), rngs=rngs,
                             zero_init=True, dtype=dtype, param_dtype=param_dtype)


def _patchify(x: jax.Array, patch: Sequence[int]) -> jax.Array:
  """(B, F, H, W, C) -> (B, F/pt * H/ph * W/pw, pt*ph*pw*C), tokens (f, h, w), features
  (dt, dy, dx, c)."""
  b, f, hh, ww, c = x.shape
  pt, ph, pw = patch
  x = x.reshape(b, f // pt, pt, hh // ph, ph, ww // pw, pw, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, (f // pt) * (hh // ph) * (ww // pw), pt * ph * pw * c)


def _unpatchify(x: jax.Array, frames: int, rows: int, cols: int, patch: Sequence[int]
                ) -> jax.Array:
  """(B, f*h*w, pt*ph*pw*C) -> (B, f*pt, h*ph, w*pw, C) (the reference's
  ``b (f h w) (x y z c) -> b c (f x) (h y) (w z)``, channels last)."""
  b = x.shape[0]
  pt, ph, pw = patch
  x = x.reshape(b, frames, rows, cols, pt, ph, pw, -1)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(b, frames * pt, rows * ph, cols * pw, x.shape[-1])


class VaceBranch(nnx.Module):
  """The VACE control branch: patch embedding, ``before_proj`` and stacked VaceBlocks."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype, param_dtype):
    d = cfg.dim
    patch = math.prod(cfg.patch_size)
    self.patch_embedding = Linear((patch * cfg.vace_in_channels,), (d,), ("patch_in",),
                                  ("embed",), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.before_proj = Linear((d,), (d,), ("embed",), ("mlp",), rngs=rngs, dtype=dtype,
                              param_dtype=param_dtype)
    make = lambda r: VaceBlock(cfg, rngs=r, dtype=dtype, param_dtype=param_dtype)
    self.blocks = layers.stack_layers(make, len(cfg.vace_layers), rngs)


class WanDiT(nnx.Module):
  """Wan2.2 DiT (+ VACE branch, + LoRA). See the module docstring."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    _validate(cfg)
    self.cfg = cfg
    (dtype, self.residual_dtype), param_dtype = layers.precision_dtypes(cfg), jnp.dtype(cfg.param_dtype)
    d = cfg.dim
    patch = math.prod(cfg.patch_size)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.patch_embedding = Linear((patch * cfg.in_channels,), (d,), ("patch_in",), ("embed",),
                                  **kw)
    self.text_in = Linear((cfg.text_dim,), (d,), ("cond_embed",), ("embed",), **kw)
    self.text_out = Linear((d,), (d,), ("embed",), ("mlp",), **kw)
    self.time_in = Linear((cfg.freq_dim,), (d,), ("cond_embed",), ("embed",), **kw)
    self.time_out = Linear((d,), (d,), ("embed",), ("mlp",), **kw)
    self.time_projection = Linear((d,), (6 * d,), ("embed",), ("mlp",), **kw)
    make = lambda r: Block(cfg, rngs=r, lora_rank=cfg.lora_rank, dtype=dtype,
                           param_dtype=param_dtype)
    self.blocks = layers.stack_layers(make, cfg.num_layers, rngs)
    self.head_modulation = layers.param(rngs, _normal_scaled(d ** -0.5), (2, d),
                                        (None, "embed"), param_dtype)
    self.head = Linear((d,), (patch * cfg.out_channels,), ("embed",), ("patch_in",), **kw)
    self.vace = VaceBranch(cfg, **kw) if cfg.vace else None
    self.dtype = dtype

  # --------------------------------------------------------------------------- stacks

  def _scan(self, stack: nnx.Module, x: jax.Array, step: Callable, xs: Any):
    """Runs ``step(module, x, xs_i) -> (x, y_i)`` over the stacked layers of ``stack``."""
    return layers.run_layers(stack, x, step, xs, scan=self.cfg.scan_layers,
                             remat=self.cfg.remat)

  def _vace_hints(self, x: jax.Array, vace_context: jax.Array, text: jax.Array,
                  t_mod: jax.Array, rope, token_mask: jax.Array | None = None) -> jax.Array:
    """(B, L', dim) non-reference tokens -> (len(vace_layers), B, L', dim) hints."""
    branch = self.vace
    c = branch.patch_embedding(_patchify(vace_context, self.cfg.patch_size))
    c = constrain(branch.before_proj(c) + x, _TOKENS)

    def step(block, c, _):
      c = block(c, text, t_mod, rope, token_mask=token_mask)
      return c, constrain(block.after_proj(c), _TOKENS)

    _, hints = self._scan(branch.blocks, c, step, None)
    return hints

  # --------------------------------------------------------------------------- forward

  def _check(self, latents, timesteps, text, num_reference, vace_context, frame_mask=None):
    cfg = self.cfg
    if latents.ndim != 5 or latents.shape[-1] != cfg.in_channels:
      raise InputError(_WHERE, "latents", f"expected (B, F, H, W, {cfg.in_channels}), got "
                       f"{tuple(latents.shape)}")
    b, f, hh, ww, _ = latents.shape
    _, ph, pw = cfg.patch_size
    if hh % ph or ww % pw:
      raise InputError(_WHERE, "latents", f"H, W {(hh, ww)} not divisible by the patch "
                       f"{(ph, pw)}")
    if tuple(timesteps.shape) != (b, f):
      raise InputError(_WHERE, "timesteps", f"expected (B, F) = {(b, f)}, got "
                       f"{tuple(timesteps.shape)}")
    if text.ndim != 3 or text.shape[0] != b or text.shape[-1] != cfg.text_dim:
      raise InputError(_WHERE, "text", f"expected ({b}, Lt, {cfg.text_dim}), got "
                       f"{tuple(text.shape)}")
    if not 0 <= num_reference < f:
      raise InputError(_WHERE, "num_reference", f"{num_reference} not in [0, F = {f})")
    if frame_mask is not None and tuple(frame_mask.shape) != (b, f):
      raise InputError(_WHERE, "frame_mask", f"expected (B, F) = {(b, f)}, got "
                       f"{tuple(frame_mask.shape)}")
    rows, cols = hh // ph, ww // pw
    need = max(f - num_reference, num_reference, (2 if num_reference else 1) * rows, cols)
    if need > cfg.rope_positions:
      raise InputError(_WHERE, "latents", f"needs RoPE position {need - 1} >= "
                       f"rope_positions {cfg.rope_positions}")
    if vace_context is not None:
      if self.vace is None:
        raise InputError(_WHERE, "vace_context", "given but the model has no VACE branch "
                         "(cfg.vace = False)")
      want = (b, f - num_reference, hh, ww, cfg.vace_in_channels)
      if tuple(vace_context.shape) != want:
        raise InputError(_WHERE, "vace_context", f"expected {want}, got "
                         f"{tuple(vace_context.shape)}")

  def __call__(self, latents: jax.Array, timesteps: jax.Array, text: jax.Array, *,
               num_reference: int = 0, vace_context: jax.Array | None = None,
               frame_mask: jax.Array | None = None,
               deterministic: bool = True, rngs: nnx.Rngs | None = None) -> jax.Array:
    """The DiT's prediction (flow velocity) for every latent frame.

    Args:
      latents: (B, F, H, W, in_channels) latent frames, F = R + T + P.
      timesteps: (B, F) the DiT timestep of each latent frame (0..1000 scale).
      text: (B, Lt, text_dim) text embeddings.
      num_reference: R (static), the number of leading reference frames.
      vace_context: (B, F - R, H, W, vace_in_channels) VACE input for the non-reference
        frames, or None (no hints).
      frame_mask: (B, F) bool or None (all real). Frames where False are padding: no token
        attends to their tokens (main and VACE self-attention), so the other frames'
        outputs are those of the sequence without them, as long as RoPE gives the real
        frames the same positions (padded references first, i.e. real references
        right-aligned against the target; padded preceding frames last). Their own outputs
        are meaningless.
      deterministic: False applies the LoRA dropout (needs ``rngs``).
      rngs: ``nnx.Rngs`` with a ``dropout`` stream, when not deterministic.
    Returns:
      (B, F, H, W, out_channels) float32.
    """
    cfg = self.cfg
    self._check(latents, timesteps, text, num_reference, vace_context, frame_mask)
    b, f, hh, ww, _ = latents.shape
    _, ph, pw = cfg.patch_size
    rows, cols = hh // ph, ww // pw
    per_frame = rows * cols
    start = num_reference * per_frame  # first non-reference token
    d = cfg.dim

    x = self.patch_embedding(_patchify(latents, cfg.patch_size)).astype(self.residual_dtype)
    x = constrain(x, _TOKENS)
    t = self.time_out(jax.nn.silu(self.time_in(
        sinusoidal_embedding(timesteps, cfg.freq_dim).astype(self.dtype))))  # (B, F, d)
    t_mod = self.time_projection(jax.nn.silu(t)).reshape(b, f, 6, d)
    ctx = self.text_out(jax.nn.gelu(self.text_in(text), approximate=True))
    cos, sin = rope_tables(cfg, f, rows, cols, num_reference)
    rope = (jnp.asarray(cos), jnp.asarray(sin))
    token_mask = (None if frame_mask is None
                  else jnp.repeat(frame_mask.astype(bool), per_frame, axis=1))  # (B, F * P)

    hints = None
    if vace_context is not None:
      hints = self._vace_hints(x[:, start:], vace_context.astype(self.dtype), ctx,
                               t_mod[:, num_reference:], (rope[0][start:], rope[1][start:]),
                               None if token_mask is None else token_mask[:, start:])

    use_dropout = not deterministic and cfg.lora_rank > 0 and cfg.lora_dropout > 0.0
    if use_dropout and rngs is None:
      raise InputError(_WHERE, "rngs", "needed (a 'dropout' stream) when deterministic=False")
    keys = (jax.random.split(rngs.dropout(), cfg.num_layers) if use_dropout else None)
    slot = np.full((cfg.num_layers,), -1, np.int32)  # main layer -> VACE hint index
    if hints is not None:
      slot[list(cfg.vace_layers)] = np.arange(len(cfg.vace_layers))
    scale = cfg.vace_scale

    def step(block, x, xs):
      key, layer_slot = xs
      x = block(x, ctx, t_mod, rope, key, token_mask)
      if hints is not None:
        hint = jax.lax.dynamic_index_in_dim(hints, jnp.maximum(layer_slot, 0), keepdims=False)
        hint = jnp.where(layer_slot >= 0, hint * scale, 0).astype(x.dtype)
        x = constrain(x.at[:, start:].add(hint), _TOKENS)
      return x, None

    x, _ = self._scan(self.blocks, x, step, (keys, jnp.asarray(slot)))

    mod = self.head_modulation[...].astype(jnp.float32) + t.astype(jnp.float32)[:, :, None]
    shift, scale_ = mod[:, :, 0, None], mod[:, :, 1, None]  # (B, F, 1, d)
    y = _layer_norm(x.reshape(b, f, per_frame, d), cfg.eps) * (1.0 + scale_) + shift
    out = self.head(y.reshape(b, f * per_frame, d).astype(self.dtype))
    return _unpatchify(out, f, rows, cols, cfg.patch_size).astype(jnp.float32)


# ----------------------------------------------------------------------------- params


def count_params(model_or_state) -> int:
  """Number of parameters (any nnx.Param, LoRA included) of a module or state."""
  state = (nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module)
           else model_or_state)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


TRAIN_STAGES = ("base", "vace", "lora")


def trainable_filter(cfg, stages: Sequence[str] = ("vace", "lora")):
  """nnx filter of the trainable params: any union of the base DiT, the VACE branch and the
  LoRA adapters.

  ``stages`` picks what trains: 'vace' (the whole VACE branch) and 'lora' (the adapters), as
  the reference's ``--stage``; 'base' (ours: every other nnx.Param, i.e. the Wan DiT itself,
  for pretraining or full fine-tuning). ``("base", "vace", "lora")`` trains every param.
  A part the model lacks (vace off, lora_rank 0) adds nothing; nothing at all gives
  ``nnx.Nothing``.
  """
  unknown = set(stages) - set(TRAIN_STAGES)
  if unknown:
    raise InputError("wan_dit.trainable_filter", "stages", f"unknown {sorted(unknown)}; "
                     f"known: {sorted(TRAIN_STAGES)}")
  in_vace = nnx.PathContains("vace")
  parts = []
  if "base" in stages:
    parts.append(nnx.All(nnx.Param, nnx.Not(LoRAParam), nnx.Not(in_vace)))
  if "lora" in stages and cfg.lora_rank:
    parts.append(LoRAParam)
  if "vace" in stages and cfg.vace:
    parts.append(nnx.All(nnx.Param, in_vace))
  return nnx.Any(*parts) if parts else nnx.Nothing


def frozen_filter(cfg, stages: Sequence[str] = ("vace", "lora")):
  """nnx filter of the params :func:`trainable_filter` leaves out (none when ``stages``
  holds all three parts)."""
  return nnx.All(nnx.Param, nnx.Not(trainable_filter(cfg, stages)))


def merge_lora(state_or_params, cfg):
  """Base weights with the adapters folded in: ``W += (alpha / rank) * A . B`` (our layout).

  Args:
    state_or_params: ``nnx.State`` of a WanDiT, a nested dict of arrays, or a flat
      ``{param_path: array}`` dict (as ``original_layout.load_params`` returns).
  Returns:
    The same kind of container without the LoRA params; every adapted kernel replaced by
    the merged one (computed in float32, stored in the kernel's dtype). Other params are
    passed through unchanged.
  """
  is_state = isinstance(state_or_params, nnx.State)
  is_flat = (not is_state and isinstance(state_or_params, Mapping)
             and all(isinstance(k, tuple) for k in state_or_params))
  flat = params_lib.flat_paths(state_or_params)
  value = lambda v: v.get_value() if isinstance(v, nnx.Variable) else v
  scale = (cfg.lora_alpha / cfg.lora_rank) if cfg.lora_rank else 0.0
  out = {}
  for path, v in flat.items():
    if path[-1] in ("lora_a", "lora_b"):
      continue
    base = path[:-1]
    if path[-1] == "kernel" and base + ("lora_a",) in flat:
      k = value(v)
      a = np.asarray(value(flat[base + ("lora_a",)]), np.float32)
      bm = np.asarray(value(flat[base + ("lora_b",)]), np.float32)
      lead = (a.ndim - 1) + (bm.ndim - 1) - k.ndim  # stacked-layer axes (blocks: 1)
      stack = math.prod(a.shape[:lead])
      delta = np.einsum("sir,sro->sio", a.reshape(stack, -1, a.shape[-1]),
                        bm.reshape(stack, bm.shape[lead], -1))
      merged = np.asarray(k, np.float32) + np.float32(scale) * delta.reshape(k.shape)
      merged = (jnp.asarray(merged, k.dtype) if isinstance(k, jax.Array)
                else merged.astype(np.asarray(k).dtype))
      if isinstance(v, nnx.Variable):
        v = v.replace(merged)
      else:
        v = merged
    out[path] = v
  if is_flat:
    return out
  if is_state:
    return nnx.State.from_flat_path(out)
  return traverse_util.unflatten_dict(out)


# ----------------------------------------------------------------------------- layout


# Linear modules of a block: (our path, original name, in shape, out shape) in terms of
# d = dim, H = heads, D = head_dim, ffn.
def _block_linears(cfg) -> list[tuple[tuple[str, ...], str, tuple[int, ...], tuple[int, ...]]]:
  d, heads = cfg.dim, cfg.num_heads
  hd = d // heads
  out = []
  for ours, orig in (("self_attn", "self_attn"), ("cross_attn", "cross_attn")):
    for p in ("q", "k", "v"):
      out.append(((ours, p), f"{orig}.{p}", (d,), (heads, hd)))
    out.append(((ours, "o"), f"{orig}.o", (heads, hd), (d,)))
  out.append((("ffn_in",), "ffn.0", (d,), (cfg.ffn_dim,)))
  out.append((("ffn_out",), "ffn.2", (cfg.ffn_dim,), (d,)))
  return out


def _linear_layout(ours: tuple[str, ...], orig: str, in_shape, out_shape,
                   keys: Callable[[str], list[str]] | None = None) -> dict:
  """kernel/bias of one Linear; ``keys(suffix)`` gives the per-layer keys (stacked) or None."""
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  w_shape = tuple(in_shape) + tuple(out_shape)
  if keys is None:
    return {ours + ("kernel",): ol.single(f"{orig}.weight", (n_out, n_in), w_shape, (1, 0)),
            ours + ("bias",): ol.single(f"{orig}.bias", (n_out,), out_shape)}
  return {ours + ("kernel",): ol.stacked(keys(f"{orig}.weight"), (n_out, n_in), w_shape, (1, 0)),
          ours + ("bias",): ol.stacked(keys(f"{orig}.bias"), (n_out,), out_shape)}


def _block_layout(cfg, prefix: tuple[str, ...], keys: Callable[[str], list[str]],
                  lora_keys: Callable[[str], list[str]] | None) -> dict:
  d, heads = cfg.dim, cfg.num_heads
  hd = d // heads
  out = {prefix + ("modulation",): ol.stacked(keys("modulation"), (1, 6, d), (6, d))}
  for attn in ("self_attn", "cross_attn"):
    for norm in ("norm_q", "norm_k"):
      out[prefix + (attn, norm)] = ol.stacked(keys(f"{attn}.{norm}.weight"), (d,), (heads, hd))
  out[prefix + ("norm3_scale",)] = ol.stacked(keys("norm3.weight"), (d,), (d,))
  out[prefix + ("norm3_bias",)] = ol.stacked(keys("norm3.bias"), (d,), (d,))
  r = cfg.lora_rank
  for ours, orig, i_shape, o_shape in _block_linears(cfg):
    out.update(_linear_layout(prefix + ours, orig, i_shape, o_shape, keys))
    if lora_keys is not None and r:
      n_in, n_out = math.prod(i_shape), math.prod(o_shape)
      out[prefix + ours + ("lora_a",)] = ol.stacked(
          lora_keys(f"{orig}.lora_A.weight"), (r, n_in), tuple(i_shape) + (r,), (1, 0))
      out[prefix + ours + ("lora_b",)] = ol.stacked(
          lora_keys(f"{orig}.lora_B.weight"), (n_out, r), (r,) + tuple(o_shape), (1, 0))
  return out


def _conv_layout(ours: tuple[str, ...], orig: str, cfg, in_ch: int) -> dict:
  pt, ph, pw = cfg.patch_size
  d = cfg.dim
  return {ours + ("kernel",): ol.single(f"{orig}.weight", (d, in_ch, pt, ph, pw),
                                        (pt * ph * pw * in_ch, d), (2, 3, 4, 1, 0)),
          ours + ("bias",): ol.single(f"{orig}.bias", (d,))}


def original_layout(cfg) -> dict[tuple[str, ...], ol.OriginalTensor]:
  """Every param of ``WanDiT(cfg)`` in terms of the original (DiffSynth ``WanModel``,
  ``VaceWanModel``, PEFT LoRA) tensors.

  DiT keys as in the released ``diffusion_pytorch_model*.safetensors`` (``blocks.{i}...``,
  ``patch_embedding.*``, ``time_embedding.{0,2}.*``, ``head.head.*``, ...); VACE keys as in
  Mirage's ``vace.safetensors`` (``vace_blocks.{n}...``, ``vace_patch_embedding.*``); LoRA
  keys as in its ``lora.safetensors`` (``pipe.dit.blocks.{i}.<module>.lora_{A,B}.weight``,
  A (rank, in), B (out, rank)). See :func:`key_group`.
  """
  _validate(cfg)
  d = cfg.dim
  pt, ph, pw = cfg.patch_size
  out = {}
  out.update(_conv_layout(("patch_embedding",), "patch_embedding", cfg, cfg.in_channels))
  out.update(_linear_layout(("text_in",), "text_embedding.0", (cfg.text_dim,), (d,)))
  out.update(_linear_layout(("text_out",), "text_embedding.2", (d,), (d,)))
  out.update(_linear_layout(("time_in",), "time_embedding.0", (cfg.freq_dim,), (d,)))
  out.update(_linear_layout(("time_out",), "time_embedding.2", (d,), (d,)))
  out.update(_linear_layout(("time_projection",), "time_projection.1", (d,), (6 * d,)))
  out.update(_linear_layout(("head",), "head.head", (d,), (pt * ph * pw * cfg.out_channels,)))
  out[("head_modulation",)] = ol.single("head.modulation", (1, 2, d), (2, d))
  n = cfg.num_layers
  out.update(_block_layout(
      cfg, ("blocks",), lambda s: [f"blocks.{i}.{s}" for i in range(n)],
      lambda s: [f"pipe.dit.blocks.{i}.{s}" for i in range(n)]))
  if cfg.vace:
    nv = len(cfg.vace_layers)
    vkeys = lambda s: [f"vace_blocks.{i}.{s}" for i in range(nv)]
    out.update(_conv_layout(("vace", "patch_embedding"), "vace_patch_embedding", cfg,
                            cfg.vace_in_channels))
    out.update(_linear_layout(("vace", "before_proj"), "vace_blocks.0.before_proj", (d,), (d,)))
    out.update(_block_layout(cfg, ("vace", "blocks"), vkeys, None))
    out.update(_linear_layout(("vace", "blocks", "after_proj"), "after_proj", (d,), (d,), vkeys))
  return out


def key_group(original_key: str) -> str:
  """Which released file an original key lives in: 'dit', 'vace' or 'lora'."""
  if ".lora_A." in original_key or ".lora_B." in original_key:
    return "lora"
  if original_key.startswith(("vace_blocks.", "vace_patch_embedding.")):
    return "vace"
  return "dit"


def load_original(model: WanDiT, get: Callable[[str], Any]) -> None:
  """Fills every param of ``model`` from original-named tensors (``get(key) -> array``)."""
  layout = original_layout(model.cfg)
  params = ol.load_params(layout, get)
  state = nnx.state(model, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    path = tuple(str(p) for p in path)
    if path not in params:
      raise KeyError(f"wan_dit.load_original: no original tensor for {path}")
    value = params[path]
    if tuple(value.shape) != tuple(var.shape):
      raise ValueError(f"wan_dit.load_original: {path} is {var.shape}, got {value.shape}")
    var.set_value(jnp.asarray(value, var.get_value().dtype))
  nnx.update(model, state)
