"""The umT5 encoder (umT5-xxl: Wan2.2's text encoder) in Flax NNX.

A port of the encoder half of umT5 with the math of the Wan release (``wan/modules/t5.py``
``T5Encoder`` with ``shared_pos=False``, which Mirage's ``WanTextEncoder`` copies) and of
transformers' ``UMT5EncoderModel`` (our numerical oracle), so the released weights load
through :mod:`mirage_jax.text.convert` and give the reference's embeddings.

Network (``ids`` (B, L) -> (B, L, dim))::

  x = Embedding(ids)                                   # no scaling, no absolute positions
  for each of the L blocks:
    x += O(Attn(RMS1(x)))        # q . k without 1/sqrt(head_dim); + this block's own
                                 # relative position bias (B, H, L, L); padded keys masked
    x += Wo(gelu_tanh(Wi0(RMS2(x))) * Wi1(RMS2(x)))    # gated GELU (T5 v1.1 'gelu_new')
  out = RMS(x), then zero at positions >= the prompt's length

RMS is T5's LayerNorm: ``w * x / sqrt(mean(x^2) + 1e-6)`` (no mean, no bias). umT5 differs
from T5 in that EVERY block has its own relative-position table (``num_buckets`` x heads);
T5 shares block 0's. Buckets are bidirectional: half for keys to the right, half to the left;
in each half, distances below ``num_buckets / 4`` have their own bucket, larger ones share
logarithmic buckets up to ``max_distance`` (further is the last bucket). The bucket table
depends only on the (static) length, so it is computed with numpy at trace time, in float32
as torch does (at the log buckets' edges the float32 rounding decides the bucket; a test
checks every pair up to 600 tokens against transformers').

Padding. The released pipeline pads every prompt to 512 tokens; padded KEYS get a bias of
the dtype's minimum (no query attends to them), padded QUERIES still run and their outputs
are then set to zero (``WanPrompter.encode_prompt`` zeroes ``[len:]``; Wan's own
``T5EncoderModel`` cuts them off, which the DiT's cross-attention, unmasked, would see as
zeros after its padding to 512). So a prompt gives the same embedding at any padded length.
Each row is zeroed at its own length: what the reference gives for one prompt per call, as
Mirage calls it (prompt and negative prompt apart). For a batch its loop,
``prompt_emb[:, v:] = 0`` over every row's ``v``, would cut every row at the shortest.

Precision. Matmuls run in ``dtype`` (bf16 as released, or f32); the residual stream, the
norms, the attention scores and their softmax in float32. (The reference runs the stream in
bf16 too; keeping it f32 costs 8 MiB per 512-token prompt and rounds less.)

Layers are stacked (leading ``layers`` axis) and run by ``nn.layers.run_layers`` (a
``lax.scan`` or unrolled). Params carry logical axes (``embed``, ``heads``, ``mlp``,
``vocab``, ``layers``), so the 5.7B-parameter encoder shards over a mesh by the same rules as
the DiT (``embed`` over ``fsdp``, heads and MLP units over ``tensor``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mirage_jax.errors import InputError
from mirage_jax.nn import layers
from mirage_jax.nn import params as params_lib
from mirage_jax.sharding import constrain

VARIANTS = ("xxl", "tiny")
_TOKENS = ("batch", "tokens", "act_embed")
_HEADS = ("batch", "tokens", "act_heads", None)


# ----------------------------------------------------------------------------- config


def model_config(variant: str = "xxl", **overrides) -> ml_collections.ConfigDict:
  """Size preset: 'xxl' (the released umT5-xxl encoder, Wan2.2's) or 'tiny' (CPU tests).

  Fields: vocab_size, dim, num_heads, head_dim, ffn_dim, num_layers, num_buckets,
  max_distance, eps, scan_layers, remat, variant.
  """
  cfg = ml_collections.ConfigDict()
  cfg.variant = variant
  cfg.num_buckets = 32
  cfg.max_distance = 128
  cfg.eps = 1e-6
  cfg.scan_layers = True
  cfg.remat = "none"
  if variant == "xxl":
    cfg.vocab_size = 256384
    cfg.dim = 4096
    cfg.num_heads = 64
    cfg.head_dim = 64
    cfg.ffn_dim = 10240
    cfg.num_layers = 24
  elif variant == "tiny":
    cfg.vocab_size = 512
    cfg.dim = 64
    cfg.num_heads = 4
    cfg.head_dim = 16
    cfg.ffn_dim = 128
    cfg.num_layers = 2
  else:
    raise InputError("text_encoder", "variant", f"unknown umT5 variant {variant!r}; "
                     f"known: {list(VARIANTS)}")
  for key, value in overrides.items():
    if key not in cfg:
      raise InputError("text_encoder", key, f"not a umT5 config field; known: {sorted(cfg)}")
    cfg[key] = value
  return cfg


_INT_FIELDS = ("vocab_size", "dim", "num_heads", "head_dim", "ffn_dim", "num_layers",
               "num_buckets", "max_distance")


def check_config(cfg, where: str = "text_encoder") -> None:
  """Refuses a config this module cannot build, in one line naming the field."""
  for name in _INT_FIELDS + ("eps", "scan_layers", "remat"):
    if name not in cfg:
      raise InputError(where, name, "missing from the umT5 config")
  for name in _INT_FIELDS:
    if not isinstance(cfg[name], int) or cfg[name] <= 0:
      raise InputError(where, name, f"must be a positive integer, got {cfg[name]!r}")
  if cfg.num_buckets % 4:
    raise InputError(where, "num_buckets", f"must be a multiple of 4, got {cfg.num_buckets}")


# ----------------------------------------------------------------------------- positions


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """(length, length) int32 bucket of key j for query i (bidirectional, as T5's encoder).

  ``rel = j - i``; keys to the right (rel > 0) use buckets ``num_buckets/2 ..``; within each
  half, ``|rel| < num_buckets/4`` is exact and larger distances fall in logarithmic buckets
  up to ``max_distance``. Float32 arithmetic as torch's, so edge cases round alike.
  """
  half = num_buckets // 2
  max_exact = half // 2
  rel = np.arange(length)[None, :] - np.arange(length)[:, None]
  out = (rel > 0).astype(np.int64) * half
  dist = np.abs(rel)
  with np.errstate(divide="ignore"):  # log(0) at dist 0, which takes the exact branch
    ratio = np.log(dist.astype(np.float32) / np.float32(max_exact))
  ratio = ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
  large = max_exact + np.where(np.isfinite(ratio), ratio, 0).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (out + np.where(dist < max_exact, dist, large)).astype(np.int32)


# ----------------------------------------------------------------------------- network


class Block(nnx.Module):
  """One encoder block: pre-RMSNorm self-attention with its own relative position table,
  then the pre-RMSNorm gated-GELU FFN (see the module docstring)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype, param_dtype):
    d, inner = cfg.dim, cfg.num_heads * cfg.head_dim
    kw = dict(rngs=rngs, use_bias=False, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = layers.RMSNorm(d, "embed", rngs=rngs, param_dtype=param_dtype)
    # (dim, heads * head_dim): the out axis splits by whole heads over 'tensor'.
    self.q = layers.Dense(d, inner, ("embed", "heads"), **kw)
    self.k = layers.Dense(d, inner, ("embed", "heads"), **kw)
    self.v = layers.Dense(d, inner, ("embed", "heads"), **kw)
    self.o = layers.Dense(inner, d, ("heads", "embed"), **kw)
    self.rel_bias = layers.param(rngs, nnx.initializers.normal(0.1),
                                 (cfg.num_buckets, cfg.num_heads), (None, "heads"), param_dtype)
    self.norm2 = layers.RMSNorm(d, "embed", rngs=rngs, param_dtype=param_dtype)
    self.wi_gate = layers.Dense(d, cfg.ffn_dim, ("embed", "mlp"), **kw)
    self.wi_lin = layers.Dense(d, cfg.ffn_dim, ("embed", "mlp"), **kw)
    self.wo = layers.Dense(cfg.ffn_dim, d, ("mlp", "embed"), **kw)
    self.num_heads = cfg.num_heads
    self.head_dim = cfg.head_dim
    self.dtype = dtype

  def __call__(self, x: jax.Array, buckets: jax.Array, key_mask: jax.Array) -> jax.Array:
    """x: (B, L, dim) float32; buckets: (L, L) int32; key_mask: (B, L) bool -> (B, L, dim)."""
    b, n = x.shape[:2]
    h = self.norm1(x)
    split = lambda y: constrain(y.reshape(b, n, self.num_heads, self.head_dim), _HEADS)
    q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
    # T5: no 1/sqrt(head_dim) (folded into the released q weights' init).
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    bias = jnp.take(self.rel_bias[...].astype(jnp.float32), buckets, axis=0)  # (L, L, H)
    scores = scores + jnp.transpose(bias, (2, 0, 1))[None]
    scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    o = constrain(jnp.einsum("bhqk,bkhd->bqhd", probs, v), _HEADS)
    x = x + self.o(o.reshape(b, n, -1)).astype(jnp.float32)
    h = self.norm2(x)
    gated = jax.nn.gelu(self.wi_gate(h), approximate=True) * self.wi_lin(h)
    gated = constrain(gated, ("batch", "tokens", "act_mlp"))
    return constrain(x + self.wo(gated).astype(jnp.float32), _TOKENS)


class UMT5Encoder(nnx.Module):
  """The umT5 encoder (see the module docstring).

  Args:
    cfg: :func:`model_config`.
    dtype: the matmuls' dtype (bf16 as released, or float32).
    param_dtype: the stored params' dtype.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    check_config(cfg)
    self.cfg = cfg
    self.token_embedding = layers.param(rngs, nnx.initializers.normal(1.0),
                                        (cfg.vocab_size, cfg.dim), ("vocab", "embed"),
                                        param_dtype)
    make = lambda r: Block(cfg, rngs=r, dtype=dtype, param_dtype=param_dtype)
    self.blocks = layers.stack_layers(make, cfg.num_layers, rngs)
    self.norm = layers.RMSNorm(cfg.dim, "embed", rngs=rngs, param_dtype=param_dtype)
    self.dtype = dtype

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Embeds token ids.

    Args:
      ids: (B, L) int token ids (the tokenizer's, padded).
      mask: (B, L) bool (or 0/1), True on the prompt's tokens; the prompt's length is its
        count of True (a prefix, as the tokenizer pads on the right).
    Returns:
      (B, L, dim) float32; rows at positions >= the length are exactly zero.
    """
    if ids.ndim != 2 or mask.shape != ids.shape:
      raise InputError("UMT5Encoder", "ids", f"ids {ids.shape} and mask {mask.shape} must "
                       "both be (batch, tokens)")
    b, n = ids.shape
    mask = mask.astype(bool)
    x = jnp.take(self.token_embedding[...], ids.astype(jnp.int32), axis=0)
    x = constrain(x.astype(jnp.float32), _TOKENS)
    cfg = self.cfg
    buckets = jnp.asarray(relative_position_buckets(n, cfg.num_buckets, cfg.max_distance))

    def step(block, x, _):
      return block(x, buckets, mask), None

    x, _ = layers.run_layers(self.blocks, x, step, None, scan=cfg.scan_layers,
                             remat=cfg.remat)
    x = self.norm(x)
    length = jnp.sum(mask, axis=1)
    keep = jnp.arange(n)[None, :] < length[:, None]
    return jnp.where(keep[..., None], x, 0.0).astype(jnp.float32)


# ----------------------------------------------------------------------------- helpers


def abstract_model(cfg, dtype=jnp.float32, param_dtype=jnp.float32) -> UMT5Encoder:
  """The encoder of ``cfg`` with ShapeDtypeStruct params (no allocation)."""
  return nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                            param_dtype=param_dtype))



def param_shapes(cfg) -> dict[str, tuple[int, ...]]:
  """'blocks/q/kernel' -> shape (stacked: leading num_layers), for every param (abstract)."""
  return params_lib.shapes(abstract_model(cfg))


num_params = params_lib.count  # parameter count (works on an abstract model)


def load_export(path: str, dtype=jnp.float32, param_dtype=None
                ) -> tuple[UMT5Encoder, ml_collections.ConfigDict]:
  """A UMT5Encoder from an export (``config.json`` with ``text_encoder``, ``params/`` the pure
  dict of the model's ``nnx.Param`` state), and that model config.

  Args:
    path: the export (``python -m mirage_jax.convert_text``).
    dtype: the matmuls' dtype.
    param_dtype: cast the params to this as they are read (None: as saved).
  Raises:
    InputError: naming the export and the field: no ``text_encoder`` in its config, an
      invalid one, or saved params whose names or shapes are not those the config builds.
  """
  from mirage_jax import checkpoint  # pylint: disable=g-import-not-at-top  # orbax: load time only
  config = checkpoint.export_config(path)
  where = f"{path}/config.json"
  if "text_encoder" not in config:
    raise InputError(where, "text_encoder", "missing: not a umT5 text-encoder export")
  cfg = ml_collections.ConfigDict(config.text_encoder.to_dict())
  check_config(cfg, where)
  params, _, _ = checkpoint.load_export(path, dtype=param_dtype)
  saved_dtype = jax.tree.leaves(params)[0].dtype
  model = abstract_model(cfg, dtype=dtype, param_dtype=saved_dtype)
  hint = f"(an export of another variant? config says {cfg.variant})"
  return params_lib.restore(model, params, path, hint), cfg
