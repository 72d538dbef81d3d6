"""DiT denoiser over latent patches, conditioned on cameras, clean context and spatial memory.

One forward call sees a sequence of frames: ``Nc`` clean context frames (retrieved reference
latents and the last generated frames, flow time 0) followed by the ``T`` noisy target frames
of the chunk. Each frame is cut into ``p x p`` latent patches, so the token sequence is

  [context frame 0 patches, ..., context frame Nc-1 patches, target frame 0 patches, ...]

(frame-major, row-major inside a frame). Every latent pixel carries its Plücker ray (6
channels) so the camera enters per token. The spatial memory (latents splatted into each
target camera + a coverage mask) enters either by channel concatenation into the patch
embedding (``memory_conditioning='concat'``) or through a zero-initialised ControlNet-like
side branch whose per-layer outputs are added to the first ``control_layers`` main blocks
(``'control'``, as in the reference). An optional conditioning sequence (text / scene
embedding, zeros when absent) is cross-attended in every block.

Blocks are adaLN-zero (per-frame modulation from the frame's flow time, so context frames at
t = 0 and target frames at t > 0 are modulated differently inside one sequence); the output
head is zero-initialised, so a fresh model predicts exactly zero velocity.
Blocks are stacked (leading ``layers`` axis) and run with ``jax.lax.scan`` (or a Python loop,
``scan_layers=False``) under a configurable remat policy.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mirage_jax import diffusion
from mirage_jax.nn import attention as attention_lib
from mirage_jax.nn import layers
from mirage_jax.sharding import constrain

_TOKENS = ("batch", "tokens", "act_embed")


# ----------------------------------------------------------------------------- config


_VARIANTS = {
    # name: (embed_dim, num_layers, num_heads, control_layers, memory_conditioning)
    "tiny": (128, 6, 4, 2, "concat"),
    "base": (768, 12, 12, 4, "control"),
    "pod": (2048, 24, 16, 6, "control"),
}


def denoiser_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  """Size preset: 'tiny' (~2.3M params), 'base' (~213M), 'pod' (~2.8B)."""
  if variant not in _VARIANTS:
    raise ValueError(f"unknown denoiser variant {variant!r}; known: {sorted(_VARIANTS)}")
  d, n_layers, heads, control, memory = _VARIANTS[variant]
  cfg = ml_collections.ConfigDict()
  cfg.latent_channels = 8
  cfg.patch_size = 1 if variant == "tiny" else 2
  cfg.embed_dim = d
  cfg.num_layers = n_layers
  cfg.num_heads = heads
  cfg.mlp_ratio = 4.0
  cfg.time_freq_dim = 256
  cfg.cond_dim = 64 if variant == "tiny" else 1024  # 0 disables cross-attention
  cfg.memory_conditioning = memory  # 'concat' | 'control'
  cfg.control_layers = control
  cfg.max_frames = 64  # context + target frames in one sequence (learned frame embedding)
  cfg.max_patch_rows = 64  # latent rows / patch_size
  cfg.max_patch_cols = 64
  cfg.qk_norm = True
  cfg.scan_layers = True
  cfg.attention = "auto"  # attention.IMPLS: 'auto' = Pallas splash on TPU, XLA elsewhere
  cfg.remat = "none" if variant == "tiny" else "dots_with_no_batch_dims_saveable"
  cfg.precision = "f32" if variant == "tiny" else "bf16"  # see layers.PRECISIONS
  cfg.param_dtype = "float32"
  return cfg


def _validate(cfg) -> None:
  if cfg.memory_conditioning not in ("concat", "control"):
    raise ValueError(f"memory_conditioning must be 'concat' or 'control', "
                     f"got {cfg.memory_conditioning!r}")
  if cfg.embed_dim % cfg.num_heads:
    raise ValueError(f"embed_dim {cfg.embed_dim} not divisible by num_heads {cfg.num_heads}")
  if cfg.memory_conditioning == "control" and not 0 < cfg.control_layers <= cfg.num_layers:
    raise ValueError(f"control_layers must be in [1, num_layers], got {cfg.control_layers}")


# ----------------------------------------------------------------------------- blocks


class Attention(nnx.Module):
  """Multi-head attention; heads shard over the 'heads' logical axis."""

  def __init__(self, d: int, heads: int, kv_dim: int, qk_norm: bool, *, rngs: nnx.Rngs,
               dtype, param_dtype, impl: str = "auto"):
    dh = d // heads
    init = nnx.initializers.lecun_normal()
    self.wq = layers.param(rngs, init, (d, heads, dh), ("embed", "heads", "head_dim"), param_dtype)
    self.wk = layers.param(rngs, init, (kv_dim, heads, dh), ("embed", "heads", "head_dim"),
                           param_dtype)
    self.wv = layers.param(rngs, init, (kv_dim, heads, dh), ("embed", "heads", "head_dim"),
                           param_dtype)
    self.wo = layers.param(rngs, nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2),
                           (heads, dh, d), ("heads", "head_dim", "embed"), param_dtype)
    norm = lambda: layers.RMSNorm(dh, "head_dim", rngs=rngs, param_dtype=param_dtype)
    self.q_norm = norm() if qk_norm else None
    self.k_norm = norm() if qk_norm else None
    self.dtype = dtype
    self.impl = attention_lib.check_impl(impl)

  def __call__(self, x: jax.Array, kv: jax.Array) -> jax.Array:
    """x: (B, N, d) queries; kv: (B, M, kv_dim) keys/values source -> (B, N, d)."""
    c = lambda w: w[...].astype(self.dtype)
    x, kv = x.astype(self.dtype), kv.astype(self.dtype)
    q = jnp.einsum("bnd,dhk->bnhk", x, c(self.wq))
    k = jnp.einsum("bmd,dhk->bmhk", kv, c(self.wk))
    v = jnp.einsum("bmd,dhk->bmhk", kv, c(self.wv))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q = constrain(q, ("batch", "tokens", "act_heads", None))
    o = attention_lib.attention(q, k, v, impl=self.impl)
    o = constrain(o, ("batch", "tokens", "act_heads", None))
    return jnp.einsum("bnhk,hkd->bnd", o, c(self.wo))


class Block(nnx.Module):
  """adaLN-zero transformer block: self-attention, optional cross-attention, MLP."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype, param_dtype):
    d = cfg.embed_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    # shift/scale/gate for attention and MLP, zero-init so the block starts as identity.
    self.modulation = layers.Dense(d, 6 * d, ("embed", "mlp"), zero_init=True, **kw)
    # Exports written before the field existed lack it.
    impl = cfg.get("attention", "auto")
    self.attn = Attention(d, cfg.num_heads, d, cfg.qk_norm, impl=impl, **kw)
    self.cross = (Attention(d, cfg.num_heads, d, cfg.qk_norm, impl=impl, **kw)
                  if cfg.cond_dim else None)
    hidden = int(d * cfg.mlp_ratio)
    self.fc1 = layers.Dense(d, hidden, ("embed", "mlp"), **kw)
    self.fc2 = layers.Dense(hidden, d, ("mlp", "embed"), **kw)
    self.residual_dtype = layers.precision_dtypes(cfg)[1]

  def __call__(self, h: jax.Array, ada: jax.Array, cond: jax.Array | None) -> jax.Array:
    """One block.

    Args:
      h: (B, F*P, d) tokens, F frames of P patches each.
      ada: (B, F, d) per-frame conditioning vector (time embedding).
      cond: (B, L, d) projected conditioning sequence, or None.
    Returns:
      (B, F*P, d).
    """
    b, n, d = h.shape
    f = ada.shape[1]
    mod = self.modulation(jax.nn.silu(ada))[:, :, None, :]  # (B, F, 1, 6d)
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
    per_frame = lambda x: x.reshape(b, f, n // f, d)
    tokens = lambda x: x.reshape(b, n, d)

    x = tokens(per_frame(layers.layer_norm(h)) * (1 + scale1) + shift1)
    h = h + tokens(gate1 * per_frame(self.attn(x, x)))
    if self.cross is not None:
      h = h + self.cross(layers.layer_norm(h), cond)
    x = tokens(per_frame(layers.layer_norm(h)) * (1 + scale2) + shift2)
    x = constrain(jax.nn.gelu(self.fc1(x)), ("batch", "tokens", "act_mlp"))
    h = h + tokens(gate2 * per_frame(self.fc2(x)))
    return constrain(h.astype(self.residual_dtype), _TOKENS)


class ControlBlock(nnx.Module):
  """A block of the memory side branch plus its zero-initialised output projection."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype, param_dtype):
    self.block = Block(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.out = layers.Dense(cfg.embed_dim, cfg.embed_dim, ("embed", "mlp"), zero_init=True,
                            rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, h, ada, cond):
    """Returns (next control tokens, residual for the main stream), both (B, N, d)."""
    h = self.block(h, ada, cond)
    return h, constrain(self.out(h), _TOKENS)


# ----------------------------------------------------------------------------- model


class Denoiser(nnx.Module):
  """Flow-matching velocity network. See the module docstring for the token layout."""

  def __init__(self, cfg, rngs: nnx.Rngs):
    _validate(cfg)
    self.cfg = cfg
    dtype, self.residual_dtype = layers.precision_dtypes(cfg)
    param_dtype = jnp.dtype(cfg.param_dtype)
    d, p, c = cfg.embed_dim, cfg.patch_size, cfg.latent_channels
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    concat = cfg.memory_conditioning == "concat"
    frame_ch = c + 6 + (c + 1 if concat else 0)  # latent, Plücker, [memory, coverage]
    self.patch_embed = layers.Dense(p * p * frame_ch, d, ("patch_in", "embed"), **kw)
    emb = nnx.initializers.normal(0.02)
    self.frame_pos = layers.param(rngs, emb, (cfg.max_frames, d), (None, "embed"), param_dtype)
    self.row_pos = layers.param(rngs, emb, (cfg.max_patch_rows, d), (None, "embed"), param_dtype)
    self.col_pos = layers.param(rngs, emb, (cfg.max_patch_cols, d), (None, "embed"), param_dtype)
    # 0 = clean context frame, 1 = target frame.
    self.frame_type = layers.param(rngs, emb, (2, d), (None, "embed"), param_dtype)
    self.time_in = layers.Dense(cfg.time_freq_dim, d, ("patch_in", "embed"), **kw)
    self.time_out = layers.Dense(d, d, ("embed", "mlp"), **kw)
    self.cond_proj = (layers.Dense(cfg.cond_dim, d, ("cond_embed", "embed"), **kw)
                      if cfg.cond_dim else None)
    make_block = lambda r: Block(cfg, rngs=r, dtype=dtype, param_dtype=param_dtype)
    self.blocks = layers.stack_layers(make_block, cfg.num_layers, rngs)
    if concat:
      self.control_embed = None
      self.control = None
    else:
      # Memory patches -> zero-init projection added to the control branch's input tokens.
      self.control_embed = layers.Dense(p * p * (c + 6 + c + 1), d, ("patch_in", "embed"),
                                        zero_init=True, **kw)
      make_control = lambda r: ControlBlock(cfg, rngs=r, dtype=dtype, param_dtype=param_dtype)
      self.control = layers.stack_layers(make_control, cfg.control_layers, rngs)
    self.final_mod = layers.Dense(d, 2 * d, ("embed", "mlp"), zero_init=True, **kw)
    self.final = layers.Dense(d, p * p * c, ("embed", "patch_in"), zero_init=True, **kw)
    self.dtype = dtype

  # --------------------------------------------------------------------------- helpers

  def _patchify(self, x: jax.Array) -> jax.Array:
    """(B, F, h, w, ch) -> (B, F * h/p * w/p, p*p*ch)."""
    b, f, h, w, ch = x.shape
    p = self.cfg.patch_size
    x = x.reshape(b, f, h // p, p, w // p, p, ch).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, f * (h // p) * (w // p), p * p * ch)

  def _unpatchify(self, x: jax.Array, f: int, h: int, w: int) -> jax.Array:
    """(B, F * h/p * w/p, p*p*C) -> (B, F, h, w, C)."""
    p, c = self.cfg.patch_size, self.cfg.latent_channels
    x = x.reshape(x.shape[0], f, h // p, w // p, p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(x.shape[0], f, h, w, c)

  def _run_stack(self, stack, h, ada, cond, residuals=None, collect=False):
    """Runs stacked blocks over ``h``; optionally adds per-layer residuals or collects them.

    Returns ``(h, ys)`` with ``ys`` (layers, B, N, d) when ``collect`` (control branch).
    """
    def step(block, h, res):
      out = block(h, ada, cond)
      if collect:
        return out
      return (out if res is None else out + res), None

    return layers.run_layers(stack, h, step, residuals, scan=self.cfg.scan_layers,
                             remat=self.cfg.remat)

  # --------------------------------------------------------------------------- forward

  def __call__(self, x: jax.Array, t: jax.Array, rays: jax.Array, memory: jax.Array,
               coverage: jax.Array, context: jax.Array, context_rays: jax.Array,
               cond: jax.Array | None = None) -> jax.Array:
    """Predicts the flow velocity of the target frames.

    Args:
      x: (B, T, h, w, C) noisy target latents.
      t: (B, T) flow time per target frame in [0, 1] (0 = clean).
      rays: (B, T, h, w, 6) Plücker rays of the target cameras at latent resolution
        (``geometry.plucker_rays``).
      memory: (B, T, h, w, C) memory latents splatted into the target cameras (0 = empty).
      coverage: (B, T, h, w) 1 where memory covers the latent pixel, else 0.
      context: (B, Nc, h, w, C) clean context latents (Nc may be 0).
      context_rays: (B, Nc, h, w, 6) their Plücker rays.
      cond: (B, L, cond_dim) conditioning sequence, or None (= zeros).
    Returns:
      (B, T, h, w, C) float32 velocity (noise - x0, see ``mirage_jax.diffusion``).
    """
    cfg = self.cfg
    b, nt, hh, ww, c = x.shape
    nc = context.shape[1]
    nf = nc + nt
    p = cfg.patch_size
    rows, cols = hh // p, ww // p
    if hh % p or ww % p:
      raise ValueError(f"latent size {(hh, ww)} not divisible by patch_size {p}")
    if nf > cfg.max_frames or rows > cfg.max_patch_rows or cols > cfg.max_patch_cols:
      raise ValueError(f"{nf} frames of {rows}x{cols} patches exceed the position tables "
                       f"({cfg.max_frames}, {cfg.max_patch_rows}, {cfg.max_patch_cols})")
    dt = self.dtype

    # Frames: context (t = 0, no memory) then targets.
    tgt = jnp.concatenate([x, rays], -1)
    ctx = jnp.concatenate([context, context_rays], -1)
    mem_tgt = jnp.concatenate([memory, coverage[..., None]], -1)
    mem_ctx = jnp.zeros(ctx.shape[:-1] + (c + 1,), ctx.dtype)
    if cfg.memory_conditioning == "concat":
      tgt = jnp.concatenate([tgt, mem_tgt], -1)
      ctx = jnp.concatenate([ctx, mem_ctx], -1)
    frames = jnp.concatenate([ctx, tgt], axis=1).astype(dt)  # (B, F, h, w, ch)
    h = self.patch_embed(self._patchify(frames))  # (B, F*P, d)

    pos = (self.frame_pos[:nf][:, None, None] + self.row_pos[:rows][None, :, None]
           + self.col_pos[:cols][None, None, :])  # (F, rows, cols, d)
    kind = jnp.concatenate([jnp.zeros((nc,), jnp.int32), jnp.ones((nt,), jnp.int32)])
    pos = pos + self.frame_type[...][kind][:, None, None]
    h = (h.astype(self.residual_dtype)
         + pos.reshape(1, nf * rows * cols, -1).astype(self.residual_dtype))
    h = constrain(h, _TOKENS)

    t_all = jnp.concatenate([jnp.zeros((b, nc), t.dtype), t], axis=1)  # (B, F)
    temb = self.time_in(layers.timestep_embedding(t_all, cfg.time_freq_dim))
    ada = self.time_out(jax.nn.silu(temb))  # (B, F, d)

    cond_h = None
    if self.cond_proj is not None:
      if cond is None:
        cond = jnp.zeros((b, 1, cfg.cond_dim), dt)
      cond_h = self.cond_proj(cond)

    residuals = None
    if self.control is not None:
      mem = jnp.concatenate([jnp.concatenate([ctx, mem_ctx], -1),
                             jnp.concatenate([tgt, mem_tgt], -1)], axis=1).astype(dt)
      hc = h + self.control_embed(self._patchify(mem))
      _, residuals = self._run_stack(self.control, hc, ada, cond_h, collect=True)
      k = cfg.control_layers
      graphdef, state = nnx.split(self.blocks)
      first = nnx.merge(graphdef, jax.tree.map(lambda a: a[:k], state))
      rest = nnx.merge(graphdef, jax.tree.map(lambda a: a[k:], state))
      h, _ = self._run_stack(first, h, ada, cond_h, residuals)
      if k < cfg.num_layers:
        h, _ = self._run_stack(rest, h, ada, cond_h)
    else:
      h, _ = self._run_stack(self.blocks, h, ada, cond_h)

    # Output head on the target tokens only.
    h = h[:, nc * rows * cols:]
    shift, scale = jnp.split(self.final_mod(jax.nn.silu(ada[:, nc:]))[:, :, None], 2, -1)
    h = h.reshape(b, nt, rows * cols, -1)
    h = (layers.layer_norm(h) * (1 + scale) + shift).reshape(b, nt * rows * cols, -1)
    out = self.final(h)
    return self._unpatchify(out, nt, hh, ww).astype(jnp.float32)


# ----------------------------------------------------------------------------- parameterisations

PREDICTIONS = ("velocity", "x0_prior")


def memory_prior(memory: jax.Array, coverage: jax.Array, context: jax.Array) -> jax.Array:
  """The trivial composite: memory where covered, else the last context frame.

  Args:
    memory: (B, T, h, w, C); coverage: (B, T, h, w) in {0, 1}; context: (B, Nc, h, w, C).
  Returns:
    (B, T, h, w, C) prior estimate of the clean target latents.
  """
  fallback = context[:, -1:] if context.shape[1] else jnp.zeros_like(memory[:, :1])
  cov = coverage[..., None].astype(memory.dtype)
  return cov * memory + (1.0 - cov) * fallback.astype(memory.dtype)


def predict(model: Denoiser, prediction: str, x, t, rays, memory, coverage, context,
            context_rays, cond=None) -> tuple[jax.Array, jax.Array]:
  """(velocity, x0) estimates for the noisy targets ``x`` (B, T, h, w, C) at times t (B, T).

  'velocity': the network predicts the flow velocity (the reference's parameterisation).
  'x0_prior': the network predicts a residual on :func:`memory_prior`, so a fresh model
  (zero output head) already reproduces the composite "memory where covered, previous frame
  elsewhere" that a probe found hard to beat (docs/DESIGN.md); training learns the correction.
  Sample it with Euler (its velocity is undefined at t = 0, where Heun's corrector looks).
  """
  out = model(x, t, rays, memory, coverage, context, context_rays, cond)
  te = t.reshape(t.shape + (1,) * (x.ndim - t.ndim))
  if prediction == "velocity":
    return out, x - te * out
  if prediction == "x0_prior":
    x0 = memory_prior(memory, coverage, context) + out
    return diffusion.velocity_from_x0(x, x0, t), x0
  raise ValueError(f"unknown prediction {prediction!r}; known: {PREDICTIONS}")


# ----------------------------------------------------------------------------- FLOPs


def denoiser_flops(cfg, batch: int, target_frames: int, context_frames: int,
                   latent_height: int, latent_width: int, cond_len: int = 1) -> float:
  """Analytic forward FLOPs (2 per multiply-add) of ``Denoiser.__call__``.

  Counts the matrix multiplies (patch embedding, time MLP, modulation, attention projections
  and score/value products, cross-attention, MLP, control branch, output head); elementwise
  work (norms, softmax, activations) is left out, a few percent at realistic sizes.
  """
  d, p, c, heads = cfg.embed_dim, cfg.patch_size, cfg.latent_channels, cfg.num_heads
  nf = target_frames + context_frames
  per_frame = (latent_height // p) * (latent_width // p)
  n = nf * per_frame
  nt = target_frames * per_frame
  hidden = int(d * cfg.mlp_ratio)
  mm = lambda m, k, o: 2.0 * m * k * o

  def block() -> float:
    f = mm(nf, d, 6 * d)  # modulation, per frame
    f += 4 * mm(n, d, d) + 2 * mm(n, n, d)  # q, k, v, o; scores and values
    if cfg.cond_dim:
      f += 2 * mm(n, d, d) + 2 * mm(cond_len, d, d) + 2 * mm(n, cond_len, d)
    f += 2 * mm(n, d, hidden)
    return f

  concat = cfg.memory_conditioning == "concat"
  frame_ch = c + 6 + (c + 1 if concat else 0)
  total = mm(n, p * p * frame_ch, d)
  total += mm(nf, cfg.time_freq_dim, d) + mm(nf, d, d)
  if cfg.cond_dim:
    total += mm(cond_len, cfg.cond_dim, d)
  total += cfg.num_layers * block()
  if not concat:
    total += mm(n, p * p * (2 * c + 7), d)
    total += cfg.control_layers * (block() + mm(n, d, d))
  total += mm(target_frames, d, 2 * d) + mm(nt, d, p * p * c)
  return batch * total


def count_params(model: nnx.Module) -> int:
  """Number of parameters of an NNX module."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
