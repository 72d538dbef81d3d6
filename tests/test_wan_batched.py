"""The Wan rollout as one jitted, batched chunk step (issue 16).

Padded reference / preceding slots are inert (attention key mask), so a chunk with k real
references + padding is the chunk with exactly k; trajectories of different lengths batched
over 8 fake CPU devices give what one-at-a-time rollouts give, with one compiled step and one
host sync. Tiny random Wan networks built in place (32x32 frames: 2x2 latents, one DiT token
per latent frame), chunks of 9 video frames (3 latents), 2 preceding latents, up to 2
references, 2 sampler steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines import procedural
from mirage_jax import rollout
from mirage_jax.evaluation import revisit
from mirage_jax.nn import attention
from mirage_jax.families.wan import dit as wan_dit
from mirage_jax.families.wan import vae as wan_vae

RES = 32
LENGTHS = (9, 14, 18, 21, 5)  # 1, 2, 3, 3, 1 chunks; 18: the last chunk writes no latent


@pytest.fixture(scope="module")
def world():
  from experiments import wan22_ti2v_5b  # pylint: disable=g-import-not-at-top
  c = wan22_ti2v_5b.get_config("denoiser,tiny")
  c.data.resolution = (RES, RES)
  c.denoiser.update(target_frames=9, preceding_frames=8, reference_frames=2, reference_bank=8)
  c.sampler.num_steps = 2
  c.memory.backend = "mirage"
  vae = wan_vae.WanVAE(c.autoencoder, rngs=nnx.Rngs(0))
  dit = wan_dit.WanDiT(c.denoiser.model, rngs=nnx.Rngs(1))
  # A fresh VACE branch adds nothing (after_proj is zero): make the memory matter.
  proj = dit.vace.blocks.after_proj
  proj.kernel.set_value(0.2 * jax.random.normal(jax.random.key(2), proj.kernel.get_value().shape))
  return c, vae, dit


@pytest.fixture(scope="module")
def clips():
  return [revisit.fit_clip(procedural.render_clip(100001 + i, n, RES, RES, trajectory="loop"),
                           (RES, RES)) for i, n in enumerate(LENGTHS)]


def _rollout(world):
  config, vae, dit = world
  return rollout.make_rollout(config, vae, dit, "mirage", capacity=4 * (max(LENGTHS) + 2))


# ----------------------------------------------------------------------------- padding


@pytest.mark.parametrize("impl", ["xla", "chunked", "query_blocks", "splash"])
def test_attention_key_mask_equals_dropping_the_keys(impl, monkeypatch):
  if impl == "splash":  # the TPU kernel, run by the Pallas interpreter on CPU
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
        splash_attention_kernel as sk)
    make = sk.make_splash_mha
    monkeypatch.setattr(sk, "make_splash_mha", lambda *a, **kw: make(*a, **kw, interpret=True))
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 24, 2, 8)), jnp.float32) for _ in range(3))
  mask = np.ones((2, 24), bool)
  mask[0, :16] = False  # whole leading key blocks padded (chunked blocks of 8)
  mask[1, 3:6] = False
  want = jnp.concatenate([jax.nn.dot_product_attention(q[b:b + 1], k[b:b + 1, mask[b]],
                                                       v[b:b + 1, mask[b]]) for b in range(2)])
  run = lambda q, k, v: attention.attention(q, k, v, impl=impl, block_size=8,
                                            kv_mask=jnp.asarray(mask))
  np.testing.assert_allclose(run(q, k, v), want, atol=2e-6)
  if impl in ("chunked", "query_blocks"):  # their backward passes see the mask too
    loss = lambda f: lambda *x: jnp.sum(f(*x) ** 2)
    ref = lambda q, k, v: attention.attention(q, k, v, impl="xla", kv_mask=jnp.asarray(mask))
    got, ref_grads = jax.grad(loss(run), (0, 1, 2))(q, k, v), jax.grad(loss(ref), (0, 1, 2))(q, k, v)
    for a, b in zip(got, ref_grads):
      np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.any(got[1][0, :16]) and np.any(got[1][0, 16:])  # padded keys: no gradient


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_attention_key_mask_under_context_parallelism(impl):
  """Queries split over 'context' (keys gathered inside shard_map): the mask is gathered too."""
  from mirage_jax import sharding  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 32, 2, 8)), jnp.float32) for _ in range(3))
  mask = np.ones((2, 32), bool)
  mask[0, :20], mask[1, 25:] = False, False  # padding in both context shards
  f = jax.jit(lambda q, k, v, m: attention.attention(q, k, v, impl=impl, block_size=8,
                                                     kv_mask=m))
  want = f(q, k, v, jnp.asarray(mask))
  mesh = sharding.make_mesh({"fsdp": 2, "context": 2, "tensor": 2})
  spec = sharding.logical_to_spec(("batch", "tokens", "act_heads", None), None, mesh, q.shape)
  put = lambda x, s=spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, s))
  m = put(jnp.asarray(mask), jax.sharding.PartitionSpec(spec[0], spec[1]))
  with jax.set_mesh(mesh):
    hlo = f.lower(put(q), put(k), put(v), m).compile().as_text()
    got = f(put(q), put(k), put(v), m)
  assert "all-gather" in hlo
  np.testing.assert_allclose(got, want, atol=2e-6)
  drop = jax.nn.dot_product_attention(q[:1, :, :, :], k[:1, 20:], v[:1, 20:])
  np.testing.assert_allclose(got[:1], drop, atol=2e-6)


def test_padded_slots_equal_exactly_the_real_frames(world, clips):
  """k real references (right-aligned) and n real preceding latents (left-aligned) among
  R = P = 2 slots, the rest padding: the sampled chunk is that of exactly those frames."""
  r = _rollout(world)
  R, P, L = r.model.num_references, r.model.settings.preceding_latents, r.model.settings.latents
  assert (R, P, L) == (2, 2, 3)
  lat = r.model.encode(clips[3]["frames"][:9])  # (3, h, w, 48) stand-ins for generated latents
  rng = np.random.default_rng(1)
  other = lambda n: jnp.asarray(rng.standard_normal((n,) + lat.shape[1:]), jnp.float32)
  scene, refs, prec, prec_scene = other(L), other(R), other(P), other(P)
  first, key = lat[0], jax.random.key(4)
  sample = jax.jit(r.model._sample_impl)  # pylint: disable=protected-access
  control = r.model.control(L + P)
  junk = other(2)  # what padded slots hold must not matter either
  for k, n in ((1, 1), (0, 0)):  # later chunks; chunk 0 (no reference, no preceding)
    want = r.model.sample_chunk(key, first, scene, references=refs[:k] if k else None,
                          preceding=prec[:n] if n else None,
                          preceding_scene=prec_scene[:n] if n else None)
    pad_r = jnp.concatenate([junk[:R - k], refs[:k]])
    pad_p = jnp.concatenate([prec[:n], junk[:P - n]])
    pad_s = jnp.concatenate([prec_scene[:n], junk[:P - n]])
    mask = np.concatenate([np.arange(R) >= R - k, np.ones(L, bool), np.arange(P) < n])
    noise = jax.random.normal(key, (1, L) + lat.shape[1:], jnp.float32)
    from mirage_jax.families.wan import conditioning as wan_mirage  # pylint: disable=g-import-not-at-top
    vace = wan_mirage.vace_context(jnp.concatenate([scene, pad_s])[None], control)
    got = sample(r.model.dit_state, noise, first[None, None], pad_r[None], pad_p[None], vace, r.model.text,
                 r.model.empty_text, jnp.asarray(mask)[None])[0]
    # The control video of L + P latents starts as that of L (the VAE is causal in time).
    np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"k={k}, n={n}")
    assert float(jnp.max(jnp.abs(got[1:] - first))) > 1e-2
  # Without the mask the padding does change the sample (the test can fail).
  unmasked = sample(r.model.dit_state, noise, first[None, None], pad_r[None], pad_p[None], vace,
                    r.model.text, r.model.empty_text, jnp.ones((1, R + L + P), bool))[0]
  assert float(jnp.max(jnp.abs(unmasked - want))) > 1e-3


# ----------------------------------------------------------------------------- batching


def _batch(r, cs, **kw):
  return r.generate_batch([c["frames"][0] for c in cs], [c["depths"][0] for c in cs],
                          [c["intrinsics"] for c in cs], [c["poses_c2w"] for c in cs],
                          depths=[c["depths"] for c in cs], progress=False, **kw)


@pytest.mark.slow
def test_batched_equals_one_at_a_time(world, clips, monkeypatch):
  r = _rollout(world)
  seeds = [10 + b for b in range(len(clips))]
  syncs = []
  block = jax.block_until_ready
  monkeypatch.setattr(jax, "block_until_ready", lambda x: syncs.append(1) or block(x))
  batched = _batch(r, clips, seeds=seeds)
  assert len(syncs) == 1  # after the first chunk (compilation), never per chunk
  mesh = rollout.trajectory_mesh(len(clips))
  assert rollout.batch_shards(mesh) == 5 and set(r._per_mesh) == {mesh}  # pylint: disable=protected-access
  monkeypatch.setattr(jax, "block_until_ready", block)
  for b, c in enumerate(clips):
    one = r.generate(c["frames"][0], c["depths"][0], c["intrinsics"], c["poses_c2w"],
                     depths=c["depths"], seed=seeds[b], progress=False)
    got = batched[b]
    assert got["frames"].shape == (LENGTHS[b], RES, RES, 3) == one["frames"].shape
    # float32: the same program per trajectory, partitioned differently.
    assert np.abs(got["frames"].astype(int) - one["frames"].astype(int)).max() <= 1
    np.testing.assert_array_equal(got["coverage"], one["coverage"])
    assert got["num_references"] == one["num_references"]
    np.testing.assert_array_equal(got["latent_frames"], one["latent_frames"])
    # Chunks past a trajectory's end wrote nothing: the same cache as alone.
    assert got["cache_bytes"] == one["cache_bytes"] > 0
    assert got["reference_bytes"] == one["reference_bytes"]
  # Frame 0 (4 latent cells) twice, then every latent inside the trajectory, once.
  assert [list(o["latent_frames"]) for o in batched[:3]] == [
      [0, 4, 8], [0, 4, 8, 12], [0, 4, 8, 12, 16]]
  assert [o["cache_bytes"] for o in batched[:3]] == [
      batched[0]["cache_bytes"] // 4 * n for n in (4, 5, 6)]
  assert batched[3]["num_references"][0] == 0 and max(batched[3]["num_references"]) > 0
  assert batched[2]["coverage"][1:].max() > 0  # the memory was read
  # Different seeds sample different frames (the batch does not share noise).
  assert np.abs(batched[2]["frames"][1:5].astype(int)
                - batched[3]["frames"][1:5].astype(int)).max() > 0

  # Other lengths, same batch size: the same compiled step, one sync again.
  syncs.clear()
  monkeypatch.setattr(jax, "block_until_ready", lambda x: syncs.append(1) or block(x))
  again = _batch(r, clips[::-1], seeds=seeds[::-1])
  assert len(syncs) == 1
  assert [len(o["frames"]) for o in again] == list(LENGTHS[::-1])
  assert np.abs(again[-1]["frames"].astype(int) - batched[0]["frames"].astype(int)).max() <= 1
  fns = r._per_mesh[mesh]  # pylint: disable=protected-access
  assert fns["step"][False]._cache_size() == 1 and fns["start"]._cache_size() == 1
