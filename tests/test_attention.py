"""mirage_jax/nn/attention.py: chunked == XLA (values and gradients), context parallelism
on fake CPU devices, and the splash kernel AOT-compiled for a TPU topology (needs libtpu)."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mirage_jax import sharding
from mirage_jax.errors import InputError
from mirage_jax.families.wan import dit as wan_dit
from mirage_jax.nn import attention as attn


def _qkv(seed, b=2, lq=37, lk=45, h=2, d=8, dtype=np.float32):
  rng = np.random.default_rng(seed)
  draw = lambda n: jnp.asarray(2.0 * rng.standard_normal((b, n, h, d)), dtype)
  return draw(lq), draw(lk), draw(lk)


def _grads(impl, q, k, v, w):
  # A loss that weights every output element differently, so every gradient entry counts.
  loss = lambda q, k, v: jnp.sum(w * attn.attention(q, k, v, impl=impl, block_size=16))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("impl", ["chunked", "query_blocks"])
@pytest.mark.parametrize("lq,lk", [(37, 45), (32, 7)])  # lengths not a multiple of the block
def test_blocked_matches_xla_values_and_gradients(lq, lk, impl):
  q, k, v = _qkv(0, lq=lq, lk=lk)
  w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
  out_x = attn.attention(q, k, v, impl="xla")
  out_c = jax.jit(lambda q, k, v: attn.attention(q, k, v, impl=impl, block_size=16))(q, k, v)
  assert out_c.shape == q.shape
  np.testing.assert_allclose(out_c, out_x, rtol=0, atol=2e-6 * float(jnp.abs(out_x).max()))
  (lx, gx), (lc, gc) = _grads("xla", q, k, v, w), _grads(impl, q, k, v, w)
  np.testing.assert_allclose(lc, lx, rtol=1e-5)
  for a, b in zip(gc, gx):
    scale = float(jnp.abs(b).max())
    assert scale > 0
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale)


def test_chunked_bfloat16_close_to_float32():
  q, k, v = _qkv(2, lq=64, lk=64, d=16)
  ref = attn.attention(q, k, v, impl="xla")
  got = attn.chunked_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), 16)
  assert got.dtype == jnp.bfloat16
  assert float(jnp.abs(got.astype(jnp.float32) - ref).max()) < 0.05 * float(jnp.abs(ref).max())


def test_unknown_implementation_is_an_input_error():
  q, k, v = _qkv(3)
  with pytest.raises(InputError, match="attention"):
    attn.attention(q, k, v, impl="flashy")


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_context_parallel_attention_gathers_keys_and_matches(impl):
  q, k, v = _qkv(4, b=2, lq=32, lk=32, h=2)
  mesh = sharding.make_mesh({"fsdp": 2, "context": 2, "tensor": 2})
  f = jax.jit(lambda q, k, v: attn.attention(q, k, v, impl=impl, block_size=16))
  ref = f(q, k, v)
  spec = sharding.logical_to_spec(("batch", "tokens", "act_heads", None), None, mesh, q.shape)
  assert tuple(spec)[1:] == ("context", "tensor", None)
  put = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
  with jax.set_mesh(mesh):
    hlo = f.lower(put(q), put(k), put(v)).compile().as_text()
    out = f(put(q), put(k), put(v))
  # Keys and values are gathered over 'context' inside shard_map; queries stay split.
  assert "all-gather" in hlo
  assert out.sharding.spec == spec
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * float(jnp.abs(ref).max()))
  # Text keys (cross-attention) whose length does not divide 'context' are not gathered.
  kt, vt = k[:, :7], v[:, :7]
  with jax.set_mesh(mesh):
    out = f(put(q), kt, vt)
  np.testing.assert_allclose(out, f(q, kt, vt), rtol=0, atol=1e-5 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_wan_dit_context_parallel_matches_unsharded(impl):
  cfg = wan_dit.wan_dit_config("tiny")
  cfg.attention = impl
  model = wan_dit.WanDiT(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  # VACE's after_proj starts at zero; give it values so the branch reaches the output.
  params = jax.tree.map(lambda x: x + 0.02 * jnp.sin(jnp.arange(x.size).reshape(x.shape)),
                        params)
  rng = np.random.default_rng(5)
  b, f, hh, ww = 2, 3, 4, 4  # 3 frames x 4 tokens = 12 tokens, 6 per context shard
  latents = jnp.asarray(rng.standard_normal((b, f, hh, ww, cfg.in_channels)), jnp.float32)
  text = jnp.asarray(rng.standard_normal((b, 5, cfg.text_dim)), jnp.float32)
  vace = jnp.asarray(rng.standard_normal((b, f - 1, hh, ww, cfg.vace_in_channels)), jnp.float32)
  t = jnp.asarray([[0.0, 700.0, 700.0]] * b)
  fwd = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a[:3], num_reference=1, vace_context=a[3]))
  ref = fwd(params, latents, t, text, vace)
  mesh = sharding.make_mesh({"fsdp": 2, "context": 2, "tensor": 2})
  specs = nnx.get_partition_spec(params)
  sharded = jax.device_put(params, sharding.logical_to_sharding(specs, mesh, shapes=params))
  with jax.set_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(fwd)(sharded, latents, t, text, vace))
    out = fwd(sharded, latents, t, text, vace)
  assert "shard_map" in jaxpr and "all_gather" in jaxpr
  scale = float(jnp.abs(ref).max())
  assert scale > 0
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * scale)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install -e .[tpu])")
@pytest.mark.usefixtures("tpu_compiler")
def test_splash_compiles_for_v5p_with_context_parallelism():
  from mirage_jax import aot
  devices = aot.topology_devices("v5p:2x2x1")
  mesh = sharding.make_mesh({"fsdp": 2, "context": 2}, devices)
  # 300 query tokens (150 per context shard) and 77 text keys: neither a multiple of 128.
  b, lq, lk, h, d = 2, 300, 77, 2, 128
  spec = sharding.logical_to_spec(("batch", "tokens", "act_heads", None), None, mesh,
                                  (b, lq, h, d))
  x = lambda n, s: jax.ShapeDtypeStruct((b, n, h, d), jnp.bfloat16,
                                        sharding=jax.sharding.NamedSharding(mesh, s))

  def loss(q, k, v, kt, vt):
    o = attn.attention(q, k, v, impl="auto") + attn.attention(q, kt, vt, impl="splash")
    return jnp.sum(o.astype(jnp.float32) ** 2)

  with jax.set_mesh(mesh):
    assert attn.resolve("auto") == "splash"
    repl = jax.sharding.PartitionSpec()
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(
        x(lq, spec), x(lq, spec), x(lq, spec), x(lk, repl), x(lk, repl))
    text = lowered.as_text()
    compiled = lowered.compile()
  assert "tpu_custom_call" in text  # the Pallas kernel, not XLA's attention
  assert compiled.memory_analysis().temp_size_in_bytes > 0
  assert attn.resolve("auto") == "xla"  # outside the TPU mesh: this host's CPU


def test_auto_on_the_cpu_blocks_queries_once_the_scores_outgrow_the_cache():
  """'auto' on the CPU: whole scores while H * Lq * Lk float32 fit CPU_SCORES_BYTES, then
  query blocks whose scores fit it, with the same values."""
  small = attn.CPU_SCORES_BYTES // 4
  assert attn.resolve("auto", small) == "xla"
  assert attn.resolve("auto", small + 1) == "query_blocks"
  assert attn.resolve("xla", 10 * small) == "xla"  # an explicit choice stands
  # 2 heads of 2,304 keys: 227 rows fit, 2,304 queries -> 11 even blocks of 210.
  assert attn.cpu_query_block(2, 2304, 2304) == 210
  assert attn.cpu_query_block(24, 13200, 13200) == 8  # never fewer than 8 rows
  lq = lk = 1024  # 1 head: 4 MiB of scores + 1 key -> 2 blocks of 512 queries
  q, k, v = (jax.random.normal(jax.random.key(i), (1, n, 1, 8)) for i, n in enumerate((lq, lk + 1, lk + 1)))
  f = lambda impl: jax.jit(lambda q, k, v: attn.attention(q, k, v, impl=impl))
  assert "while" in f("auto").lower(q, k, v).as_text()  # the query-block map
  assert "while" not in f("xla").lower(q, k, v).as_text()
  np.testing.assert_allclose(f("auto")(q, k, v), f("xla")(q, k, v), atol=2e-6)


def test_executed_flops_count_a_kernel_body_once_per_grid_point():
  """The roofline's executed FLOPs see inside a Pallas kernel (splash attention is one)."""
  from jax.experimental import pallas as pl
  from mirage_jax.training import flops as flops_lib

  def kernel(x_ref, y_ref, o_ref):
    o_ref[...] = x_ref[...] @ y_ref[...]

  def matmul(x, y):  # (256, 64) @ (64, 128) in 2 row blocks
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((256, 128), jnp.float32), grid=(2,),
        in_specs=[pl.BlockSpec((128, 64), lambda i: (i, 0)),
                  pl.BlockSpec((64, 128), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((128, 128), lambda i: (i, 0)), interpret=True)(x, y)

  flops = flops_lib.jaxpr_flops(matmul, jnp.ones((256, 64)), jnp.ones((64, 128)))
  assert flops == 2 * 256 * 64 * 128


def test_executed_flops_count_a_shard_map_body_once_per_shard():
  """Context-parallel attention runs in shard_map, whose body is one shard's work."""
  from jax.sharding import Mesh, PartitionSpec as P
  from mirage_jax.training import flops as flops_lib
  mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
  matmul = jax.shard_map(lambda a, b: a @ b, mesh=mesh, in_specs=(P("x"), P()),
                         out_specs=P("x"))
  assert flops_lib.jaxpr_flops(matmul, jnp.ones((64, 32)), jnp.ones((32, 16))) == 2 * 64 * 32 * 16
