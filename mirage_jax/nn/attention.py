"""Multi-head attention kernels and context parallelism: the one home for softmax attention.

Every model calls :func:`attention` with ``(B, L, H, D)`` queries, keys and values; the
implementation is a config field (``model.attention``):

  * ``'xla'``: plain XLA ops (:func:`xla_attention`; materialises the ``(B, H, Lq, Lk)``
    scores, fine for short sequences and the CPU).
  * ``'chunked'``: pure JAX, a ``lax.scan`` over key blocks with an online softmax and a
    hand-written backward (``jax.custom_vjp``) that recomputes each block's scores from the
    saved log-sum-exp, so neither pass holds more than ``(B, H, Lq, block)`` scores. Runs on
    any backend.
  * ``'splash'``: jax's Pallas TPU splash-attention kernel
    (``jax.experimental.pallas.ops.tpu.splash_attention``); TPU only.
  * ``'query_blocks'``: pure JAX, :func:`xla_attention` on blocks of queries in a ``lax.map``
    (whole softmax rows, no online rescaling; each block's body rematerialised for the
    gradient). Runs on any backend; the CPU's choice for long sequences.
  * ``'auto'``: ``'splash'`` when the computation is for TPU (the mesh's devices, else the
    default backend); on the CPU ``'xla'`` while one example's (H, Lq, Lk) float32 scores
    fit ``CPU_SCORES_BYTES``, else ``'query_blocks'`` with as many queries per block as keep
    a block's scores within ``CPU_SCORES_BYTES`` (:func:`cpu_query_block`); ``'xla'``
    elsewhere. Why (2,304 tokens, 2 heads of 24, one core, CPU time): whole scores 42 MB
    stream through memory (73 ms); the key-block scan ('chunked', 128 keys) spends per
    block a rescale of the running output and a transpose (30 ms); query blocks of ~210
    rows: 23 ms, torch's flash-attention kernel 22 ms. XLA's CPU backend fuses each block's
    score product, max and exp into one fusion.

Sequence lengths need not divide a block size (Wan's 13,200 tokens do not): the chunked path
pads the keys and masks them out; the splash path pads queries and keys to the block size
and gives padded keys their own segment id, so no real query attends to them.

Key padding (``kv_mask``, (B, Lk) bool, optional): keys where it is False are never attended
to, by any query, under every implementation (XLA's ``mask``; the chunked path's block
mask; splash's key segment ids). Each query row must keep at least one real key. The Wan
rollout uses it to pad its reference and preceding frames to fixed counts.

Context parallelism. Under a mesh whose ``context`` axis shards the query tokens (the
``tokens`` logical axis), attention runs inside ``shard_map``: each device keeps its query
block and all-gathers the keys and values over ``context`` (when they are sharded that way;
a short text sequence for cross-attention is not), then runs the chosen kernel locally. The
splash kernel always runs inside ``shard_map`` (a Pallas call cannot be partitioned by XLA's
SPMD pass), with the batch over the data axes and heads over ``tensor`` as the logical rules
say.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from mirage_jax import sharding

IMPLS = ("auto", "xla", "chunked", "query_blocks", "splash")
_HEADS = ("batch", "tokens", "act_heads", None)
_LANES = 128  # splash block sizes are multiples of the TPU lane width
CPU_SCORES_BYTES = 4 << 20  # 'auto' on the CPU: largest (H, Lq, Lk) f32 scores computed at once


def check_impl(impl: str, where: str = "model.attention") -> str:
  """``impl`` if it names an implementation, else an ``InputError`` at ``where``."""
  if impl not in IMPLS:
    from mirage_jax.errors import InputError  # pylint: disable=g-import-not-at-top
    raise InputError(where, "attention", f"unknown implementation {impl!r}; known: {IMPLS}")
  return impl


def resolve(impl: str, scores: int = 0) -> str:
  """'auto' -> 'splash' when compiling for TPU (mesh devices, else default backend); on the
  CPU 'query_blocks' when ``scores`` (one example's H * Lq * Lk) float32 values exceed
  ``CPU_SCORES_BYTES``; else 'xla'."""
  if impl != "auto":
    return impl
  platform = sharding.target_platform()
  if platform == "tpu":
    return "splash"
  return "query_blocks" if platform == "cpu" and 4 * scores > CPU_SCORES_BYTES else "xla"


def cpu_query_block(heads: int, lq: int, lk: int) -> int:
  """Queries per block of CPU 'auto': the fewest blocks whose (heads, block, lk) float32
  scores fit ``CPU_SCORES_BYTES`` (at least 8 rows), split evenly so padding stays small."""
  rows = max(8, CPU_SCORES_BYTES // (4 * heads * lk))
  blocks = -(-lq // rows)
  return -(-lq // blocks)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "auto",
              block_size: int = 512, kv_mask: jax.Array | None = None) -> jax.Array:
  """Softmax attention ``softmax(q k^T / sqrt(D)) v``, optionally over real keys only.

  Args:
    q: (B, Lq, H, D) queries.
    k: (B, Lk, H, D) keys.
    v: (B, Lk, H, D) values.
    impl: one of ``IMPLS`` (see the module docstring).
    block_size: key block of 'chunked'; query block of 'query_blocks' (CPU 'auto': see
      :func:`cpu_query_block`); largest query/key block of 'splash' (multiple of 128).
    kv_mask: optional (B, Lk) bool, False = a padded key nobody attends to (at least one
      True per row).
  Returns:
    (B, Lq, H, D) in ``q.dtype``.
  """
  chosen = resolve(check_impl(impl), q.shape[2] * q.shape[1] * k.shape[1])
  if impl == "auto" and chosen == "query_blocks":
    block_size = cpu_query_block(q.shape[2], q.shape[1], k.shape[1])
  impl = chosen
  local = functools.partial(_local, impl=impl, block_size=block_size)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q, k, v, kv_mask)
  q_spec = sharding.logical_to_spec(_HEADS, None, mesh, q.shape)
  kv_spec = sharding.logical_to_spec(_HEADS, None, mesh, k.shape)
  if not _axes(q_spec[1]) and impl != "splash":
    return local(q, k, v, kv_mask)  # XLA's SPMD partitioner handles batch / head sharding
  # Keys and values use the queries' batch and head sharding; their tokens stay as the rules
  # put them (context-sharded self-attention keys are gathered below).
  kv_spec = PartitionSpec(q_spec[0], kv_spec[1], q_spec[2], None)
  gather = _axes(kv_spec[1])
  mask_spec = PartitionSpec(kv_spec[0], kv_spec[1])

  def body(q, k, v, *mask):
    if gather:
      k = jax.lax.all_gather(k, gather, axis=1, tiled=True)
      v = jax.lax.all_gather(v, gather, axis=1, tiled=True)
      mask = tuple(jax.lax.all_gather(m, gather, axis=1, tiled=True) for m in mask)
    return local(q, k, v, *mask)

  masks = () if kv_mask is None else (kv_mask,)
  return jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec) + (mask_spec,) * len(masks),
                       out_specs=q_spec, check_vma=False)(q, k, v, *masks)


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _local(q, k, v, kv_mask=None, *, impl: str, block_size: int) -> jax.Array:
  if impl == "xla":
    return xla_attention(q, k, v, kv_mask)
  if impl == "chunked":
    return chunked_attention(q, k, v, block_size, kv_mask)
  if impl == "query_blocks":
    return query_blocked_attention(q, k, v, block_size, kv_mask)
  if impl == "splash":
    return splash_attention(q, k, v, block_size, kv_mask)
  raise ValueError(f"attention: unknown implementation {impl!r}")


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                  kv_mask: jax.Array | None = None) -> jax.Array:
  """``jax.nn.dot_product_attention``'s XLA path (float32 scores and softmax), normalised late.

  (B, Lq, H, D) q, (B, Lk, H, D) k and v, optional (B, Lk) bool kv_mask -> (B, Lq, H, D) in
  q's dtype. The softmax's division is applied to the (B, H, Lq, D) output of the
  probabilities-times-values product instead of to the (B, H, Lq, Lk) probabilities: one
  pass over the scores fewer, and with heads ahead of tokens in both products XLA's CPU
  backend no longer transposes the probabilities for the second one. At 576 tokens, 2 heads
  of 24 on one core: 2.6 -> 1.6 ms (torch's flash-attention kernel: 1.6 ms); the results
  differ from the jax path's by float rounding (~1e-7 relative).
  """
  qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # (B, H, L, D)
  o = _heads_first_attention(qt, kt, vt, kv_mask, q.shape[-1] ** -0.5)
  return o.astype(q.dtype).transpose(0, 2, 1, 3)


def _heads_first_attention(qt, kt, vt, kv_mask, score_scale: float | None):
  """The core of :func:`xla_attention` and :func:`query_blocked_attention`.

  (B, H, Lq, D) qt, (B, H, Lk, D) kt and vt, optional (B, Lk) bool kv_mask ->
  (B, H, Lq, D) float32: softmax(qt kt^T * score_scale) vt (None: qt comes scaled), the
  softmax's division applied after the product with the values.
  """
  s = jnp.einsum("bhqd,bhkd->bhqk", qt, kt, preferred_element_type=jnp.float32)
  if score_scale is not None:
    s = s * np.float32(score_scale)
  if kv_mask is not None:
    s = jnp.where(kv_mask[:, None, None, :], s, np.finfo(np.float32).min)
  p = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
  o = jnp.einsum("bhqk,bhkd->bhqd", p.astype(vt.dtype), vt, preferred_element_type=jnp.float32)
  return o / jnp.sum(p, axis=-1, keepdims=True)


def query_blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int,
                            kv_mask: jax.Array | None = None) -> jax.Array:
  """:func:`xla_attention` on ``block`` queries at a time (a ``lax.map``): every row's softmax
  is whole (no online rescaling), and one block's (B, H, block, Lk) scores stay in cache.

  (B, Lq, H, D) q, (B, Lk, H, D) k and v, optional (B, Lk) bool kv_mask -> (B, Lq, H, D) in
  q's dtype. Queries are zero-padded to a multiple of ``block`` (their rows are dropped).
  Each block's body is rematerialised in the backward pass, so a gradient holds no more
  than one block's scores either.
  """
  b, lq, h, d = q.shape
  block = int(min(block, lq))
  nq = -(-lq // block)
  # The 1/sqrt(D) goes on the queries (Lq * D products, not Lq * Lk): on the CPU the
  # score product, max and exp then form one fusion.
  qt = (q * jnp.asarray(d ** -0.5, q.dtype)).transpose(0, 2, 1, 3)
  qt = jnp.pad(qt, ((0, 0), (0, 0), (0, nq * block - lq), (0, 0)))
  qb = jnp.moveaxis(qt.reshape(b, h, nq, block, d), 2, 0)  # (nq, B, H, block, D)
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, H, Lk, D)

  @jax.checkpoint
  def one(qi):
    return _heads_first_attention(qi, kt, vt, kv_mask, None).astype(q.dtype)

  o = jax.lax.map(one, qb)  # (nq, B, H, block, D)
  o = jnp.moveaxis(o, 0, 2).reshape(b, h, nq * block, d)[:, :, :lq]
  return o.transpose(0, 2, 1, 3)


# ----------------------------------------------------------------------------- chunked


def _key_blocks(x: jax.Array, block: int) -> jax.Array:
  """(B, Lk, H, D) -> (nb, B, block, H, D), zero-padded to nb * block keys."""
  b, n, h, d = x.shape
  nb = -(-n // block)
  x = jnp.pad(x, ((0, 0), (0, nb * block - n), (0, 0), (0, 0)))
  return jnp.moveaxis(x.reshape(b, nb, block, h, d), 1, 0)


def _block_scores(q, kb, mb, i, block, n_keys, scale):
  """Scaled scores (B, H, Lq, block) in f32 of key block ``i``; padded keys (past ``n_keys``
  or False in the block's mask ``mb`` (B, block)) at -inf."""
  s = jnp.einsum("bqhd,bkhd->bhqk", q, kb, preferred_element_type=jnp.float32) * scale
  valid = (i * block + jnp.arange(block) < n_keys) & mb[:, None, None, :]
  return jnp.where(valid, s, -jnp.inf)


def _mask_blocks(kv_mask, k, block):
  """(B, Lk) bool (or None: all real) -> (nb, B, block), False past Lk."""
  b, n = k.shape[:2]
  m = jnp.ones((b, n), bool) if kv_mask is None else kv_mask.astype(bool)
  nb = -(-n // block)
  return jnp.moveaxis(jnp.pad(m, ((0, 0), (0, nb * block - n))).reshape(b, nb, block), 1, 0)


def _chunked_forward(q, k, v, kv_mask, block):
  n_keys, scale = k.shape[1], 1.0 / math.sqrt(q.shape[-1])
  b, lq, h, d = q.shape
  kbs, vbs, mbs = _key_blocks(k, block), _key_blocks(v, block), _mask_blocks(kv_mask, k, block)

  def step(carry, xs):
    o, m, l = carry
    i, kb, vb, mb = xs
    s = _block_scores(q, kb, mb, i, block, n_keys, scale)
    m_new = jnp.maximum(m, s.max(-1))
    # A block of padded keys only (kv_mask) leaves the running max at -inf: shift by 0 then.
    m_new = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[..., None])
    l = l * alpha + p.sum(-1)
    pv = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
    o = o * jnp.swapaxes(alpha, 1, 2)[..., None] + pv
    return (o, m_new, l), None

  init = (jnp.zeros((b, lq, h, d), jnp.float32), jnp.full((b, h, lq), -jnp.inf, jnp.float32),
          jnp.zeros((b, h, lq), jnp.float32))
  (o, m, l), _ = jax.lax.scan(step, init, (jnp.arange(kbs.shape[0]), kbs, vbs, mbs))
  out = (o / jnp.swapaxes(l, 1, 2)[..., None]).astype(q.dtype)
  return out, m + jnp.log(l)  # lse: (B, H, Lq)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked(q, k, v, kv_mask, block):
  return _chunked_forward(q, k, v, kv_mask, block)[0]


def _chunked_fwd(q, k, v, kv_mask, block):
  out, lse = _chunked_forward(q, k, v, kv_mask, block)
  return out, (q, k, v, kv_mask, out, lse)


def _chunked_bwd(block, residuals, do):
  q, k, v, kv_mask, out, lse = residuals
  n_keys, scale = k.shape[1], 1.0 / math.sqrt(q.shape[-1])
  # delta_i = sum_j p_ij dp_ij = do_i . o_i
  delta = jnp.swapaxes(jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), -1), 1, 2)
  kbs, vbs, mbs = _key_blocks(k, block), _key_blocks(v, block), _mask_blocks(kv_mask, k, block)

  def step(dq, xs):
    i, kb, vb, mb = xs
    p = jnp.exp(_block_scores(q, kb, mb, i, block, n_keys, scale) - lse[..., None])
    dv = jnp.einsum("bhqk,bqhd->bkhd", p.astype(do.dtype), do,
                    preferred_element_type=jnp.float32)
    dp = jnp.einsum("bqhd,bkhd->bhqk", do, vb, preferred_element_type=jnp.float32)
    ds = (p * (dp - delta[..., None]) * scale).astype(q.dtype)
    dq = dq + jnp.einsum("bhqk,bkhd->bqhd", ds, kb, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q, preferred_element_type=jnp.float32)
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32),
                              (jnp.arange(kbs.shape[0]), kbs, vbs, mbs))
  unblock = lambda x, like: jnp.moveaxis(x, 0, 1).reshape(
      like.shape[0], -1, *like.shape[2:])[:, :like.shape[1]].astype(like.dtype)
  return dq.astype(q.dtype), unblock(dk, k), unblock(dv, v), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_size: int = 512,
                      kv_mask: jax.Array | None = None) -> jax.Array:
  """Blockwise attention with an online softmax; never holds the (Lq, Lk) scores.

  Args:
    q: (B, Lq, H, D); k, v: (B, Lk, H, D).
    block_size: keys per block (the last block is padded and masked).
    kv_mask: optional (B, Lk) bool, False = padded key (see :func:`attention`).
  Returns:
    (B, Lq, H, D) in ``q.dtype``; its gradient recomputes each block's scores.
  """
  return _chunked(q, k, v, kv_mask, int(min(block_size, k.shape[1])))


# ----------------------------------------------------------------------------- splash


def _splash_block(n: int, largest: int) -> int:
  """The multiple of 128 up to ``largest`` that pads ``n`` least (the larger on a tie)."""
  top = max(_LANES, min(largest // _LANES * _LANES, -(-n // _LANES) * _LANES))
  return min(range(top, 0, -_LANES), key=lambda blk: -(-n // blk) * blk)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_size: int = 512,
                     kv_mask: jax.Array | None = None) -> jax.Array:
  """The Pallas TPU splash kernel on one device's arrays (TPU only).

  Args:
    q: (B, Lq, H, D); k, v: (B, Lk, H, D). Any lengths: both are padded to their block
      size, padded keys take segment id 1 (real queries and padded queries have id 0, so
      every query row keeps real keys and none sees a padded one).
    block_size: largest block (rounded down to a multiple of 128).
    kv_mask: optional (B, Lk) bool; keys where False take segment id 1 as well.
  Returns:
    (B, Lq, H, D) in ``q.dtype``.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as sk, splash_attention_mask as sm)
  b, lq, h, d = q.shape
  lk = k.shape[1]
  bq, bkv = _splash_block(lq, block_size), _splash_block(lk, block_size)
  lq_pad, lk_pad = -(-lq // bq) * bq, -(-lk // bkv) * bkv
  # The kernel takes (H, L, D) per example and does not scale the scores.
  heads_first = lambda x, n: jnp.pad(jnp.swapaxes(x, 1, 2),
                                     ((0, 0), (0, 0), (0, n - x.shape[1]), (0, 0)))
  qh = heads_first(q * jnp.asarray(1.0 / math.sqrt(d), q.dtype), lq_pad)
  kh, vh = heads_first(k, lk_pad), heads_first(v, lk_pad)
  mask = sm.MultiHeadMask([sm.FullMask((lq_pad, lk_pad)) for _ in range(h)])
  blocks = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                         block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                         block_kv_dq=bkv)
  kernel = sk.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1)
  real = jnp.broadcast_to(jnp.asarray(np.arange(lk_pad) < lk), (b, lk_pad))
  if kv_mask is not None:
    real = real & jnp.pad(kv_mask.astype(bool), ((0, 0), (0, lk_pad - lk)))
  kv_segments = (~real).astype(jnp.int32)
  q_segments = jnp.zeros((lq_pad,), jnp.int32)
  out = jax.vmap(lambda q1, k1, v1, s1: kernel(
      q1, k1, v1, segment_ids=sk.SegmentIds(q=q_segments, kv=s1)))(qh, kh, vh, kv_segments)
  return jnp.swapaxes(out[:, :, :lq], 1, 2).astype(q.dtype)
